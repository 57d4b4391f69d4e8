"""Uniform (affine) quantization: integer codes, dequantization, and fake quantization with STE.

For a real tensor ``x``, scale ``s > 0``, zero point ``z`` and code range ``[q_min, q_max]``::

    r      = fl32(1 / s)                                  (the reciprocal, rounded once to x's dtype)
    q      = clamp(round(x * r) + z, q_min, q_max)        (integer code)
    x_hat  = (q - z) * s                                  (dequantized / fake-quantized value)

The code range for ``b`` bits is ``[-2^(b-1), 2^(b-1) - 1]`` (signed), ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
(signed, ``narrow``) or ``[0, 2^b - 1]`` (unsigned).

**Multiply by the reciprocal, never divide.**  ``x * fl32(1/s)`` and ``x / s`` differ by one ulp on a
small fraction of elements, which moves the code whenever the product sits at a rounding tie.  We use the
reciprocal everywhere because (a) it is what ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_``
compute, so our nearest-rounding output equals torch's bit for bit (tested on millions of random values),
and (b) an RTL quantizer multiplies by a reciprocal constant; nobody builds a divider for this.  For
power-of-two scales (fixed point) both forms are exact.

Per-channel quantization passes ``axis``: ``scale`` and ``zero_point`` are 1-D of length ``x.shape[axis]``.

The gradient of :func:`fake_quantize` is the clipped straight-through estimator (STE): ``dx_hat/dx = 1``
where ``q_min <= round(x * r) + z <= q_max`` and ``0`` elsewhere, exactly the mask torch's fake-quantize
uses.  If ``scale`` requires grad, it gets the LSQ gradient (Esser et al. 2020)::

    dx_hat/ds = round(x*r) - x*r        inside the range
              = q_min - z  or  q_max - z   when clipped low / high

summed over every dimension except ``axis``.

**PACT** (Choi et al. 2018, :func:`pact_fake_quantize`): a trained clip ``alpha`` and the step
``s = alpha / levels`` (``levels = q_max`` by default, so the top code is ``alpha``).  The value is
``fake_quantize(x, s)``; ``d/dx`` is the STE mask above, and ``d/dalpha`` is PACT's: the clip part of the LSQ
gradient divided by ``levels``, i.e. ``sum g * q_max / levels`` over elements clipped high (plus
``q_min / levels`` over those clipped low), nothing from elements inside the code range.  The clip boundary
is where the *code* saturates (``x >= alpha + s/2``), the same boundary the STE mask uses, rather than
PACT's ``x >= alpha`` on the unrounded value; the half-step difference keeps value, mask and gradient
consistent.

**Speed.**  The per-tensor, round-to-nearest, float32 CPU case (every activation quantizer) runs a small C
kernel compiled once at first use with the system C compiler (``$CC``, else ``cc``/``gcc``; OpenMP and
``-march=native``; cached under ``$HWQUANT_CACHE_DIR`` or ``~/.cache/hwquant``, only where no other user can
write): one pass writes the output
and a one-byte mask state, and the backward is one pass over the gradient and the mask.  It computes the
same float32 operations as the torch code (``x * r``, round half to even, clamp, ``* s``), and a self-test
against the torch path runs before it is used; when no compiler is found, the build or the self-test fails,
or ``HWQUANT_NATIVE=0`` is set, everything runs on the torch path (see :func:`native_status`).  Per-channel
scales, other roundings or dtypes, accelerators and ``torch.compile`` tracing always use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

from ..errors import ConfigError
from .rounding import ROUNDING_MODES, round_

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: int, name: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """Return ``bits`` if it is an int in ``[lo, hi]``, else raise :class:`ConfigError` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def qrange(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Integer code range ``(q_min, q_max)`` for ``bits`` (1..32).

    >>> qrange(8), qrange(8, narrow=True), qrange(4, signed=False), qrange(5)
    ((-128, 127), (-127, 127), (0, 15), (-16, 15))
    """
    check_bits(bits, lo=1, hi=32)
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest torch integer dtype that holds every code in ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= qmin and qmax <= info.max:
            return dt
    return torch.int64


def _as_param(p: float | torch.Tensor, x: torch.Tensor, axis: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``p`` as a tensor of ``dtype`` on ``x``'s device, shaped to broadcast along ``axis``."""
    t = torch.as_tensor(p, dtype=dtype, device=x.device)
    if axis is None:
        if t.numel() != 1:
            raise ConfigError(f"per-tensor quantization needs a scalar scale/zero point, got shape {tuple(t.shape)}")
        return t.reshape(())
    axis = axis % x.dim()
    if t.dim() != 1 or t.numel() != x.shape[axis]:
        raise ConfigError(
            f"per-channel scale/zero point must have {x.shape[axis]} entries (x.shape[{axis}]), "
            f"got shape {tuple(t.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def check_scale(scale: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless every entry of ``scale`` is finite and positive."""
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ConfigError("quantization scale must be finite and > 0")


def _codes_float(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rounding: str,
    generator: torch.Generator | None,
    want_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer-valued float codes ``clamp(round(x * fl(1/s)) + z)`` and, optionally, the in-range mask.

    Works in one freshly allocated buffer (plus the mask), updating it in place.
    """
    t = x * torch.reciprocal(s)
    round_(t, rounding, generator)
    if z is not None:
        t.add_(z)
    mask = None
    if want_mask:
        mask = (t >= qmin) & (t <= qmax)
    t.clamp_(qmin, qmax)
    return t, mask


def _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow):
    if not x.is_floating_point():
        raise ConfigError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if rounding not in ROUNDING_MODES:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    qmin, qmax = qrange(bits, signed, narrow)
    s = _as_param(scale, x, axis, x.dtype)
    check_scale(s)
    z = None
    if not (isinstance(zero_point, (int, float)) and zero_point == 0):
        z = _as_param(zero_point, x, axis, x.dtype)
        if (z != torch.round(z)).any():
            raise ConfigError("zero point must be integer-valued")
        if (z < qmin).any() or (z > qmax).any():
            raise ConfigError(f"zero point must lie in the code range [{qmin}, {qmax}]")
    return s, z, qmin, qmax


def quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    bits: int,
    signed: bool = True,
    rounding: str = "nearest",
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    narrow: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes ``clamp(round(x * fl(1/scale)) + zero_point, q_min, q_max)``.

    Returns the smallest integer dtype that holds the code range (uint8 for unsigned <= 8 bits, int8 for
    signed <= 8 bits, int16 / int32 beyond).  Shapes: ``x`` any; ``scale`` scalar or ``[x.shape[axis]]``.

    >>> quantize(torch.tensor([-1.0, -0.26, 0.25, 0.3, 9.0]), 0.5, 4)
    tensor([-2, -1,  0,  1,  7], dtype=torch.int8)
    """
    s, z, qmin, qmax = _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow)
    with torch.no_grad():
        t, _ = _codes_float(x.detach(), s, z, qmin, qmax, rounding, generator, want_mask=False)
    return t.to(code_dtype(qmin, qmax))


def dequantize(
    q: torch.Tensor,
    scale: float | torch.Tensor,
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` in ``dtype``."""
    ref = q.to(dtype)
    s = _as_param(scale, ref, axis, dtype)
    if isinstance(zero_point, (int, float)) and zero_point == 0:
        return ref.mul_(s)
    z = _as_param(zero_point, ref, axis, dtype)
    return ref.sub_(z).mul_(s)

# ----------------------------------------------------------------------------------------- native kernels
_NATIVE_SRC = r"""
#include <stdint.h>
#include <math.h>
/* mask states: 0 clipped low, 1 in range (gradient passes), 2 clipped high.  NaN -> 0. */
#define PAR _Pragma("omp parallel for simd schedule(static) num_threads(nt) if(n > 32768)")
static inline float clampf(float v, float lo, float hi) { v = v < lo ? lo : v; return v > hi ? hi : v; }
static inline uint8_t state(float v, float lo, float hi) { return v >= lo ? (v <= hi ? 1 : 2) : 0; }

void hwq_fq(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t n, float r, float s,
            float z, int has_z, float lo, float hi, int nt) {
  if (m == 0 && !has_z) { PAR for (int64_t i = 0; i < n; i++) y[i] = clampf(rintf(x[i] * r), lo, hi) * s; }
  else if (m == 0) { PAR for (int64_t i = 0; i < n; i++) y[i] = (clampf(rintf(x[i] * r) + z, lo, hi) - z) * s; }
  else if (!has_z) {
    PAR for (int64_t i = 0; i < n; i++) {
      float v = rintf(x[i] * r); m[i] = state(v, lo, hi); y[i] = clampf(v, lo, hi) * s;
    }
  } else {
    PAR for (int64_t i = 0; i < n; i++) {
      float v = rintf(x[i] * r) + z; m[i] = state(v, lo, hi); y[i] = (clampf(v, lo, hi) - z) * s;
    }
  }
}

/* per channel along the outermost memory dimension: C blocks of `inner` elements, reciprocal r[c], step s[c] */
void hwq_fq_pc(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t C, int64_t inner,
               const float *restrict r, const float *restrict s, float lo, float hi, int nt) {
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(C * inner > 32768)")
  for (int64_t c = 0; c < C; c++) {
    const float rc = r[c], sc = s[c];
    const float *restrict xc = x + c * inner;
    float *restrict yc = y + c * inner;
    if (m) {
      uint8_t *restrict mc = m + c * inner;
      for (int64_t i = 0; i < inner; i++) {
        float v = rintf(xc[i] * rc); mc[i] = state(v, lo, hi); yc[i] = clampf(v, lo, hi) * sc;
      }
    } else {
      for (int64_t i = 0; i < inner; i++) yc[i] = clampf(rintf(xc[i] * rc), lo, hi) * sc;
    }
  }
}

void hwq_mask_bwd(const float *restrict g, const uint8_t *restrict m, float *restrict gx, int64_t n, int nt) {
  PAR for (int64_t i = 0; i < n; i++) gx[i] = m[i] == 1 ? g[i] : 0.0f;
}

/* Scale gradient: returns sum g * ds where ds = round(x r) - x r in range (only if lsq, else 0: PACT),
   lo - z / hi - z when clipped low / high; writes the STE input gradient gx if given */
double hwq_scale_bwd(const float *restrict g, const float *restrict x, const uint8_t *restrict m, float *restrict gx,
                     int64_t n, float r, float z, float lo, float hi, int lsq, int nt) {
  double acc = 0.0;
  float glo = lo - z, ghi = hi - z;
  _Pragma("omp parallel for simd schedule(static) num_threads(nt) if(n > 32768) reduction(+:acc)")
  for (int64_t i = 0; i < n; i++) {
    uint8_t mi = m[i];
    float ds;
    if (mi == 1) { float v = x[i] * r; ds = lsq ? rintf(v) - v : 0.0f; } else ds = mi == 2 ? ghi : glo;
    acc += (double)(g[i] * ds);
    if (gx) gx[i] = mi == 1 ? g[i] : 0.0f;
  }
  return acc;
}

/* ---- gradient quantization (hwquant.numerics.gradient) ---- */
/* one pass: out[0] = sum x, out[1] = sum x^2 (double), out[2] = max |x| (NaN propagates to out[0]) */
void hwq_stats(const float *restrict x, int64_t n, double *restrict out, int nt) {
  double s = 0.0, ss = 0.0;
  float mx = 0.0f;
  _Pragma("omp parallel for simd schedule(static) num_threads(nt) if(n > 32768) reduction(+:s,ss) reduction(max:mx)")
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    double d = (double)v;
    s += d; ss += d * d;
    float a = fabsf(v);
    mx = a > mx ? a : mx;
  }
  out[0] = s; out[1] = ss; out[2] = (double)mx;
}

/* the log-spaced bin of |x|: bits(|x|) >> 21, the float32 exponent and the top two mantissa bits (1024 bins, 4 per
   octave); on the raw bits, so that NaN and inf land in the top bins (the statistics report them) */
#define HBIN(u) (((u) & 0x7fffffffu) >> 21)

/* The tail of the histogram: counts of the bins at or above a floor.  With need > 0 the floor rises while at
   least `need` counted elements lie in the bins above it (a bin below the need-th largest element's cannot
   change which bin holds that element), so the counts are exact from the need-th largest element's bin up and
   0 below; a chunk whose largest |x| lies below the floor is skipped after one vectorised max.  need <= 0:
   every bin (the full histogram). */
typedef struct { int64_t h[1024]; int64_t tail; uint32_t floor; } tailhist;

static void tail_init(tailhist *t) { for (int b = 0; b < 1024; b++) t->h[b] = 0; t->tail = 0; t->floor = 0; }

#define TCHUNK 64
static void tail_add(const float *restrict x, int64_t n, tailhist *restrict t, int64_t need) {
  const uint32_t *restrict u = (const uint32_t *)x;
  for (int64_t lo = 0; lo < n; lo += TCHUNK) {
    int64_t len = n - lo < TCHUNK ? n - lo : TCHUNK;
    uint32_t top = 0;
    _Pragma("omp simd reduction(max:top)")
    for (int64_t j = 0; j < len; j++) { uint32_t a = u[lo + j] & 0x7fffffffu; top = a > top ? a : top; }
    if ((top >> 21) < t->floor) continue;
    for (int64_t j = 0; j < len; j++) {
      uint32_t b = HBIN(u[lo + j]);
      if (b >= t->floor) { t->h[b]++; t->tail++; }
    }
    while (need > 0 && t->tail - t->h[t->floor] >= need) { t->tail -= t->h[t->floor]; t->h[t->floor] = 0; t->floor++; }
  }
}

/* sum, sum of squares (double) and max|x| of x[0..n), vectorised */
static inline void stats_block(const float *restrict x, int64_t n, double *s, double *ss, float *mx) {
  double ls = 0.0, lss = 0.0;
  float lmx = 0.0f;
  _Pragma("omp simd reduction(+:ls,lss) reduction(max:lmx)")
  for (int64_t j = 0; j < n; j++) {
    float v = x[j];
    double d = (double)v;
    ls += d; lss += d * d;
    float a = fabsf(v);
    lmx = a > lmx ? a : lmx;
  }
  *s += ls; *ss += lss; *mx = lmx > *mx ? lmx : *mx;
}

#define HBLOCK 16384  /* elements per block: the histogram pass re-reads a block from L1/L2, not memory */

/* hwq_stats and, in the same pass over memory, hist = the histogram tail of |x| (see tail_add; bins below the
   largest per-thread floor are 0, the sum of the threads' exact counts above it) - the z-score clip search's
   clipped-fraction counts; blocks of HBLOCK elements (statistics, then the histogram of the cached block) */
void hwq_stats_hist(const float *restrict x, int64_t n, double *restrict out, int64_t *restrict hist, int64_t need,
                    int nt) {
  double s = 0.0, ss = 0.0;
  float mx = 0.0f;
  uint32_t floor = 0;
  for (int b = 0; b < 1024; b++) hist[b] = 0;
  int64_t nb = (n + HBLOCK - 1) / HBLOCK;
  _Pragma("omp parallel num_threads(nt) if(n > 32768)")
  {
    tailhist t;
    tail_init(&t);
    double ls = 0.0, lss = 0.0;
    float lmx = 0.0f;
    _Pragma("omp for schedule(static) nowait")
    for (int64_t k = 0; k < nb; k++) {
      int64_t lo = k * HBLOCK, len = n - lo < HBLOCK ? n - lo : HBLOCK;
      stats_block(x + lo, len, &ls, &lss, &lmx);
      tail_add(x + lo, len, &t, need);
    }
    _Pragma("omp critical")
    {
      s += ls; ss += lss; mx = lmx > mx ? lmx : mx;
      floor = t.floor > floor ? t.floor : floor;
      for (int b = 0; b < 1024; b++) hist[b] += t.h[b];
    }
  }
  for (uint32_t b = 0; b < floor; b++) hist[b] = 0;  /* exact only from the highest floor up */
  out[0] = s; out[1] = ss; out[2] = (double)mx;
}

/* per row (sample) r of x[rows][len]: out[3r..3r+2] = sum, sum of squares, max|x| of the row and, when hist is
   given, hist[1024 r + bin] = the row's histogram tail (need as in tail_add); rows in parallel */
void hwq_row_stats(const float *restrict x, int64_t rows, int64_t len, double *restrict out, int64_t *restrict hist,
                   int64_t need, int nt) {
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(rows * len > 32768)")
  for (int64_t r = 0; r < rows; r++) {
    const float *restrict xr = x + r * len;
    double s = 0.0, ss = 0.0;
    float mx = 0.0f;
    tailhist t;
    if (hist) tail_init(&t);
    for (int64_t lo = 0; lo < len; lo += HBLOCK) {
      int64_t n = len - lo < HBLOCK ? len - lo : HBLOCK;
      stats_block(xr + lo, n, &s, &ss, &mx);
      if (hist) tail_add(xr + lo, n, &t, need);
    }
    if (hist) for (int b = 0; b < 1024; b++) hist[1024 * r + b] = t.h[b];
    out[3 * r] = s; out[3 * r + 1] = ss; out[3 * r + 2] = (double)mx;
  }
}

/* per row of x[rows][len]: codes q = clamp(R(x * r[row]), -qm, qm), R: 0 toward zero, 1 nearest even; kind 0: int8
   codes, 1: int16 codes, 2: float q * s[row] (what hwq_gq does for one row) */
#define GQR_LOOP(STORE) \
  if (mode == 0) { _Pragma("omp simd") for (int64_t j = 0; j < len; j++) { STORE(T0(clampf(xr[j] * m, -qm, qm))); } } \
  else { _Pragma("omp simd") for (int64_t j = 0; j < len; j++) { STORE(clampf(rintf(xr[j] * m), -qm, qm)); } }

void hwq_gq_rows(const float *restrict x, void *restrict out, int64_t rows, int64_t len, const float *restrict rr,
                 const float *restrict sr, float qm, int mode, int kind, int nt) {
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(rows * len > 32768)")
  for (int64_t r = 0; r < rows; r++) {
    const float *restrict xr = x + r * len;
    float m = rr[r], s = sr[r];
#define T0(v) (v)
    if (kind == 0) {
      int8_t *restrict q = (int8_t *)out + r * len;
#define SR8(v) q[j] = (int8_t)(int32_t)(v)
      GQR_LOOP(SR8)
    } else if (kind == 1) {
      int16_t *restrict q = (int16_t *)out + r * len;
#define SR16(v) q[j] = (int16_t)(int32_t)(v)
      GQR_LOOP(SR16)
    } else {
      float *restrict yr = (float *)out + r * len;
#undef T0
#define T0(v) truncf(v)
#define SRF(v) yr[j] = (v) * s
      GQR_LOOP(SRF)
    }
#undef T0
  }
}

/* counter-based uniform in [0, 1): splitmix64 of (seed, index), 24 bits; independent of thread count */
static inline float u01(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return (float)(z >> 40) * 0x1p-24f;
}

/* codes q = clamp(R(x * r), -qm, qm); R: 0 toward zero, 1 nearest even, 2 floor(v + u), 3 floor.
   kind 0: int8 codes, 1: int16 codes, 2: float x_hat = q * s.  Toward zero is the float -> int conversion
   itself (C truncates), so the integer kinds need no rounding instruction at all (T0 = identity). */
#define GQ_LOOP(STORE) \
  if (mode == 0) { PAR for (int64_t i = 0; i < n; i++) { STORE(T0(clampf(x[i] * r, -qm, qm))); } } \
  else if (mode == 1) { PAR for (int64_t i = 0; i < n; i++) { STORE(clampf(rintf(x[i] * r), -qm, qm)); } } \
  else if (mode == 2) { PAR for (int64_t i = 0; i < n; i++) { \
      STORE(clampf(floorf(x[i] * r + u01(seed, (uint64_t)i)), -qm, qm)); } } \
  else { PAR for (int64_t i = 0; i < n; i++) { STORE(clampf(floorf(x[i] * r), -qm, qm)); } }

void hwq_gq(const float *restrict x, void *restrict out, int64_t n, float r, float s, float qm, int mode, int kind,
            uint64_t seed, int nt) {
#define T0(v) (v)
  if (kind == 0) {
    int8_t *restrict q = (int8_t *)out;
#define ST8(v) q[i] = (int8_t)(int32_t)(v)
    GQ_LOOP(ST8)
  } else if (kind == 1) {
    int16_t *restrict q = (int16_t *)out;
#define ST16(v) q[i] = (int16_t)(int32_t)(v)
    GQ_LOOP(ST16)
  } else {
    float *restrict y = (float *)out;
#undef T0
#define T0(v) truncf(v)
#define STF(v) y[i] = (v) * s
    GQ_LOOP(STF)
  }
}

"""

_NATIVE_LOCK = threading.Lock()
_NATIVE: dict = {"lib": None, "state": "unloaded", "reason": "", "path": None}


def _private(path: str) -> bool:
    """``path`` exists, is no symlink, belongs to this user and no one else may write it (POSIX).

    The kernel library is native code that every hwquant process loads: it is cached and loaded only from
    places no other local user can write (a shared ``/tmp/hwquant-<uid>`` that someone else created, or a
    world-writable cache directory, could hold a planted ``.so``)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not hasattr(os, "getuid"):  # Windows: no POSIX ownership to check; the user's own profile directory
        return True
    import stat as _stat

    return (not _stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH))


def _cache_dir() -> str | None:
    """A private directory to cache the compiled kernels in (see :func:`_private`), or ``None`` when neither
    ``$HWQUANT_CACHE_DIR`` / ``~/.cache/hwquant`` nor ``<tmp>/hwquant-<uid>`` is private: then the library is
    built in a fresh private temporary directory and not cached."""
    explicit = os.environ.get("HWQUANT_CACHE_DIR")
    base = explicit or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hwquant")
    fallback = os.path.join(tempfile.gettempdir(), f"hwquant-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for d in (base, fallback):
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if _private(d) and os.access(d, os.W_OK):
            return d
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_native() -> str:
    """Compile the kernels (once per source, compiler and CPU) and return the path of the shared library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    flag_sets = [["-O3", "-march=native"], ["-O3"]]
    common = ["-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c99"]
    key = hashlib.sha256("\0".join([_NATIVE_SRC, cc, _cpu_flags(), platform.machine(), repr(flag_sets),
                                    repr(common)]).encode()).hexdigest()[:16]
    d = _cache_dir() or tempfile.mkdtemp(prefix="hwquant-build-")  # mkdtemp: private (0700), fresh
    so = os.path.join(d, f"hwquant_fq_{key}.so")
    if os.path.exists(so) and _private(so):
        return so
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src = os.path.join(tmp, "fq.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(_NATIVE_SRC)
        err = ""
        for flags in flag_sets:
            out = os.path.join(tmp, "fq.so")
            proc = subprocess.run([cc, *flags, *common, src, "-o", out, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode == 0:
                os.chmod(out, 0o755)  # whatever the umask: only we may write it, so the cache is trusted later
                os.replace(out, so)  # atomic: concurrent builders write the same bytes
                return so
            err = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            err = err[0]
        raise RuntimeError(f"C compiler failed: {err}")


def _load_native():
    path = _build_native()
    lib = ctypes.CDLL(path)
    P, I64, F, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_double
    lib.hwq_fq.argtypes = [P, P, P, I64, F, F, F, I, F, F, I]
    lib.hwq_fq.restype = None
    lib.hwq_fq_pc.argtypes = [P, P, P, I64, I64, P, P, F, F, I]
    lib.hwq_fq_pc.restype = None
    lib.hwq_mask_bwd.argtypes = [P, P, P, I64, I]
    lib.hwq_mask_bwd.restype = None
    lib.hwq_scale_bwd.argtypes = [P, P, P, P, I64, F, F, F, F, I, I]
    lib.hwq_scale_bwd.restype = D
    lib.hwq_stats.argtypes = [P, I64, P, I]
    lib.hwq_stats.restype = None
    lib.hwq_stats_hist.argtypes = [P, I64, P, P, I64, I]
    lib.hwq_stats_hist.restype = None
    lib.hwq_row_stats.argtypes = [P, I64, I64, P, P, I64, I]
    lib.hwq_row_stats.restype = None
    lib.hwq_gq_rows.argtypes = [P, P, I64, I64, P, P, F, I, I, I]
    lib.hwq_gq_rows.restype = None
    lib.hwq_gq.argtypes = [P, P, I64, F, F, F, I, I, ctypes.c_uint64, I]
    lib.hwq_gq.restype = None
    return lib, path


def _native_self_test(lib) -> str | None:
    """Compare the kernel with the torch path on awkward values (ties, clipping, NaN, inf); ``None`` if equal."""
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    x = torch.cat([torch.randn(70_000, generator=g) * 20, ties, torch.tensor([float("nan"), float("inf"),
                   -float("inf"), -0.0, 0.0, 1e30, -1e30])])
    for s, z, lo, hi in ((1.0, 0, -8, 7), (0.37, 0, 0, 15), (0.05, 3, 0, 255), (2.0**-5, 0, -16, 15)):
        st = torch.tensor(s, dtype=torch.float32)
        zt = None if z == 0 else torch.tensor(float(z))
        ref, ref_mask = _codes_float(x, st, zt, lo, hi, "nearest", None, want_mask=True)
        if zt is not None:
            ref.sub_(zt)
        ref.mul_(st)
        y = torch.empty_like(x)
        m = torch.empty(x.shape, dtype=torch.uint8)
        lib.hwq_fq(x.data_ptr(), y.data_ptr(), m.data_ptr(), x.numel(), 1.0 / float(st), float(st), float(z),
                   int(z != 0), float(lo), float(hi), max(1, torch.get_num_threads()))
        same = torch.equal(torch.nan_to_num(y, nan=7.5), torch.nan_to_num(ref, nan=7.5))
        if not same or not torch.equal(m == 1, ref_mask):
            return f"kernel differs from the torch path (scale {s}, zero point {z}, codes {lo}..{hi})"
    w = torch.randn(16, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    sc = torch.rand(16, generator=g) * 0.2 + 1e-3
    ref, ref_mask = _codes_float(w, sc.view(-1, 1, 1, 1), None, -16, 15, "nearest", None, want_mask=True)
    ref.mul_(sc.view(-1, 1, 1, 1))
    y, m = _native_fq_pc(w, sc, -16, 15, True, lib)
    if not torch.equal(y, ref) or not torch.equal(m == 1, ref_mask):
        return "per-channel kernel differs from the torch path"
    return None


def _native():
    """The loaded kernel library, or ``None`` (disabled, no compiler, build or self-test failure)."""
    st = _NATIVE["state"]
    if st == "ok":
        return _NATIVE["lib"]
    if st == "failed":
        return None
    with _NATIVE_LOCK:
        if _NATIVE["state"] == "unloaded":
            if os.environ.get("HWQUANT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _NATIVE.update(state="failed", reason="disabled by HWQUANT_NATIVE")
            else:
                try:
                    lib, path = _load_native()
                    bad = _native_self_test(lib)
                    if bad:
                        raise RuntimeError(bad)
                    _NATIVE.update(lib=lib, state="ok", path=path, reason="")
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    _NATIVE.update(state="failed", reason=f"{type(e).__name__}: {e}")
                    warnings.warn(f"hwquant: fused fake-quant kernel unavailable, using torch ops ({e})",
                                  RuntimeWarning, stacklevel=3)
    return _NATIVE["lib"]


def native_status() -> dict:
    """``{"available", "path", "reason"}`` of the fused C kernel (builds it on first call)."""
    lib = _native()
    return {"available": lib is not None, "path": _NATIVE["path"], "reason": _NATIVE["reason"]}


def _dense(x: torch.Tensor) -> bool:
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _outer_blocks(x: torch.Tensor, axis: int) -> bool:
    """Is ``axis`` the outermost memory dimension, so each channel is one contiguous block?"""
    return axis % x.dim() == 0 and x.shape[0] > 0 and x.stride(0) * x.shape[0] == x.numel()


def _use_native(x: torch.Tensor, axis, rounding: str) -> bool:
    return (
        (axis is None or _outer_blocks(x, axis))
        and rounding == "nearest"
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and _dense(x)
        and not _compiling()
        and _native() is not None
    )


def _grad_like(grad: torch.Tensor, m: torch.Tensor) -> bool:
    """Can the kernel read ``grad`` element for element alongside the mask ``m``?"""
    return grad.dtype == torch.float32 and grad.device.type == "cpu" and grad.stride() == m.stride()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _native_fq_pc(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, want_mask: bool, lib=None):
    """Per-channel kernel forward (axis 0 outermost in memory, zero point 0): ``(y, mask state or None)``."""
    lib = lib or _NATIVE["lib"]
    s = s.reshape(-1).to(torch.float32).contiguous()
    r = torch.reciprocal(s)
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    lib.hwq_fq_pc(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(), x.shape[0], x.numel() // x.shape[0],
                  r.data_ptr(), s.data_ptr(), float(qmin), float(qmax), _threads())
    return y, m


def _native_fq(x: torch.Tensor, sf: float, zf: float, qmin: int, qmax: int, want_mask: bool):
    """Kernel forward: ``(y, mask state or None)``; ``sf`` / ``zf`` are the float32 scale and zero point."""
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    _NATIVE["lib"].hwq_fq(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(), x.numel(), 1.0 / sf, sf,
                          zf, int(zf != 0.0), float(qmin), float(qmax), _threads())
    return y, m


def shape_param(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A trusted scale / zero point (0-d, or 1-d along ``axis``) viewed to broadcast against ``x``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Fused fake quantization: one pass computes the output and the STE mask; backward reuses the mask.

    Two implementations with identical results: the C kernel (mask state ``uint8``: 1 = in range) and torch
    ops (``bool`` mask).  With a scale that requires grad its gradient is computed as well: the LSQ gradient
    (``lsq=True``) or its clip-only part (``lsq=False``: PACT, zero inside the code range).
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, rounding, generator, axis, lsq=True):  # noqa: D401
        scale_grad = ctx.needs_input_grad[1]
        ctx.lsq = lsq
        ctx.axis = axis
        ctx.scale_shape = s.shape
        # per-channel kernel: zero point 0 and no scale gradient (LSQ per channel runs on torch ops)
        ctx.native = _use_native(x, axis, rounding) and (axis is None or (z is None and not scale_grad))
        if ctx.native and axis is not None:
            y, m = _native_fq_pc(x, s, qmin, qmax, want_mask=True)
            ctx.save_for_backward(m, None)
            return y
        if ctx.native:
            sf = float(s)
            zf = 0.0 if z is None else float(z)
            y, m = _native_fq(x, sf, zf, qmin, qmax, want_mask=True)
            ctx.consts = (1.0 / sf, zf, float(qmin), float(qmax))
            ctx.save_for_backward(m, x if scale_grad else None)
            return y
        t, mask = _codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=True)
        if z is not None:
            t.sub_(z)
        if scale_grad:
            # LSQ gradient: (q - z) - x*r inside the range, the clipped code outside (PACT: 0 inside).
            g_s = t - x * torch.reciprocal(s) if lsq else torch.zeros((), dtype=t.dtype)
            g_s = torch.where(mask, g_s, t)
            ctx.save_for_backward(mask, g_s)
        else:
            ctx.save_for_backward(mask)
        return t.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        if ctx.native:
            return _FakeQuantSTE._native_backward(ctx, grad)
        saved = ctx.saved_tensors
        mask = saved[0]
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            prod = grad * saved[1]
            if ctx.axis is None:
                grad_s = prod.sum().reshape(ctx.scale_shape)
            else:
                dims = [d for d in range(grad.dim()) if d != ctx.axis % grad.dim()]
                grad_s = prod.sum(dim=dims, keepdim=True).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None, None, None

    @staticmethod
    def _native_backward(ctx, grad):
        m, x = ctx.saved_tensors
        lib = _NATIVE["lib"]
        want_x, want_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not _grad_like(grad, m):
            grad = grad.to(torch.float32).contiguous(memory_format=_format_of(m))
        grad_x = torch.empty_like(grad) if want_x else None
        grad_s = None
        if want_s:
            r, zf, lo, hi = ctx.consts
            acc = lib.hwq_scale_bwd(grad.data_ptr(), x.data_ptr(), m.data_ptr(),
                                    0 if grad_x is None else grad_x.data_ptr(), m.numel(), r, zf, lo, hi,
                                    int(ctx.lsq), _threads())
            grad_s = torch.tensor(acc, dtype=torch.float32).reshape(ctx.scale_shape)
        elif want_x:
            lib.hwq_mask_bwd(grad.data_ptr(), m.data_ptr(), grad_x.data_ptr(), m.numel(), _threads())
        return grad_x, grad_s, None, None, None, None, None, None, None


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def fake_quantize_trusted(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    axis: int | None = None,
    lsq: bool = True,
) -> torch.Tensor:
    """:func:`fake_quantize` without argument checks, for callers that hold validated parameters.

    ``s`` (and ``z``, or ``None`` for a zero point of 0) must already be float tensors of ``x``'s dtype shaped
    to broadcast along ``axis`` (0-d per tensor), with ``s > 0`` finite and ``z`` integer-valued in range.
    ``lsq=False`` gives a scale that requires grad only the clip part of the LSQ gradient (PACT's).
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        # No gradient wanted: skip the STE mask (most of the forward cost for cache-resident tensors).
        if _use_native(x, axis, rounding):
            if axis is None:
                return _native_fq(x, float(s), 0.0 if z is None else float(z), qmin, qmax, want_mask=False)[0]
            if z is None:
                return _native_fq_pc(x, s, qmin, qmax, want_mask=False)[0]
        t, _ = _codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=False)
        if z is not None:
            t.sub_(z)
        return t.mul_(s)
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax, rounding, generator, axis, lsq)


def fake_quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    bits: int,
    signed: bool = True,
    rounding: str = "nearest",
    *,
    zero_point: int | torch.Tensor = 0,
    axis: int | None = None,
    narrow: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize: ``(clamp(round(x * fl(1/scale)) + z, q_min, q_max) - z) * scale``.

    Differentiable with the clipped straight-through estimator (and the LSQ gradient for a ``scale`` that
    requires grad).  Equals ``torch.fake_quantize_per_tensor_affine`` (and ``_per_channel_affine``) bit for
    bit for ``rounding="nearest"``.

    >>> fake_quantize(torch.tensor([-1.0, 0.3, 0.74, 9.0]), 0.5, 4)
    tensor([-1.0000,  0.5000,  0.5000,  3.5000])
    """
    s, z, qmin, qmax = _prepare(x, scale, zero_point, bits, signed, rounding, axis, narrow)
    return fake_quantize_trusted(x, s, z, qmin, qmax, rounding, generator, axis)


def pact_fake_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    bits: int,
    signed: bool = False,
    *,
    levels: int | None = None,
    narrow: bool = False,
) -> torch.Tensor:
    """PACT fake quantization with a trained clip ``alpha`` (0-d tensor, usually an ``nn.Parameter``).

    ``s = alpha / levels`` (``levels``: ``q_max`` of ``bits`` unless given, e.g. 255 for a CQAT 8-bit step
    with 4-bit codes); returns ``fake_quantize(x, s, bits, signed)`` with PACT's gradient for ``alpha`` (see
    the module docstring).  Round to nearest even.

    >>> a = torch.tensor(1.5, requires_grad=True)
    >>> y = pact_fake_quantize(torch.tensor([0.2, 0.9, 2.0]), a, 2)
    >>> y.sum().backward(); y.detach(), a.grad
    (tensor([0.0000, 1.0000, 1.5000]), tensor(1.))
    """
    qmin, qmax = qrange(check_bits(bits), signed, narrow)
    lv = qmax if levels is None else levels
    if isinstance(lv, bool) or not isinstance(lv, int) or lv < 1:
        raise ConfigError(f"levels must be a positive integer, got {levels!r}")
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(())
    av = float(a.detach())
    if not math.isfinite(av) or av <= 0:
        raise ConfigError(f"PACT clip alpha must be finite and > 0, got {av}")
    return fake_quantize_trusted(x, a / lv, None, qmin, qmax, "nearest", None, None, lsq=False)

