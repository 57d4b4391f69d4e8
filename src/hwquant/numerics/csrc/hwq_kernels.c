/* hwquant's fused CPU kernels (fake quantization, its backward, gradient statistics and quantization).
 * Compiled at first use by hwquant.numerics.native (cc -O3 [-march=native] -fopenmp -std=c99) and called
 * through ctypes; the torch path of hwquant.numerics is the oracle every entry point is tested against. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
/* mask states: 0 clipped low, 1 in range (gradient passes), 2 clipped high.  NaN -> 0. */
/* elementwise loops: threads above 32768 elements, SIMD always (a bare if() would also switch SIMD off below it,
   OpenMP 5: 20-30x slower for small tensors, measured) */
#define PAR _Pragma("omp parallel for simd schedule(static) num_threads(nt) if(parallel: n > 32768)")
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

/* ReLU then per-tensor fake quantization, zero point 0, in one pass: the same float32 operations as torch.relu
   (which keeps -0.0 and NaN) followed by hwq_fq, and a mask state that also holds ReLU's gradient rule (grad
   passes where relu(x) > 0, as torch's threshold_backward on ReLU's result): state 1 only where xr > 0 and
   the code is in range */
void hwq_fq_relu(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t n, float r, float s,
                 float lo, float hi, int nt) {
  if (m == 0) {
    PAR for (int64_t i = 0; i < n; i++) {
      float xr = x[i] < 0.0f ? 0.0f : x[i]; y[i] = clampf(rintf(xr * r), lo, hi) * s;
    }
  } else {
    PAR for (int64_t i = 0; i < n; i++) {
      float xr = x[i] < 0.0f ? 0.0f : x[i];
      float v = rintf(xr * r); m[i] = xr > 0.0f ? state(v, lo, hi) : 0; y[i] = clampf(v, lo, hi) * s;
    }
  }
}

/* A ReLU whose output r also has one other reader, and its quantized copy y, in one pass: r = torch.relu(x),
   y = hwq_fq(r) (zero point 0), and one mask state for both gradients: 0 where r <= 0 (ReLU passes nothing),
   1 where r > 0 and the code is in range (both gradients pass), 2 elsewhere (r > 0 clipped, or NaN: only the
   other reader's gradient passes, as torch's threshold_backward lets NaN through) */
void hwq_relu_fq2(const float *restrict x, float *restrict r, float *restrict y, uint8_t *restrict m, int64_t n,
                  float rr, float s, float lo, float hi, int nt) {
  PAR for (int64_t i = 0; i < n; i++) {
    float xr = x[i] < 0.0f ? 0.0f : x[i];
    float v = rintf(xr * rr);
    r[i] = xr; y[i] = clampf(v, lo, hi) * s; m[i] = xr <= 0.0f ? 0 : (state(v, lo, hi) == 1 ? 1 : 2);
  }
}

/* its backward: the gradient of x from the other reader's gradient gr and the quantized copy's gy, as autograd
   computes it unfused (the straight-through gradient, the sum of the two, then ReLU's rule) */
void hwq_relu_fq2_bwd(const float *restrict gr, const float *restrict gy, const uint8_t *restrict m,
                      float *restrict gx, int64_t n, int nt) {
  PAR for (int64_t i = 0; i < n; i++) gx[i] = m[i] == 0 ? 0.0f : gr[i] + (m[i] == 1 ? gy[i] : 0.0f);
}

/* one block of n elements with one reciprocal r and step s (a channel of the per-channel kernels); m may be 0 */
static inline void fq_block(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t n, float r,
                            float s, float lo, float hi) {
  if (m) {
    for (int64_t i = 0; i < n; i++) {
      float v = rintf(x[i] * r); m[i] = state(v, lo, hi); y[i] = clampf(v, lo, hi) * s;
    }
  } else {
    for (int64_t i = 0; i < n; i++) y[i] = clampf(rintf(x[i] * r), lo, hi) * s;
  }
}

/* per channel along the outermost memory dimension: C blocks of `inner` elements, reciprocal r[c], step s[c] */
void hwq_fq_pc(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t C, int64_t inner,
               const float *restrict r, const float *restrict s, float lo, float hi, int nt) {
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(C * inner > 32768)")
  for (int64_t c = 0; c < C; c++) {
    fq_block(x + c * inner, y + c * inner, m ? m + c * inner : 0, inner, r[c], s[c], lo, hi);
  }
}

/* A weight quantizer's whole forward in one call (range_mode "dynamic", signed, per output channel along the
   outermost memory dimension): per channel the peak p = max|x| (NaN if the channel holds one, as torch's
   amin / amax), the step s = max(fl32(fl32(ratio[c] * p) / q), tiny) (torch.mul, div_ and clamp_min_ on
   float32), written to scale[c], then hwq_fq_pc's quantization with r = fl32(1 / s).  With a bias b (else
   b = 0): its codes at the accumulator step s_b = fl32(sa * s) in the same call (yb, mb: as hwq_fq_pc) */
void hwq_fq_pc_dyn(const float *restrict x, float *restrict y, uint8_t *restrict m, int64_t C, int64_t inner,
                   const float *restrict ratio, float q, float tiny, float *restrict scale, float lo, float hi,
                   const float *restrict b, float *restrict yb, uint8_t *restrict mb, float sa, float blo,
                   float bhi, int nt) {
  _Pragma("omp parallel for schedule(static) num_threads(nt) if(C * inner > 32768)")
  for (int64_t c = 0; c < C; c++) {
    const float *restrict xc = x + c * inner;
    float p = 0.0f;
    int nan = 0;
    _Pragma("omp simd reduction(max:p) reduction(|:nan)")  /* max is exact in any order */
    for (int64_t i = 0; i < inner; i++) { float a = fabsf(xc[i]); p = a > p ? a : p; nan |= a != a; }
    float sc = ratio[c] * (nan ? NAN : p);
    sc = sc / q;
    sc = sc < tiny ? tiny : sc;
    scale[c] = sc;
    fq_block(xc, y + c * inner, m ? m + c * inner : 0, inner, 1.0f / sc, sc, lo, hi);
    if (b) { const float sb = sa * sc; fq_block(b + c, yb + c, mb ? mb + c : 0, 1, 1.0f / sb, sb, blo, bhi); }
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
  /* the bare if() keeps this reduction scalar, in index order, below 32768 elements: the sums LSQ / PACT runs
     were trained with (if(parallel: ...) would vectorize it and change the order of the additions) */
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

/* sum, sum of squares and max|x| of x[0..n) into out[0..2]: each HBLOCK block summed on its own (by whichever
   thread), then the block sums added in block order, so the result does not depend on the thread count */
static void block_sums(const float *restrict x, int64_t n, int64_t k, double *restrict part, float *restrict mx) {
  int64_t lo = k * HBLOCK, len = n - lo < HBLOCK ? n - lo : HBLOCK;
  double ls = 0.0, lss = 0.0;
  stats_block(x + lo, len, &ls, &lss, mx);
  part[2 * k] = ls; part[2 * k + 1] = lss;
}

static void add_blocks(const double *restrict part, int64_t nb, double *restrict out) {
  double s = 0.0, ss = 0.0;
  for (int64_t k = 0; k < nb; k++) { s += part[2 * k]; ss += part[2 * k + 1]; }
  out[0] = s; out[1] = ss;
}

void hwq_stats(const float *restrict x, int64_t n, double *restrict out, int nt) {
  int64_t nb = (n + HBLOCK - 1) / HBLOCK;
  double one[2];
  double *part = nb > 1 ? (double *)malloc((size_t)nb * 2 * sizeof(double)) : one;
  float mx = 0.0f;
  if (!part) { out[0] = out[1] = out[2] = NAN; return; }
  _Pragma("omp parallel num_threads(nt) if(n > 32768)")
  {
    float lmx = 0.0f;
    _Pragma("omp for schedule(static) nowait")
    for (int64_t k = 0; k < nb; k++) block_sums(x, n, k, part, &lmx);
    _Pragma("omp critical")
    { mx = lmx > mx ? lmx : mx; }
  }
  add_blocks(part, nb, out);
  out[2] = (double)mx;
  if (part != one) free(part);
}

/* hwq_stats and, in the same pass over memory, hist = the histogram tail of |x| (see tail_add; bins below the
   largest per-thread floor are 0, the sum of the threads' exact counts above it) - the z-score clip search's
   clipped-fraction counts; blocks of HBLOCK elements (statistics, then the histogram of the cached block) */
void hwq_stats_hist(const float *restrict x, int64_t n, double *restrict out, int64_t *restrict hist, int64_t need,
                    int nt) {
  float mx = 0.0f;
  uint32_t floor = 0;
  for (int b = 0; b < 1024; b++) hist[b] = 0;
  int64_t nb = (n + HBLOCK - 1) / HBLOCK;
  double one[2];
  double *part = nb > 1 ? (double *)malloc((size_t)nb * 2 * sizeof(double)) : one;
  if (!part) { out[0] = out[1] = out[2] = NAN; return; }
  _Pragma("omp parallel num_threads(nt) if(n > 32768)")
  {
    tailhist t;
    tail_init(&t);
    float lmx = 0.0f;
    _Pragma("omp for schedule(static) nowait")
    for (int64_t k = 0; k < nb; k++) {
      int64_t lo = k * HBLOCK, len = n - lo < HBLOCK ? n - lo : HBLOCK;
      block_sums(x, n, k, part, &lmx);
      tail_add(x + lo, len, &t, need);
    }
    _Pragma("omp critical")
    {
      mx = lmx > mx ? lmx : mx;
      floor = t.floor > floor ? t.floor : floor;
      for (int b = 0; b < 1024; b++) hist[b] += t.h[b];
    }
  }
  for (uint32_t b = 0; b < floor; b++) hist[b] = 0;  /* exact only from the highest floor up */
  add_blocks(part, nb, out);
  out[2] = (double)mx;
  if (part != one) free(part);
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


/* Integer requantization (hwquant.export.intops, op "requant"):
   q = clamp(rne((v * m_c) / 2^n_c), lo, hi) for int64 values v laid out as [outer][C][inner], the multiplier
   m_c and shift n_c of channel c (C = 1: per tensor).  rne rounds half to even, as numerics.window.rshift_rne:
   (p + 2^(n-1) - 1 + ((p >> n) & 1)) >> n, with p >> n the arithmetic shift (floor); |p| < 2^62 (the
   converter picks m so), so the sum stays in range.  n == 0: p itself. */
static inline int64_t rq1(int64_t v, int64_t m, int64_t n, int64_t half_m1, int64_t lo, int64_t hi) {
  int64_t p = v * m;
  int64_t q = n > 0 ? (p + half_m1 + ((p >> n) & 1)) >> n : p;
  return q < lo ? lo : (q > hi ? hi : q);
}

void hwq_requant(const int64_t *restrict v, int64_t *restrict q, int64_t outer, int64_t C, int64_t inner,
                 const int64_t *restrict m, const int64_t *restrict n, int64_t lo, int64_t hi, int nt) {
  if (inner == 1) {
#pragma omp parallel for num_threads(nt) schedule(static) if(outer * C > 32768)
    for (int64_t o = 0; o < outer; o++) {
      const int64_t *restrict vp = v + o * C;
      int64_t *restrict qp = q + o * C;
      for (int64_t c = 0; c < C; c++) {
        const int64_t nc = n[c];
        qp[c] = rq1(vp[c], m[c], nc, nc > 0 ? ((int64_t)1 << (nc - 1)) - 1 : 0, lo, hi);
      }
    }
    return;
  }
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static) if(outer * C * inner > 32768)
  for (int64_t o = 0; o < outer; o++) {
    for (int64_t c = 0; c < C; c++) {
      const int64_t mc = m[c], nc = n[c], h = nc > 0 ? ((int64_t)1 << (nc - 1)) - 1 : 0;
      const int64_t *restrict vp = v + (o * C + c) * inner;
      int64_t *restrict qp = q + (o * C + c) * inner;
      for (int64_t i = 0; i < inner; i++) qp[i] = rq1(vp[i], mc, nc, h, lo, hi);
    }
  }
}

/* Integer add of two values at one scale (hwquant.export.intops, op "add"): out = a * ka_c + b * kb_c, the
   same [outer][C][inner] layout for a, b and out (C = 1: per tensor).  Exact: the caller keeps |out| < 2^62. */
void hwq_add2(const int64_t *restrict a, const int64_t *restrict b, int64_t *restrict out, int64_t outer,
              int64_t C, int64_t inner, const int64_t *restrict ka, const int64_t *restrict kb, int nt) {
  if (inner == 1) {
#pragma omp parallel for num_threads(nt) schedule(static) if(outer * C > 32768)
    for (int64_t o = 0; o < outer; o++)
      for (int64_t c = 0; c < C; c++) out[o * C + c] = a[o * C + c] * ka[c] + b[o * C + c] * kb[c];
    return;
  }
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static) if(outer * C * inner > 32768)
  for (int64_t o = 0; o < outer; o++) {
    for (int64_t c = 0; c < C; c++) {
      const int64_t x = ka[c], y = kb[c], base = (o * C + c) * inner;
      for (int64_t i = 0; i < inner; i++) out[base + i] = a[base + i] * x + b[base + i] * y;
    }
  }
}
