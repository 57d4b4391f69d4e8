"""Gradient quantization (ARC, Choi & Kim, ISCAS 2024; seed ``000``): per-tensor codes for error and weight
gradients, with a clip chosen from the tensor's own statistics.

For a gradient tensor ``g`` and ``b`` bits (``Q = 2^(b-1) - 1``, symmetric narrow codes ``[-Q, Q]``)::

    c = clip(g)                         the clip value (policy below)
    s = fl32(c / Q)                     the step
    r = fl32(Q / c)                     the multiplier (one ulp larger if needed so that fl32(c * r) >= Q:
                                        the clip value itself gets the top code, also when truncating)
    q = clamp(R(g * r), -Q, Q)          the codes, R the rounding

Clip policies:

``zscore`` [paper, rec]  ``c = min(max|g|, |mu| + k * sigma)`` with ``mu, sigma`` the mean and (population)
    standard deviation of ``g``: values beyond ``k`` standard deviations are outliers and saturate.
``search``  the z-score clip *searched* per tensor and step: the smallest ``k`` of :data:`SEARCH_K`
    (3, 4, 6, 8, 12, 16, 24, 32, 48, 64 standard deviations) whose clip ``c_k = |mu| + k * sigma`` saturates at
    most a fraction ``p`` of the elements, else ``max|g|``.  ``p`` defaults to ``1e-3 / (2^b - 1)``: only the
    largest gradients matter after convergence, so almost none may saturate (the clip-fraction rule of LBT,
    ECCV 2024, applied to the z-score candidates of ARC).  The clipped fraction is counted in the statistics
    pass itself, with a histogram of ``|g|`` on log-spaced bins - the float32 exponent and the top two mantissa
    bits of ``|g|``, ``bits(|g|) >> 21`` (4 bins per octave; a leading-one detector in hardware): the count for
    ``c_k`` is every element in ``c_k``'s bin or above, an over-estimate, so at most ``p`` saturate.  With
    ``p * n < 1`` (a per-sample row of fewer than ``1 / p`` elements) no candidate below ``max|g|`` can qualify,
    so the clip is ``max|g|`` and the histogram is skipped.  The rule only asks whether at most
    ``m = floor(p * n)`` elements lie in a bin or above, so the fused kernel counts only the histogram's tail
    from the bin of the ``(m + 1)``-th largest element up (a floor that rises while ``m + 1`` counted elements
    lie above it; chunks of 64 elements below the floor are skipped after one vectorised max): the same answer
    as the full histogram, at about the cost of the statistics alone.  In hardware: the same counters, or a
    ``m + 1``-entry buffer of the largest bins.
``max``  ``c = max|g|`` (no clipping: the usual baseline).
``dsgc`` (direction-sensitive gradient clipping, Zhu et al., CVPR 2020)  ``c`` maximises the cosine similarity
    between ``g`` and its quantized version, searched over ``c = max|g| * 2^(-j/4)``, ``j = 0..39``, on a
    strided subsample of at most 65536 elements (an error-minimising search: it tracks the bulk of the
    distribution, which the paper argues is the wrong target after convergence).

Roundings: ``zero`` (toward zero, truncation: what an int cast does; no random numbers, no tie logic),
``nearest`` (half to even), ``stochastic`` (``floor(v + u)``, ``u ~ U[0, 1)``, unbiased).  Stochastic
rounding takes one 62-bit seed from the ``torch.Generator`` per call and draws ``u`` from a counter-based
generator (:func:`counter_uniforms`: splitmix64 of the seed and the element's position in memory, 24-bit
uniforms) on both paths, so the fused kernel and the torch path give the same codes bit for bit, whatever the
thread count (tested).

**Speed.**  :func:`quantize_gradient` makes two passes over memory on CPU float32: one for the statistics
(sum, sum of squares, max in the fused C kernel of :mod:`hwquant.numerics.native`: per block of 16384
elements, the block sums then added in block order, so the result does not depend on the thread count; the
torch path sums in another order and may differ in the last bits of the clip), one
that reads ``g`` and writes 1-byte codes (or the dequantized float gradient, :func:`fake_quantize_gradient`).
The torch path (other dtypes / devices, ``HWQUANT_NATIVE=0``) computes the same codes.
"""

from __future__ import annotations

import itertools
import math
import struct

import torch

from ..errors import ConfigError, DataError
from . import native
from .codes import MAX_BITS
from .fused import native_kernels
from .rounding import round_

__all__ = [
    "GRAD_CLIPS",
    "GRAD_ROUNDINGS",
    "dequantize_gradient",
    "fake_quantize_gradient",
    "gradient_clip",
    "gradient_hist",
    "gradient_stats",
    "search_clip",
    "quantize_gradient",
    "quantize_gradient_rows",
    "fake_quantize_gradient_rows",
    "row_clips",
]

GRAD_CLIPS = ("zscore", "search", "max", "dsgc")
SEARCH_K = (3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
HIST_BINS = 1024  # bits(|g|) >> 21 of a float32
GRAD_ROUNDINGS = ("zero", "nearest", "stochastic")
_MODE = {"zero": 0, "nearest": 1, "stochastic": 2, "floor": 3}
_DSGC_SAMPLES = 65536
_DSGC_GRID = 40


def _check(bits: int, rounding: str, clip: str, k: float, fraction: float | None = None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise ConfigError(f"gradient bits must be an integer in 2..{MAX_BITS}, got {bits!r}")
    if rounding not in GRAD_ROUNDINGS:
        raise ConfigError(f"gradient rounding must be one of {', '.join(GRAD_ROUNDINGS)}, got {rounding!r}")
    if clip not in GRAD_CLIPS:
        raise ConfigError(f"gradient clip must be one of {', '.join(GRAD_CLIPS)}, got {clip!r}")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or not math.isfinite(k):
        raise ConfigError(f"z-score k must be a positive number, got {k!r}")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction < 1):
        raise ConfigError(f"clip fraction must be a number in [0, 1), got {fraction!r}")


def _fast(g: torch.Tensor) -> bool:
    """The kernels are elementwise with one scale, so any dense layout (contiguous, channels-last) works."""
    return g.dtype == torch.float32 and g.device.type == "cpu" and g.numel() > 0 and native.dense(g)


def gradient_stats(g: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, population std, max|g|)`` of ``g`` in double precision, in one pass on CPU float32.

    Raises :class:`~hwquant.errors.DataError` if ``g`` holds NaN or infinity.
    """
    if g.numel() == 0:
        return 0.0, 0.0, 0.0
    lib = native_kernels() if _fast(g) else None
    if lib is not None:
        out = torch.empty(3, dtype=torch.float64)
        lib.hwq_stats(g.data_ptr(), g.numel(), out.data_ptr(), native.threads())
        s, ss, mx = out.tolist()
    else:
        d = g.detach().double()
        s, ss, mx = float(d.sum()), float((d * d).sum()), float(d.abs().max())
    n = g.numel()
    if not (math.isfinite(s) and math.isfinite(ss) and math.isfinite(mx)):
        raise DataError("gradient holds NaN or infinite values (the training diverged)")
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    return mean, math.sqrt(var), mx


def _hist_bins(a: torch.Tensor) -> torch.Tensor:
    """``bits(a) >> 21`` of non-negative float32 values: the log-spaced bin index (see the module docstring)."""
    return a.float().contiguous().view(torch.int32) >> 21


def gradient_hist(g: torch.Tensor, need: int = 0) -> tuple[float, float, float, torch.Tensor]:
    """``(mean, population std, max|g|, hist)`` in one pass; ``hist[b]`` (int64, 1024 bins) counts the elements
    with ``bits(|g|) >> 21 == b``.  Raises :class:`~hwquant.errors.DataError` on NaN or infinity.

    ``need > 0``: only the tail that can hold the ``need``-th largest ``|g|`` is counted (the fused kernel
    skips the rest): the counts are exact from some bin ``F`` up, ``F`` at most the bin of the ``need``-th
    largest element, with at least ``need`` elements at or above ``F``, and 0 below ``F``.  Every
    "at most ``need - 1`` elements at or above bin ``b``" test - the search rule's - then answers as on the
    full histogram (see :func:`_tail_need`)."""
    n = g.numel()
    if n == 0:
        return 0.0, 0.0, 0.0, torch.zeros(HIST_BINS, dtype=torch.int64)
    lib = native_kernels() if _fast(g) else None
    if lib is not None:
        out = torch.empty(3, dtype=torch.float64)
        hist = torch.empty(HIST_BINS, dtype=torch.int64)
        lib.hwq_stats_hist(g.data_ptr(), n, out.data_ptr(), hist.data_ptr(), int(need), native.threads())
        s, ss, mx = out.tolist()
    else:
        d = g.detach().double()
        s, ss, mx = float(d.sum()), float((d * d).sum()), float(d.abs().max())
        hist = torch.bincount(_hist_bins(g.detach().abs()).reshape(-1).cpu().long(), minlength=HIST_BINS)
    if not (math.isfinite(s) and math.isfinite(ss) and math.isfinite(mx)):
        raise DataError("gradient holds NaN or infinite values (the training diverged)")
    mean = s / n
    return mean, math.sqrt(max(ss / n - mean * mean, 0.0)), mx, hist


def default_fraction(bits: int) -> float:
    """``1e-3 / (2^b - 1)``: the share of elements the ``search`` clip may saturate at ``b`` bits."""
    return 1e-3 / (2**bits - 1)


def _search_rows(mean: torch.Tensor, std: torch.Tensor, mx: torch.Tensor, hist: torch.Tensor, p: float,
                 n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``search`` rule for ``R`` rows of ``n`` elements at once: statistics ``[R]`` (float64), histograms
    ``[R, 1024]``; returns the clips ``[R]`` (float64) and the chosen ``k`` (``inf`` where none qualifies:
    ``c = max|g|``)."""
    above = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])  # above[r, b] = #elements in bin >= b
    c_out, k_out = mx.clone(), torch.full_like(mx, math.inf)
    done = (std == 0) | (n == 0)
    for k in SEARCH_K:
        c = mean.abs() + k * std
        b = _hist_bins(c.float()).long().clamp(0, HIST_BINS - 1)
        ok = ~done & (c < mx) & (above.gather(1, b[:, None])[:, 0] <= p * n)
        c_out = torch.where(ok, c, c_out)
        k_out = torch.where(ok, torch.full_like(k_out, k), k_out)
        done |= ok | (c >= mx)
    return c_out, k_out


def _tail_need(n: int, bits: int, fraction: float | None) -> int:
    """``floor(p * n) + 1``: a candidate qualifies when at most ``floor(p * n)`` elements lie in its bin or above,
    so only the histogram from the bin of the ``(floor(p * n) + 1)``-th largest element up decides the rule: below
    it every candidate fails, whatever the exact counts (what :func:`gradient_hist` ``need`` prunes)."""
    return math.floor((default_fraction(bits) if fraction is None else fraction) * n) + 1


def _search_is_max(n: int, bits: int, fraction: float | None) -> bool:
    """``p * n < 1``: then no candidate below ``max|g|`` can qualify (the largest element lies in its bin or
    above, so at least one would saturate), the search returns ``max|g|`` and needs no histogram."""
    return (default_fraction(bits) if fraction is None else fraction) * n < 1


def search_clip(mean: float, std: float, mx: float, hist: torch.Tensor, bits: int,
                fraction: float | None = None, *, n: int) -> tuple[float, float]:
    """``(c, k)`` of the ``search`` rule (see the module docstring) from one pass's statistics over ``n``
    elements; ``k = inf`` when no candidate qualifies and ``c = max|g|``."""
    p = default_fraction(bits) if fraction is None else fraction
    if std == 0 or n == 0:
        return mx, math.inf
    # the rule of _search_rows on Python floats (one tensor: no per-candidate tensor ops)
    above = list(itertools.accumulate(reversed(hist.tolist())))[::-1]  # above[b] = #elements in bin >= b
    for k in SEARCH_K:
        c = abs(mean) + k * std
        if c >= mx:
            break
        if above[min(_bin32(c), HIST_BINS - 1)] <= p * n:
            return c, k
    return mx, math.inf


def _bin32(v: float) -> int:
    """``bits(fl32(v)) >> 21`` for ``v >= 0`` (``inf`` above the float32 range, as a float64 -> float32 cast)."""
    try:
        return struct.unpack("<I", struct.pack("<f", v))[0] >> 21
    except OverflowError:
        return 0x7F800000 >> 21


_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_CHUNK = 1 << 20


def _i64(c: int) -> int:
    """The int64 with the bits of the uint64 ``c`` (torch's int64 arithmetic wraps modulo 2^64 like uint64)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def counter_uniforms(seed: int, n: int) -> torch.Tensor:
    """``u_i = (splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40) * 2^-24`` for ``i = 0 .. n-1``, float32 in
    ``[0, 1)``: the fused kernel's stochastic-rounding uniforms (``u01`` in ``csrc/hwq_kernels.c``), here in
    int64 torch ops in chunks of 2^20.  ``seed``: ``0 <= seed < 2^62``."""
    g, c1, c2 = (_i64(c) for c in _SPLITMIX)
    out = torch.empty(n, dtype=torch.float32)
    for lo in range(0, n, _CHUNK):
        z = torch.arange(lo + 1, min(n, lo + _CHUNK) + 1, dtype=torch.int64).mul_(g).add_(seed)
        z = (z ^ _lsr(z, 30)).mul_(c1)
        z = (z ^ _lsr(z, 27)).mul_(c2)
        z ^= _lsr(z, 31)
        out[lo:lo + z.numel()] = _lsr(z, 40).to(torch.float32).mul_(2.0**-24)
    return out


def _codes_torch(g: torch.Tensor, r: float | torch.Tensor, q: int, rounding: str, seed: int = 0) -> torch.Tensor:
    """Codes ``clamp(R(g * r), -q, q)`` as float32 (``r``: a float, or float32 multipliers broadcast to ``g``);
    ``stochastic``: ``floor(g * r + u)`` with :func:`counter_uniforms` of ``seed`` in ``g``'s memory order."""
    t = g.detach().float() * (r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=torch.float32))
    if rounding == "zero":
        return t.clamp_(-q, q).trunc_()
    if rounding == "stochastic":
        u = counter_uniforms(seed, t.numel()).to(t.device)
        # element i of g's memory is element i of u, as the kernel reads them (any dense layout)
        u = torch.as_strided(u, t.shape, t.stride()) if native.dense(t) else u.view(t.shape)
        return t.add_(u).floor_().clamp_(-q, q)
    return round_(t, rounding, None).clamp_(-q, q)


def _dsgc_clip(g: torch.Tensor, bits: int, mx: float, rounding: str) -> float:
    """Clip maximising cos(g, g_hat) on a strided subsample (see the module docstring), every candidate from
    one sort (:func:`_dsgc_cosines`); the first of equal cosines wins."""
    flat = g.detach().reshape(-1).float()
    if flat.numel() > _DSGC_SAMPLES:
        flat = flat[:: flat.numel() // _DSGC_SAMPLES][:_DSGC_SAMPLES]
    q = 2 ** (bits - 1) - 1
    if float(flat.norm()) == 0.0:
        return mx
    cands = [mx * 2.0 ** (-j / 4) for j in range(_DSGC_GRID)]
    cands = [cv for cv in cands if float(torch.tensor(cv / q, dtype=torch.float32)) > 0]  # (subnormal max|g|)
    if not cands:
        return mx
    metric_rounding = "nearest" if rounding == "stochastic" else rounding  # a deterministic metric
    cos = _dsgc_cosines(flat.cpu(), _multipliers(torch.tensor(cands, dtype=torch.float64), q), q, metric_rounding)
    return cands[int(torch.argmax(cos))]


def _dsgc_cosines(flat: torch.Tensor, r: torch.Tensor, q: int, rounding: str) -> torch.Tensor:
    """``cos(g, codes_j)`` (the step does not change a cosine) for the float32 multipliers ``r`` (one per
    candidate), ``codes_j = clamp(R(fl32(g * r_j)), -q, q)`` with ``R`` = ``zero`` or ``nearest`` (half to even).

    Both roundings are odd and monotone, so on ``a = sort(|g|)`` the codes are a step function: with ``t_jk``
    the smallest float32 ``a`` whose code is ``>= k`` (found exactly: a float estimate moved by ulps until the
    rounding itself says it is the boundary), ``sum_i |g_i| |code_i| = sum_k sum(a >= t_jk)`` and
    ``sum_i code_i^2 = sum_k (2k - 1) #(a >= t_jk)`` - one sort and ``len(r) * q`` binary searches instead of
    a ``len(r) x n`` code matrix (the same cosines as the codes give, up to float64 summation order)."""
    a, _ = flat.abs().sort()
    n = a.numel()
    suffix = torch.cat([a.double().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    norm = float(a.double().pow(2).sum().sqrt())
    k = torch.arange(1, q + 1, dtype=torch.float32)
    rr = r.float().unsqueeze(1)  # (candidates, 1)

    def code_ge(t: torch.Tensor) -> torch.Tensor:  # R(fl32(t * r)) >= k, elementwise over (candidates, q)
        return round_(t * rr, rounding) >= k

    t = ((k - (0.5 if rounding == "nearest" else 0.0)).double() / r.double().unsqueeze(1)).float()
    inf, zero = torch.tensor(math.inf), torch.tensor(0.0)
    for _ in range(4):  # down while the float below is still in the code's set, up while t is not
        below = torch.nextafter(t, zero)
        move = code_ge(below) & (t > 0)
        if not bool(move.any()):
            break
        t = torch.where(move, below, t)
    for _ in range(4):
        move = ~code_ge(t)
        if not bool(move.any()):
            break
        t = torch.where(move, torch.nextafter(t, inf), t)
    if not bool((code_ge(t) & ~(code_ge(torch.nextafter(t, zero)) & (t > 0))).all()):  # pragma: no cover
        raise RuntimeError("DSGC: a code boundary was not found within 4 ulps")
    idx = torch.searchsorted(a, t.reshape(-1), side="left").reshape(t.shape)  # first element >= t_jk
    count = (n - idx).double()
    dot = suffix[idx].sum(dim=1)
    nh = (count * (2 * k.double() - 1)).sum(dim=1).sqrt()
    return torch.where(nh > 0, dot / (norm * nh), torch.full_like(nh, -1.0))


def gradient_clip(g: torch.Tensor, bits: int = 8, clip: str = "zscore", k: float = 3.0,
                  rounding: str = "zero", *, fraction: float | None = None) -> float:
    """The clip value ``c`` of ``g`` under ``clip`` (see the module docstring; ``fraction``: ``search``'s
    ``p``)."""
    _check(bits, rounding, clip, k, fraction)
    if clip == "search":
        if _search_is_max(g.numel(), bits, fraction):
            return gradient_stats(g)[2]
        return search_clip(*gradient_hist(g, _tail_need(g.numel(), bits, fraction)), bits, fraction, n=g.numel())[0]
    mean, std, mx = gradient_stats(g)
    if clip == "max":
        return mx
    if clip == "zscore":
        return min(mx, abs(mean) + k * std)
    return _dsgc_clip(g, bits, mx, rounding)


def _multipliers(c: torch.Tensor, q: int) -> torch.Tensor:
    """``fl32(q / c)`` per element of the clips ``c`` (float64), raised by one ulp where ``fl32(c) * r < q``
    (see the module docstring); float32."""
    r = (q / c).float()
    return torch.where(c.float() * r < q, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _multiplier(c: float, q: int) -> float:
    """:func:`_multipliers` of one clip value."""
    return float(_multipliers(torch.tensor([c], dtype=torch.float64), q)[0])


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _output_kind(g: torch.Tensor, bits: int, kind: str, out: torch.Tensor | None) -> tuple[torch.dtype, int]:
    """The output dtype (``g``'s for ``kind="float"``, int8 codes up to 8 bits, else int16) and the kernels'
    output code (0 int8, 1 int16, 2 float); checks a given ``out`` buffer against them."""
    want = g.dtype if kind == "float" else (torch.int8 if bits <= 8 else torch.int16)
    if out is not None and (out.dtype != want or out.shape != g.shape or out.stride() != g.stride()):
        raise ConfigError(f"out must be a {want} tensor of g's shape and strides {tuple(g.shape)}")
    return want, 2 if kind == "float" else (0 if bits <= 8 else 1)


def _quantize(g, bits, rounding, clip, k, generator, kind, c=None, out=None, fraction=None):
    _check(bits, rounding, clip, k, fraction)
    if c is None:
        c = gradient_clip(g, bits, clip, k, rounding, fraction=fraction)
    q = 2 ** (bits - 1) - 1
    if c <= 0:  # an all-zero gradient: codes 0 with the smallest normal step
        c = torch.finfo(torch.float32).tiny * q
    s = torch.tensor(c / q, dtype=torch.float32)
    r = _multiplier(c, q)
    sf = float(s)
    want, code = _output_kind(g, bits, kind, out)
    lib = native_kernels() if _fast(g) else None
    seed = _seed_from(generator) if rounding == "stochastic" else 0  # one draw on either path
    if lib is not None:
        if out is None:
            out = torch.empty_like(g, dtype=want)  # same memory layout: the kernel maps element i to i
        lib.hwq_gq(g.data_ptr(), out.data_ptr(), g.numel(), r, sf, float(q), _MODE[rounding], code, seed,
                   native.threads())
        return out, s
    t = _codes_torch(g, r, q, rounding, seed)
    t = t.mul_(sf).to(want) if kind == "float" else t.to(want)
    if out is not None:
        return out.copy_(t), s
    return t, s


def quantize_gradient(g: torch.Tensor, bits: int = 8, rounding: str = "zero", clip: str = "zscore",
                      k: float = 3.0, generator: torch.Generator | None = None, *,
                      out: torch.Tensor | None = None, fraction: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor gradient codes and step: ``(codes, scale)``, ``codes`` int8 (``bits <= 8``) or int16 in
    ``[-(2^(b-1)-1), 2^(b-1)-1]``, ``scale`` a 0-d float32 tensor; ``g ~ codes * scale``.  ``out``: a
    buffer for the codes (reused across steps it saves the page faults of a fresh tensor).

    >>> codes, s = quantize_gradient(torch.tensor([0.5, -0.26, 0.1, 1.0]), bits=4, clip="max")
    >>> codes.tolist(), float(s)
    ([3, -1, 0, 7], 0.1428571492433548)
    """
    return _quantize(g, bits, rounding, clip, k, generator, "codes", out=out, fraction=fraction)


def dequantize_gradient(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` as float32."""
    return codes.to(torch.float32) * scale.to(torch.float32)


def fake_quantize_gradient(g: torch.Tensor, bits: int = 8, rounding: str = "zero", clip: str = "zscore",
                           k: float = 3.0, generator: torch.Generator | None = None,
                           clip_value: float | None = None, *, fraction: float | None = None
                           ) -> tuple[torch.Tensor, float]:
    """``(codes * scale, c)`` in ``g``'s dtype, in one pass after the statistics (what training uses).

    ``clip_value`` skips the statistics and uses that ``c``.
    """
    if clip_value is None:
        clip_value = gradient_clip(g, bits, clip, k, rounding, fraction=fraction)
    out, _ = _quantize(g, bits, rounding, clip, k, generator, "float", c=clip_value, fraction=fraction)
    return out, clip_value


def _rows_dense(g: torch.Tensor) -> bool:
    """Each row (index of dim 0) of ``g`` is one contiguous block of memory, rows one after another: true for
    contiguous and channels-last tensors (the batch axis is outermost in both)."""
    return g.dim() >= 1 and g.shape[0] > 0 and (g.shape[0] == 1 or g.stride(0) == g.numel() // g.shape[0])


def row_clips(g: torch.Tensor, bits: int = 8, clip: str = "zscore", k: float = 3.0, *,
              fraction: float | None = None) -> torch.Tensor:
    """Per-sample clip values ``[N]`` (float64) of ``g`` (``N`` = ``g.shape[0]``): each row's own ``zscore``,
    ``search`` or ``max`` clip, computed exactly as :func:`gradient_clip` would on that row alone."""
    if clip == "dsgc":
        raise ConfigError("per-sample gradient scaling supports the zscore, search and max clips, not dsgc")
    n = g.shape[0]
    m = g.numel() // n if n else 0
    if clip == "search" and _search_is_max(m, bits, fraction):
        clip = "max"  # the same result without the histogram
    lib = native_kernels() if _fast(g) and _rows_dense(g) else None
    hist = None
    if lib is not None:
        out = torch.empty(n, 3, dtype=torch.float64)
        if clip == "search":
            hist = torch.empty(n, HIST_BINS, dtype=torch.int64)
        lib.hwq_row_stats(g.data_ptr(), n, m, out.data_ptr(), 0 if hist is None else hist.data_ptr(),
                          _tail_need(m, bits, fraction), native.threads())
        sums, sq, mx = out[:, 0], out[:, 1], out[:, 2]
    else:
        d = g.detach().reshape(n, -1).double()
        sums, sq, mx = d.sum(1), d.pow(2).sum(1), d.abs().amax(1)
    if not (torch.isfinite(sums).all() and torch.isfinite(sq).all() and torch.isfinite(mx).all()):
        raise DataError("gradient holds NaN or infinite values (the training diverged)")
    mean = sums / max(m, 1)
    std = (sq / max(m, 1) - mean.pow(2)).clamp_min(0).sqrt()
    if clip == "max":
        return mx
    if clip == "zscore":
        return torch.minimum(mx, mean.abs() + k * std)
    if hist is None:
        bins = _hist_bins(g.detach().reshape(n, -1).abs()).long()
        hist = torch.zeros(n, HIST_BINS, dtype=torch.int64).scatter_add_(1, bins, torch.ones_like(bins))
    return _search_rows(mean, std, mx, hist, default_fraction(bits) if fraction is None else fraction, m)[0]


def _quantize_rows(g, bits, rounding, clip, k, generator, kind, out=None, fraction=None):
    """Per-row codes (``kind="codes"``: int8 for ``bits <= 8``, else int16) or ``codes * scale`` (``"float"``,
    ``g``'s dtype), written into ``out`` when given; returns ``(tensor, clips [N] float64, steps [N] float32)``."""
    _check(bits, rounding, clip, k, fraction)
    q = 2 ** (bits - 1) - 1
    c = row_clips(g, bits, clip, k, fraction=fraction)
    c = torch.where(c > 0, c, torch.full_like(c, torch.finfo(torch.float32).tiny * q))
    s = (c / q).float()
    r = _multipliers(c, q)
    want, code = _output_kind(g, bits, kind, out)
    lib = native_kernels() if _fast(g) and _rows_dense(g) and rounding in ("zero", "nearest") else None
    if lib is not None:
        y = torch.empty_like(g, dtype=want) if out is None else out  # same layout: row i of y is row i of g
        lib.hwq_gq_rows(g.data_ptr(), y.data_ptr(), g.shape[0], g.numel() // g.shape[0], r.data_ptr(), s.data_ptr(),
                        float(q), _MODE[rounding], code, native.threads())
        return y, c, s
    shape = (-1,) + (1,) * (g.dim() - 1)
    seed = _seed_from(generator) if rounding == "stochastic" else 0
    t = _codes_torch(g, r.view(shape), q, rounding, seed)
    t = t.mul_(s.view(shape)).to(g.dtype) if kind == "float" else t.to(want)
    if out is not None:
        return out.copy_(t), c, s
    return t, c, s


def quantize_gradient_rows(g: torch.Tensor, bits: int = 8, rounding: str = "zero", clip: str = "zscore",
                           k: float = 3.0, generator: torch.Generator | None = None, *,
                           out: torch.Tensor | None = None, fraction: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample codes and steps: ``(codes, scales)``, ``codes`` int8 (``bits <= 8``) or int16 of ``g``'s shape
    and layout, ``scales`` float32 ``[N]`` (one per row of the batch axis 0); ``g[i] ~ codes[i] * scales[i]``,
    every row quantized as :func:`quantize_gradient` would quantize it alone.  ``out``: a reused code buffer.

    >>> codes, s = quantize_gradient_rows(torch.tensor([[0.5, -0.26, 1.0], [0.01, 0.02, -0.04]]), 4, clip="max")
    >>> codes.tolist(), s.tolist()
    ([[3, -1, 7], [1, 3, -7]], [0.1428571492433548, 0.0057142856530845165])
    """
    codes, _, s = _quantize_rows(g, bits, rounding, clip, k, generator, "codes", out=out, fraction=fraction)
    return codes, s


def fake_quantize_gradient_rows(g: torch.Tensor, bits: int = 8, rounding: str = "zero", clip: str = "zscore",
                                k: float = 3.0, generator: torch.Generator | None = None, *,
                                fraction: float | None = None, out: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scaling: ``(codes * scale, c)`` with one clip ``c[n]`` (and step ``c[n] / Q``) per row of
    ``g`` (the batch axis 0 of an error gradient), each row quantized as :func:`fake_quantize_gradient` would
    quantize it alone (same multiplier rule, rounding and clamp).  ``out``: a reused float buffer."""
    y, c, _ = _quantize_rows(g, bits, rounding, clip, k, generator, "float", out=out, fraction=fraction)
    return y, c
