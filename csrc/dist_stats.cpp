// fastdiag::dist_stats_cpu - the C++ backend (at::parallel_for, OpenMP) of fastdiag.ops.dist_stats.
//
// Contract: fastdiag/ops/_dist_stats.py (definitions, slots) and _dist_stats_torch.py (the
// executable spec). One read of the canonical view x4 [A, G, C, N] (any strides, int64
// offsets): per head row a max pass then an exp pass for logits (the row is hot in cache),
// per-head statistics on the fly while the head mean accumulates in a per-thread buffer (rows
// are taken in tiles, read head by head: see tile_rows), then one statistics pass over the
// mean row, top-k, and the future / local mass sums over sub-ranges of the (cached) row.
// want_heads = false compiles a second instantiation (HEADS = false) whose head loop only
// accumulates the head mean: no per-head logarithm, max, count or sum of squares.
//
// Determinism: rows are cut into fixed blocks (the cut depends on the shape only, never on the
// thread count); each block writes float64 partials, combined afterwards in block order.
// Per-row values are float32 (16-lane vector accumulators), sums across rows float64.
//
// SIMD: GCC / Clang vector extensions (16 x float32), so the same code compiles for AVX-512,
// AVX2, SSE or NEON; AVX-512 intrinsics only where they pay (table log, masked tails, lane
// masks). log and exp are branch-free vector versions (see vlog / vexp_nonpos).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// ---- layout of the outputs (mirrors fastdiag/ops/_dist_stats.py: Slot, HeadSlot, RowSlot) ----
enum Slot : int {
  kCount = 0,
  kEntropy,
  kEntropySq,
  kMax,
  kMaxSq,
  kSumsq,
  kGtTau,
  kGtEps,
  kRowsumErr,
  kRowsumErrMax,
  kFuture,
  kFutureMax,
  kLocal,
  kAbsDev,
  kNonfinite,
  kMasked,
  kNumSlots
};
enum HeadSlot : int { kHeadEntropy = 0, kHeadMax, kHeadGtTau, kHeadSumsq, kNumHeadSlots };
enum RowSlot : int { kRowEntropy = 0, kRowMax, kRowGtEps, kRowSumsq, kNumRowSlots };
constexpr int64_t kMaxTopk = 16;

// ---- 16-lane float vectors ----
constexpr int64_t W = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
inline __mmask16 first_lanes(int64_t rem) { return static_cast<__mmask16>((1u << rem) - 1u); }
// Lanes [0, rem) from p, the others 0.
inline vf load_partial(const float* p, int64_t rem) {
  return (vf)_mm512_maskz_loadu_ps(first_lanes(rem), p);
}
inline void store_partial(float* p, vf v, int64_t rem) {
  _mm512_mask_storeu_ps(p, first_lanes(rem), (__m512)v);
}
inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
inline int64_t hcount(vi v) { return _mm512_reduce_add_epi32((__m512i)v); }
// Bit l set when lane l of v is >= t.
inline uint32_t lanes_ge(vf v, float t) {
  return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_GE_OQ);
}
#else
inline vf load_partial(const float* p, int64_t rem) {
  float t[W] = {0.f};
  std::memcpy(t, p, sizeof(float) * rem);
  return loadv(t);
}
inline void store_partial(float* p, vf v, int64_t rem) {
  float t[W];
  storev(t, v);
  std::memcpy(p, t, sizeof(float) * rem);
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline int64_t hcount(vi v) {
  int64_t s = 0;
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}
inline uint32_t lanes_ge(vf v, float t) {
  uint32_t m = 0;
  for (int l = 0; l < W; ++l) m |= static_cast<uint32_t>(v[l] >= t) << l;
  return m;
}
#endif
inline vi lanes_below(int64_t rem) {
  const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota < static_cast<int32_t>(rem);
}

#if defined(__AVX512F__)
// Natural log for normal positive x: x = m 2^e (vgetexpps / vgetmantps, m in [1, 2)), m / c with
// c = 1 + i/32 picked by the top 5 mantissa bits (i = 0) or the interval's midpoint (i > 0),
// a two-register table lookup: log x = e ln2 + log c + log1p(r), |r| <= 1/32, cubic series:
// absolute error < 2.5e-7 (< 2e-8 but for m in [1, 1 + 1/32)), exact 0 at x = 1.
struct LogTable {
  alignas(64) float inv_c[32];
  alignas(64) float log_c[32];
  LogTable() {
    for (int i = 0; i < 32; ++i) {
      const double c = i == 0 ? 1.0 : 1.0 + (i + 0.5) / 32.0;
      inv_c[i] = static_cast<float>(1.0 / c);
      log_c[i] = static_cast<float>(-std::log(static_cast<double>(inv_c[i])));
    }
  }
};
const LogTable kLogTable;

inline vf vlog(vf x) {
  const __m512 xx = (__m512)x;
  const __m512 e = _mm512_getexp_ps(xx);
  const vf m = (vf)_mm512_getmant_ps(xx, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512i idx = (__m512i)((vi)x >> 18);  // the lookups use the low 5 bits only
  const vf inv_c = (vf)_mm512_permutex2var_ps(_mm512_load_ps(kLogTable.inv_c), idx,
                                                _mm512_load_ps(kLogTable.inv_c + 16));
  const vf log_c = (vf)_mm512_permutex2var_ps(_mm512_load_ps(kLogTable.log_c), idx,
                                                _mm512_load_ps(kLogTable.log_c + 16));
  const vf r = m * inv_c - 1.0f;
  vf q = r * 0.333333343f - 0.5f;
  q = q * r + 1.0f;
  const vf y = q * r + log_c;
  return (vf)e * 0.693147182f + y;
}
inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
// Natural log for normal positive x (Cephes-style: x = m 2^e, m in [sqrt(1/2), sqrt(2)),
// degree-8 polynomial in m - 1, about 1 ulp).
inline vf vlog(vf x) {
  const vi bits = (vi)x;
  const vi shifted = bits - 0x3f3504f3;  // sqrt(1/2)
  const vi e = shifted >> 23;
  const vf m = (vf)(bits - (e << 23));
  const vf f = m - 1.0f;
  const vf z = f * f;
  vf y = 7.0376836292e-2f * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 0.5f * z;
  const vf fe = __builtin_convertvector(e, vf);
  return fe * 0.693359375f + (f + (y - 2.12194440e-4f * fe));
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
#endif

// x log x with 0 for non-positive x: the log's argument is clamped to the smallest normal
// float, its multiplier to 0, so 0 log 0 = 0 exactly (also with denormals flushed); subnormal
// entries use log(FLT_MIN), an absolute error below 3e-37 each.
inline vf vxlogx(vf x) { return vmax(x, splat(0.f)) * vlog(vmax(x, splat(1.17549435e-38f))); }

// exp(t) for t <= 0 (t = -inf gives 0), about 1 ulp, subnormal results rounded once; t is
// clamped to [-104, 0] so the float -> int conversion below stays in range (padding lanes).
inline vf vexp_nonpos(vf t) {
  t = t > -104.f ? t : splat(-104.f);
  t = t < 0.f ? t : splat(0.f);
  const vf big = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (t * 1.44269504089f + big) - big;
  vf r = t - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const vf r2 = r * r;
  vf p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // 2^n as 2^n1 * 2^n2 with both halves normal, so results down to 2^-150 are rounded once.
  const vi ni = __builtin_convertvector(n, vi);
  const vi n1 = ni >> 1;
  const vi n2 = ni - n1;
  return (p * (vf)((n1 + 127) << 23)) * (vf)((n2 + 127) << 23);
}

// ---- input element types (read as raw bits, converted to float32) ----
struct F32 {
  using raw = float;
  static float cvt(float v) { return v; }
};
struct F64 {
  using raw = double;
  static float cvt(double v) { return static_cast<float>(v); }
};
struct BF16 {
  using raw = uint16_t;
  static float cvt(uint16_t h) {
    const uint32_t b = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
  }
};
struct F16 {
  using raw = uint16_t;
  // Exact half -> float: shift the exponent/mantissa into place and rescale by 2^112
  // (handles subnormal halves), inf / NaN patched separately.
  static float cvt(uint16_t h) {
    const uint32_t em = h & 0x7fffu;
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t b;
    if (em >= 0x7c00u) {
      b = sign | 0x7f800000u | ((em & 0x3ffu) << 13);
    } else {
      float f;
      const uint32_t s = em << 13;
      std::memcpy(&f, &s, sizeof f);
      f *= 0x1p112f;
      std::memcpy(&b, &f, sizeof b);
      b |= sign;
    }
    float out;
    std::memcpy(&out, &b, sizeof out);
    return out;
  }
};

inline vf cvt16(const uint16_t* src, BF16) {
  vh h;
  std::memcpy(&h, src, sizeof h);
  const vu b = __builtin_convertvector(h, vu) << 16;
  return (vf)b;
}
inline vf cvt16(const uint16_t* src, F16) {
  vh h;
  std::memcpy(&h, src, sizeof h);
  const vu u = __builtin_convertvector(h, vu);
  const vu em = u & 0x7fffu;
  const vu sign = (u & 0x8000u) << 16;
  const vu shifted = em << 13;
  const vf scaled = (vf)shifted * 0x1p112f;
  const vu fin = (vu)scaled;
  const vu special = 0x7f800000u | ((em & 0x3ffu) << 13);
  const vu out = (em >= 0x7c00u ? special : fin) | sign;
  return (vf)out;
}

// Prefetch (into L2) of the line holding p: rows are visited head by head, G strided streams
// per row, too many for the hardware prefetcher; the next row is fetched while this one is used.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// One head row as float32: the source itself when it already is contiguous float32 (then *pf
// is left for the caller's pass to prefetch), else converted into dst (prefetching *pf, the
// same head of the next row, on the way; *pf is then cleared).
template <typename T>
const float* load_row(const typename T::raw* src, int64_t stride, int64_t n, float* dst,
                      const typename T::raw*& pf) {
  if constexpr (std::is_same_v<T, F32>) {
    if (stride == 1) return src;
  }
  if (stride == 1) {
    int64_t j = 0;
    if constexpr (std::is_same_v<T, BF16> || std::is_same_v<T, F16>) {
      for (; j + W <= n; j += W) {
        if (pf) prefetch(pf + j);
        storev(dst + j, cvt16(src + j, T{}));
      }
    }
    for (; j < n; ++j) {
      if (pf && j % W == 0) prefetch(pf + j);
      dst[j] = T::cvt(src[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = T::cvt(src[j * stride]);
  }
  pf = nullptr;
  return dst;
}

bool all_finite(const float* q, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (!std::isfinite(q[j])) return false;
  return true;
}

// ---- per-row passes ----

struct HeadVals {
  float ent, mx, ntau, sq;
};

// Statistics of one head row v_j = q_j / d (DIV, for logits) or q_j, added into buf (stored
// when first). Returns the head's entropy / max / count > tau / sum of squares.
template <bool DIV>
HeadVals head_pass(const float* q, int64_t n, float d, float* buf, bool first, float tau,
                   const float* pf) {
  vf xlx = splat(0.f), sq = splat(0.f), mx = splat(-INFINITY);
  vi cnt = vi{};
  const vf dv = splat(d);
  auto step = [&](vf v) {  // full chunks; the tail below masks its padding lanes
    xlx += vxlogx(v);
    sq += v * v;
    cnt = v > tau ? cnt + 1 : cnt;
    mx = v > mx ? v : mx;
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    if (pf) prefetch(pf + j);
    vf v = loadv(q + j);
    if (DIV) v = v / dv;
    step(v);
    storev(buf + j, first ? v : loadv(buf + j) + v);
  }
  if (j < n) {
    const int64_t rem = n - j;
    vf v = load_partial(q + j, rem);
    if (DIV) v = v / dv;
    const vi live = lanes_below(rem);
    xlx += vxlogx(v);  // padding lanes are 0: they add exactly 0
    sq += v * v;
    cnt = (v > tau) & live ? cnt + 1 : cnt;
    mx = (v > mx) & live ? v : mx;
    store_partial(buf + j, first ? v : load_partial(buf + j, rem) + v, rem);
  }
  return {-hsum(xlx), hmax(mx), static_cast<float>(hcount(cnt)), hsum(sq)};
}

// HEADS = false: v_j = q_j / d (DIV) or q_j added into buf (stored when first), the same
// arithmetic as head_pass, so the head mean is bit-identical, without any head statistic.
template <bool DIV>
void accum_pass(const float* q, int64_t n, float d, float* buf, bool first, const float* pf) {
  const vf dv = splat(d);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    if (pf) prefetch(pf + j);
    vf v = loadv(q + j);
    if (DIV) v = v / dv;
    storev(buf + j, first ? v : loadv(buf + j) + v);
  }
  if (j < n) {
    const int64_t rem = n - j;
    vf v = load_partial(q + j, rem);
    if (DIV) v = v / dv;
    store_partial(buf + j, first ? v : load_partial(buf + j, rem) + v, rem);
  }
}

struct RowVals {
  float ent, mx, sq, ntau, neps, sum, dev;
  vf lane_max;  // per-lane maxima (lane l holds entries j = l mod 16), for the top-k threshold
};

// Statistics of the row p_j = src_j / d (DIV) or src_j; p stored into dst when STORE.
template <bool DIV, bool STORE>
RowVals main_pass(const float* src, float* dst, int64_t n, float d, float tau, float eps,
                  float inv_n, const float* pf) {
  vf xlx = splat(0.f), sq = splat(0.f), sum = splat(0.f), dev = splat(0.f), mx = splat(-INFINITY);
  vi ctau = vi{}, ceps = vi{};
  const vf dv = splat(d);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    if (pf) prefetch(pf + j);
    vf v = loadv(src + j);
    if (DIV) v = v / dv;
    xlx += vxlogx(v);
    sq += v * v;
    sum += v;
    ctau = v > tau ? ctau + 1 : ctau;
    ceps = v > eps ? ceps + 1 : ceps;
    const vf ad = v - inv_n;
    dev += ad < 0.f ? -ad : ad;
    mx = v > mx ? v : mx;
    if (STORE) storev(dst + j, v);
  }
  if (j < n) {
    const int64_t rem = n - j;
    vf v = load_partial(src + j, rem);
    if (DIV) v = v / dv;
    const vi live = lanes_below(rem);
    xlx += vxlogx(v);
    sq += v * v;
    sum += v;
    ctau = (v > tau) & live ? ctau + 1 : ctau;
    ceps = (v > eps) & live ? ceps + 1 : ceps;
    const vf ad = v - inv_n;
    dev += live ? (ad < 0.f ? -ad : ad) : splat(0.f);
    mx = (v > mx) & live ? v : mx;
    if (STORE) store_partial(dst + j, v, rem);
  }
  return {-hsum(xlx), hmax(mx), hsum(sq), static_cast<float>(hcount(ctau)),
          static_cast<float>(hcount(ceps)), hsum(sum), hsum(dev), mx};
}

// Max of a logits row; sets bad when it has a NaN or +inf, or every entry is -inf.
float logits_max(const float* q, int64_t n, bool& bad, const float* pf) {
  vf mx = splat(-INFINITY);
  vi nan = vi{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    if (pf) prefetch(pf + j);
    const vf v = loadv(q + j);
    nan |= v != v;
    mx = v > mx ? v : mx;
  }
  float m = hmax(mx);
  bool has_nan = hcount(nan) != 0;
  for (; j < n; ++j) {
    const float v = q[j];
    has_nan |= v != v;
    m = v > m ? v : m;
  }
  bad = has_nan || m == INFINITY || m == -INFINITY;
  return m;
}

// e_j = exp(q_j - m) into e; returns sum_j e_j.
float exp_pass(const float* q, int64_t n, float m, float* e) {
  vf s = splat(0.f);
  const vf mv = splat(m);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf v = vexp_nonpos(loadv(q + j) - mv);
    s += v;
    storev(e + j, v);
  }
  if (j < n) {
    const int64_t rem = n - j;
    vf v = vexp_nonpos(load_partial(q + j, rem) - mv);
    v = lanes_below(rem) ? v : splat(0.f);
    s += v;
    store_partial(e + j, v, rem);
  }
  return hsum(s);
}

// sum of p[lo, hi)
float range_sum(const float* p, int64_t lo, int64_t hi) {
  vf s = splat(0.f);
  int64_t j = lo;
  for (; j + W <= hi; j += W) s += loadv(p + j);
  float t = hsum(s);
  for (; j < hi; ++j) t += p[j];
  return t;
}

// The k-th largest of the 16 lane maxima: the lanes partition the row, so at least k entries
// are >= it, and no entry below it can be in the top k.
float topk_floor(vf lane_max, int64_t k) {
  if (k == 1) return hmax(lane_max);
#if defined(__AVX512F__)
  // rank of each lane = number of lanes above it, without branches
  const __m512 v = (__m512)lane_max;
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int m = 0; m < W; ++m) {
    const __m512 b = _mm512_permutexvar_ps(_mm512_set1_epi32(m), v);
    rank = _mm512_mask_add_epi32(rank, _mm512_cmp_ps_mask(b, v, _CMP_GT_OQ), rank, one);
  }
  const __mmask16 top = _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(static_cast<int>(k)));
  return _mm512_mask_reduce_min_ps(top, v);
#else
  float t = INFINITY;
  for (int l = 0; l < W; ++l) {
    const float v = lane_max[l];
    int64_t above = 0;
    for (int m = 0; m < W; ++m) above += lane_max[m] > v;
    if (above < k && v < t) t = v;
  }
  return t;
#endif
}

// Sorted insertion buffer of the k largest values offered in index order (descending, ties to
// the lower index: an equal value offered later stays behind).
struct TopkBuffer {
  float val[kMaxTopk];
  int64_t idx[kMaxTopk];
  int64_t k;
  explicit TopkBuffer(int64_t k_) : k(k_) {
    for (int64_t i = 0; i < k; ++i) {
      val[i] = -INFINITY;
      idx[i] = -1;
    }
  }
  void offer(float x, int64_t j) {
    if (!(x > val[k - 1])) return;
    int64_t i = k - 1;
    while (i > 0 && x > val[i - 1]) {
      val[i] = val[i - 1];
      idx[i] = idx[i - 1];
      --i;
    }
    val[i] = x;
    idx[i] = j;
  }
  void write(int64_t* out) const { std::memcpy(out, idx, sizeof(int64_t) * k); }
};

#if defined(__AVX512F__)
// Top-k of m > 16 candidates (values, indices in index order): ranked without branches for
// m <= 64 (k = 16 on random rows gives ~50), else through the insertion buffer.
void topk_rank_many(const float* cand_val, const int32_t* cand_idx, int64_t m, int64_t k,
                    int64_t* out) {
  if (m > 4 * W) {
    TopkBuffer top(k);
    for (int64_t c = 0; c < m; ++c) top.offer(cand_val[c], cand_idx[c]);
    return top.write(out);
  }
  const int64_t nv = (m + W - 1) / W;
  __m512 vals[4];
  __mmask16 valid[4];
  for (int64_t u = 0; u < nv; ++u) {
    valid[u] = first_lanes(std::min<int64_t>(W, m - u * W));
    vals[u] = _mm512_maskz_loadu_ps(valid[u], cand_val + u * W);
  }
  int64_t slot[kMaxTopk + 1];
  for (int64_t c = 0; c < m; ++c) {
    const int64_t cu = c / W;
    const __m512i lane = _mm512_set1_epi32(static_cast<int32_t>(c - cu * W));
    const __m512 b = _mm512_permutexvar_ps(lane, vals[cu]);
    int rank = 0;
    for (int64_t u = 0; u < nv; ++u) {
      const __mmask16 before = u < cu ? valid[u] : u == cu ? first_lanes(c - u * W) : 0;
      rank += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid[u], vals[u], b, _CMP_GT_OQ)) +
              __builtin_popcount(_mm512_mask_cmp_ps_mask(before, vals[u], b, _CMP_EQ_OQ));
    }
    slot[std::min<int64_t>(rank, k)] = cand_idx[c];  // ranks >= k land in the spare slot
  }
  std::memcpy(out, slot, sizeof(int64_t) * k);
}
#endif

// Indices of the k largest entries of p, descending, ties to the lower index. Only entries
// >= topk_floor are candidates (~k of them on random rows for k <= 8); AVX-512 collects them
// with compress and ranks up to 16 of them in registers without branches (an insertion
// buffer mispredicts a branch per candidate on random rows); more: topk_rank_many.
void topk_pass(const float* p, int64_t n, int64_t k, vf lane_max, int64_t* out, float* cand_val,
               int32_t* cand_idx) {
  const float floor = topk_floor(lane_max, k);
  if (k == 1) {  // the first entry equal to the max
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const uint32_t bits = lanes_ge(loadv(p + j), floor);
      if (bits != 0) {
        out[0] = j + __builtin_ctz(bits);
        return;
      }
    }
    while (j < n && !(p[j] >= floor)) ++j;
    out[0] = j;
    return;
  }
#if defined(__AVX512F__)
  if (n <= INT32_MAX) {
    const __m512 f = _mm512_set1_ps(floor);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // Candidates, in index order: the first 16 also in registers (acc_val, acc_idx), all of
    // them in cand_val / cand_idx (reading those back right after the vector stores would
    // stall on store forwarding, so the common case never does).
    __m512 acc_val = _mm512_setzero_ps();
    __m512i acc_idx = _mm512_setzero_si512();
    int64_t m = 0;
    auto lanes = [&](int64_t j) -> __mmask16 {
      return j + W <= n ? static_cast<__mmask16>(0xffff) : j < n ? first_lanes(n - j) : 0;
    };
    // four chunks per test: most rows have candidates in a few chunks only
    for (int64_t j = 0; j < n; j += 4 * W) {
      __mmask16 hit[4];
      __m512 v[4];
      for (int c = 0; c < 4; ++c) {
        const __mmask16 live = lanes(j + c * W);
        v[c] = _mm512_maskz_loadu_ps(live, p + j + c * W);
        hit[c] = _mm512_mask_cmp_ps_mask(live, v[c], f, _CMP_GE_OQ);
      }
      if ((hit[0] | hit[1] | hit[2] | hit[3]) == 0) continue;
      for (int c = 0; c < 4; ++c) {  // no branch on hit[c]: an empty chunk appends nothing
        const int32_t j0 = static_cast<int32_t>(j + c * W);
        const __m512 cv = _mm512_maskz_compress_ps(hit[c], v[c]);
        const __m512i ji = _mm512_add_epi32(iota, _mm512_set1_epi32(j0));
        const __m512i ci = _mm512_maskz_compress_epi32(hit[c], ji);
        if (m < W) {  // append: lane l < m keeps acc, lane l >= m takes new lane l - m
          const __mmask16 tail = static_cast<__mmask16>(~first_lanes(m));
          const __m512i shift = _mm512_set1_epi32(static_cast<int32_t>(W - m));
          const __m512i sel = _mm512_mask_add_epi32(iota, tail, iota, shift);
          acc_val = _mm512_permutex2var_ps(acc_val, sel, cv);
          acc_idx = _mm512_permutex2var_epi32(acc_idx, sel, ci);
        }
        _mm512_storeu_ps(cand_val + m, cv);
        _mm512_storeu_si512(cand_idx + m, ci);
        m += __builtin_popcount(hit[c]);
      }
    }
    if (m > W) return topk_rank_many(cand_val, cand_idx, m, k, out);
    // rank of each candidate = candidates above it + equal ones before it (lower index)
    const __mmask16 valid = first_lanes(m);
    const __m512i one = _mm512_set1_epi32(1);
    __m512i rank = _mm512_setzero_si512();
    for (int64_t c = 0; c < m; ++c) {
      const __m512 b = _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(c)), acc_val);
      const __mmask16 after = static_cast<__mmask16>(valid & ~first_lanes(c + 1));
      const __mmask16 below = _mm512_mask_cmp_ps_mask(valid, b, acc_val, _CMP_GT_OQ);
      const __mmask16 tied_after = _mm512_mask_cmp_ps_mask(after, b, acc_val, _CMP_EQ_OQ);
      rank = _mm512_mask_add_epi32(rank, below, rank, one);  // b above them
      rank = _mm512_mask_add_epi32(rank, tied_after, rank, one);  // tied, b first
    }
    alignas(64) int32_t rk[W], ix[W];
    _mm512_store_si512(rk, rank);
    _mm512_store_si512(ix, acc_idx);
    int64_t slot[kMaxTopk + 1];
    for (int64_t c = 0; c < m; ++c) slot[std::min<int64_t>(rk[c], k)] = ix[c];  // ranks >= k: spare
    std::memcpy(out, slot, sizeof(int64_t) * k);
    return;
  }
#endif
  // portable path: the entries >= floor through the insertion buffer, in index order
  (void)cand_val;
  (void)cand_idx;
  TopkBuffer top(k);
  for (int64_t j = 0; j < n; ++j)
    if (p[j] >= floor) top.offer(p[j], j);
  top.write(out);
}

// ---- the op ----

struct Problem {
  int64_t A, G, C, N;
  int64_t sA, sG, sC, sN;
  bool logits;
  bool heads;  // want_heads: per-head statistics (else head_sums is NaN)
  int64_t k;
  float tau, eps;
  int64_t window, query_offset, query_len;
  const bool* mask;
  float* rows;     // [R, 4] or nullptr
  int64_t* topk;   // [R, k]
};

constexpr int64_t kMaxTileRows = 32;
#ifndef FASTDIAG_NOHEADS_TILE_LOG2
#define FASTDIAG_NOHEADS_TILE_LOG2 12
#endif
constexpr int kNoHeadsTileLog2 = FASTDIAG_NOHEADS_TILE_LOG2;

// Rows per tile when G > 1: the tile's rows are read head by head (head g of rows t0, t0+1, ...
// is one contiguous run when rows are contiguous, which prefetchers stream; row by row, the G
// heads would be G interleaved short streams, ~20% slower end to end), so each row keeps its
// head-mean buffer of N floats for the tile: ~64k floats per thread. Without per-head statistics
// the head loop is only an add into those buffers, bound by their traffic: ~4k floats (L1).
int64_t tile_rows(const Problem& P, bool heads) {
  const int64_t floats = int64_t{1} << (heads ? 16 : kNoHeadsTileLog2);
  return P.G == 1 ? 1 : std::clamp<int64_t>(floats / (P.N + W), 1, kMaxTileRows);
}
int64_t tile_rows(const Problem& P) { return tile_rows(P, P.heads); }

// Per-thread buffers (bounded: about (3 + tile_rows) * N floats).
struct Scratch {
  int64_t T, stride;
  std::vector<float> cvt, tmp, buf, head;  // tmp: exp values, then top-k candidate values
  std::vector<int32_t> cand;               // top-k candidate indices
  std::vector<uint8_t> ok;                 // per tile row: still valid
  explicit Scratch(const Problem& P)
      : T(tile_rows(P)),
        stride(P.N + W),
        cvt(P.N + W),
        tmp(P.N + W),
        buf(T * (P.N + W)),
        head(T * P.G * kNumHeadSlots),
        cand(P.N + W),
        ok(T) {}
  float* row_buf(int64_t t) { return buf.data() + t * stride; }
  float* row_head(int64_t t, int64_t G) { return head.data() + t * G * kNumHeadSlots; }
};

// [lo, hi) of the j in [0, n) with lo_incl <= j <= hi_incl (bounds in 128-bit: no overflow).
inline void clamp_range(__int128 lo_incl, __int128 hi_incl, int64_t n, int64_t& lo, int64_t& hi) {
  const __int128 a = std::min<__int128>(std::max<__int128>(lo_incl, 0), n);
  const __int128 b = std::min<__int128>(std::max<__int128>(hi_incl + 1, a), n);
  lo = static_cast<int64_t>(a);
  hi = static_cast<int64_t>(b);
}

// Row r = a * C + c and its query index i = r % query_len, advanced without divisions.
struct RowPos {
  int64_t r, a, c, i;
  static RowPos of(const Problem& P, int64_t r) { return {r, r / P.C, r % P.C, r % P.query_len}; }
  int64_t offset(const Problem& P) const { return a * P.sA + c * P.sC; }
  RowPos next(const Problem& P) const {
    RowPos n{r + 1, a, c + 1, i + 1};
    if (n.c == P.C) {
      n.c = 0;
      ++n.a;
    }
    if (n.i == P.query_len) n.i = 0;
    return n;
  }
};

// Row r excluded (masked, or non-finite): NaN statistics, -1 top-k, counted.
void invalid_row(const Problem& P, int64_t r, bool masked, double* part) {
  part[masked ? kMasked : kNonfinite] += 1.0;
  if (P.rows) {
    for (int s = 0; s < kNumRowSlots; ++s) P.rows[r * kNumRowSlots + s] = NAN;
  }
  for (int64_t i = 0; i < P.k; ++i) P.topk[r * P.k + i] = -1;
}

// Everything after the statistics pass of a valid row with distribution p (contiguous float32):
// future / local mass, top-k, the per-row outputs, and the row's share of the partials
// (part: kNumSlots [+ G * kNumHeadSlots with heads] doubles; hv: the row's G x HeadSlot
// values, nullptr without heads).
void finish_row(const Problem& P, const RowPos& at, const float* p, const RowVals& rv,
                const float* hv, Scratch& S, double* part) {
  const int64_t r = at.r, n = P.N;
  const float rowsum_err = std::fabs(rv.sum - 1.0f);
  const float abs_dev = rv.dev / static_cast<float>(n);
  const __int128 qi = static_cast<__int128>(at.i) + P.query_offset;
  int64_t lo, hi;
  clamp_range(qi + 1, n, n, lo, hi);
  const float future = range_sum(p, lo, hi);
  float local = 0.f;
  if (P.window >= 0) {
    clamp_range(qi - P.window, qi + P.window, n, lo, hi);
    local = range_sum(p, lo, hi);
  }
  if (P.k > 0) topk_pass(p, n, P.k, rv.lane_max, P.topk + r * P.k, S.tmp.data(), S.cand.data());
  if (P.rows) {
    float* o = P.rows + r * kNumRowSlots;
    o[kRowEntropy] = rv.ent;
    o[kRowMax] = rv.mx;
    o[kRowGtEps] = rv.neps;
    o[kRowSumsq] = rv.sq;
  }
  part[kCount] += 1.0;
  part[kEntropy] += rv.ent;
  part[kEntropySq] += static_cast<double>(rv.ent * rv.ent);
  part[kMax] += rv.mx;
  part[kMaxSq] += static_cast<double>(rv.mx * rv.mx);
  part[kSumsq] += rv.sq;
  part[kGtTau] += rv.ntau;
  part[kGtEps] += rv.neps;
  part[kRowsumErr] += rowsum_err;
  part[kRowsumErrMax] = std::max(part[kRowsumErrMax], static_cast<double>(rowsum_err));
  part[kFuture] += future;
  part[kFutureMax] = std::max(part[kFutureMax], static_cast<double>(future));
  part[kLocal] += local;
  part[kAbsDev] += abs_dev;
  if (hv) {
    double* hpart = part + kNumSlots;
    for (int64_t i = 0; i < P.G * kNumHeadSlots; ++i) hpart[i] += hv[i];
  }
}

// G = 1: one row at a time (consecutive rows are one stream already); the next row is
// prefetched while this one is read.
template <typename T>
void process_row(const Problem& P, const typename T::raw* x, const RowPos& at, Scratch& S,
                 double* part) {
  const int64_t r = at.r, n = P.N;
  if (P.mask && !P.mask[r]) return invalid_row(P, r, true, part);
  const bool pf_next = P.sN == 1 && r + 1 < P.A * P.C;
  const typename T::raw* pf = pf_next ? x + at.next(P).offset(P) : nullptr;
  const float* q = load_row<T>(x + at.offset(P), P.sN, n, S.cvt.data(), pf);
  const float* pff = reinterpret_cast<const float*>(pf);  // non-null only for float32
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  float* buf = S.row_buf(0);
  RowVals rv;
  const float* p;
  if (P.logits) {
    bool bad;
    const float m = logits_max(q, n, bad, pff);
    if (bad) return invalid_row(P, r, false, part);
    const float s = exp_pass(q, n, m, S.tmp.data());
    rv = main_pass<true, true>(S.tmp.data(), buf, n, s, P.tau, P.eps, inv_n, nullptr);
    p = buf;
  } else {
    rv = main_pass<false, false>(q, nullptr, n, 1.f, P.tau, P.eps, inv_n, pff);
    // sum of squares is finite iff every entry is (unless finite entries overflow it)
    if (!std::isfinite(rv.sq) && !all_finite(q, n)) return invalid_row(P, r, false, part);
    p = q;
  }
  const float hv[kNumHeadSlots] = {rv.ent, rv.mx, rv.ntau, rv.sq};  // the row is its one head
  finish_row(P, at, p, rv, P.heads ? hv : nullptr, S, part);
}

constexpr int64_t kPrefetchRuns = 2;

// Every head of the row at offset base is finite (the rare check of a probability row whose
// head mean has a non-finite sum of squares, when the per-head statistics are off).
template <typename T>
bool heads_finite(const Problem& P, const typename T::raw* x, int64_t base, Scratch& S) {
  for (int64_t g = 0; g < P.G; ++g) {
    const typename T::raw* none = nullptr;
    if (!all_finite(load_row<T>(x + base + g * P.sG, P.sN, P.N, S.cvt.data(), none), P.N))
      return false;
  }
  return true;
}

// G > 1: the rows of a tile [at0, at0 + count) head by head, then each row's mean pass.
// HEADS: with the per-head statistics; else the head loop only accumulates the mean.
template <typename T, bool HEADS>
void process_tile(const Problem& P, const typename T::raw* x, RowPos at0, int64_t count,
                  Scratch& S, double* part) {
  const int64_t n = P.N, G = P.G, R = P.A * P.C;
  RowPos pos[kMaxTileRows];
  int64_t base[kMaxTileRows];
  RowPos at = at0;
  for (int64_t t = 0; t < count; ++t, at = at.next(P)) {
    pos[t] = at;
    base[t] = at.offset(P);
    S.ok[t] = !(P.mask && !P.mask[at.r]);
  }
  // prefetch target: the run read kPrefetchRuns runs after this one in (head, row) order, or
  // the next tile's first row (2 runs, 4 KB of 512-wide float32 rows, measured best on Zen 4)
  const int64_t next_tile = count < R - at0.r ? at.offset(P) : -1;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = 0; t < count; ++t) {
      if (!S.ok[t]) continue;
      const int64_t off = base[t] + g * P.sG;
      const int64_t ahead = g * count + t + kPrefetchRuns, ga = ahead / count;
      const int64_t pf_off = ga < G ? base[ahead - ga * count] + ga * P.sG : next_tile;
      const typename T::raw* pf = P.sN == 1 && pf_off >= 0 ? x + pf_off : nullptr;
      const float* q = load_row<T>(x + off, P.sN, n, S.cvt.data(), pf);
      const float* pff = reinterpret_cast<const float*>(pf);
      if constexpr (!HEADS) {
        if (P.logits) {
          bool bad;
          const float m = logits_max(q, n, bad, pff);
          if (bad) {
            S.ok[t] = 0;
            continue;
          }
          const float s = exp_pass(q, n, m, S.tmp.data());
          accum_pass<true>(S.tmp.data(), n, s, S.row_buf(t), g == 0, nullptr);
        } else {  // finiteness: checked on the mean row below
          accum_pass<false>(q, n, 1.f, S.row_buf(t), g == 0, pff);
        }
        continue;
      }
      HeadVals h;
      if (P.logits) {
        bool bad;
        const float m = logits_max(q, n, bad, pff);
        if (bad) {
          S.ok[t] = 0;
          continue;
        }
        const float s = exp_pass(q, n, m, S.tmp.data());
        h = head_pass<true>(S.tmp.data(), n, s, S.row_buf(t), g == 0, P.tau, nullptr);
      } else {
        h = head_pass<false>(q, n, 1.f, S.row_buf(t), g == 0, P.tau, pff);
        if (!std::isfinite(h.sq) && !all_finite(q, n)) {
          S.ok[t] = 0;
          continue;
        }
      }
      float* hv = S.row_head(t, G) + g * kNumHeadSlots;
      hv[kHeadEntropy] = h.ent;
      hv[kHeadMax] = h.mx;
      hv[kHeadGtTau] = h.ntau;
      hv[kHeadSumsq] = h.sq;
    }
  }
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  for (int64_t t = 0; t < count; ++t) {
    const int64_t r = pos[t].r;
    if (!S.ok[t]) {
      invalid_row(P, r, P.mask && !P.mask[r], part);
      continue;
    }
    float* buf = S.row_buf(t);
    // mean over heads as sum / G (the rounding of torch's mean)
    const RowVals rv = main_pass<true, true>(buf, buf, n, static_cast<float>(G), P.tau, P.eps,
                                             inv_n, nullptr);
    if constexpr (!HEADS) {
      // a non-finite head makes the mean's sum of squares non-finite; finite heads whose
      // squares (or sum) overflow do too, so then the heads are checked themselves (rare)
      if (!P.logits && !std::isfinite(rv.sq) && !heads_finite<T>(P, x, base[t], S)) {
        invalid_row(P, r, false, part);
        continue;
      }
    }
    finish_row(P, pos[t], buf, rv, HEADS ? S.row_head(t, G) : nullptr, S, part);
  }
}

// Rows per block: about 64k input elements and at least one tile, at most max_blocks blocks so
// the float64 partials (width doubles per block) stay within ~8 MB; a function of the shape only.
int64_t rows_per_block(const Problem& P, int64_t width) {
  const int64_t R = P.A * P.C;
  const int64_t max_blocks = std::clamp<int64_t>((int64_t{1} << 20) / width, 16, 4096);
  int64_t rpb = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, P.G * P.N));
  rpb = std::max(rpb, tile_rows(P, true));  // the same blocks with or without heads
  return std::max(rpb, (R + max_blocks - 1) / max_blocks);
}

template <typename T, bool HEADS>
void run_heads(const Problem& P, const typename T::raw* x, double* sums, double* head_sums) {
  const int64_t R = P.A * P.C;
  // the row blocks (hence the float64 summation order) do not depend on want_heads
  const int64_t rpb = rows_per_block(P, kNumSlots + P.G * kNumHeadSlots);
  const int64_t width = kNumSlots + (HEADS ? P.G * kNumHeadSlots : 0);
  const int64_t nblocks = (R + rpb - 1) / rpb;
  std::vector<double> parts(static_cast<size_t>(nblocks * width), 0.0);
  // Threads take blocks from a shared counter (a busy core slows the run down by its share
  // only); a block's partials do not depend on the thread that computes them.
  std::atomic<int64_t> next_block{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), nblocks);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    Scratch S(P);
    // a block's partials accumulate in this thread's own buffer, copied out when it is done:
    // the two threads work on neighbouring blocks, whose partials share cache lines (with 16
    // slots and no head partials, a block's whole row is two lines): false sharing per row
    std::vector<double> acc(static_cast<size_t>(width));
    for (int64_t b; (b = next_block.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
      double* part = acc.data();
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t r1 = std::min(R, (b + 1) * rpb);
      RowPos at = RowPos::of(P, b * rpb);
      if (P.G == 1) {
        for (; at.r < r1; at = at.next(P)) process_row<T>(P, x, at, S, part);
      } else {
        while (at.r < r1) {
          const int64_t count = std::min(S.T, r1 - at.r);
          process_tile<T, HEADS>(P, x, at, count, S, part);
          for (int64_t t = 0; t < count; ++t) at = at.next(P);
        }
      }
      std::copy(acc.begin(), acc.end(), parts.begin() + b * width);
    }
  });
  for (int64_t b = 0; b < nblocks; ++b) {  // fixed order: independent of the thread count
    const double* part = parts.data() + b * width;
    for (int s = 0; s < kNumSlots; ++s) {
      if (s == kRowsumErrMax || s == kFutureMax)
        sums[s] = std::max(sums[s], part[s]);
      else
        sums[s] += part[s];
    }
    if (HEADS) {
      for (int64_t i = 0; i < P.G * kNumHeadSlots; ++i) head_sums[i] += part[kNumSlots + i];
    }
  }
}

template <typename T>
void run(const Problem& P, const typename T::raw* x, double* sums, double* head_sums) {
  if (P.heads)
    run_heads<T, true>(P, x, sums, head_sums);
  else
    run_heads<T, false>(P, x, sums, head_sums);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dist_stats_cpu(
    const at::Tensor& x4, const std::optional<at::Tensor>& row_mask, bool from_logits,
    int64_t topk, double tau, double eps, int64_t window, int64_t query_offset,
    int64_t query_len, bool want_rows, bool want_heads) {
  TORCH_CHECK(x4.device().is_cpu(), "dist_stats_cpu: x4 must be a CPU tensor, got ", x4.device());
  TORCH_CHECK(x4.dim() == 4, "dist_stats_cpu: x4 must be 4-D [A, G, C, N], got shape ", x4.sizes());
  const auto dt = x4.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "dist_stats_cpu: x4 must be float32, float64, bfloat16 or float16, got ", dt);
  const int64_t A = x4.size(0), G = x4.size(1), C = x4.size(2), N = x4.size(3);
  const int64_t R = A * C;
  TORCH_CHECK(N >= 1, "dist_stats_cpu: x4 must have a non-empty last axis, got shape ", x4.sizes());
  TORCH_CHECK(topk >= 0 && topk <= kMaxTopk && topk <= N,
              "dist_stats_cpu: topk must be in [0, min(16, N=", N, ")], got ", topk);
  TORCH_CHECK(G >= 1 || R == 0,
              "dist_stats_cpu: the reduced axis (G) must be non-empty, got shape ",
              x4.sizes());

  const auto f64 = x4.options().dtype(at::kDouble);
  at::Tensor sums = at::zeros({kNumSlots}, f64);
  at::Tensor head_sums =
      want_heads ? at::zeros({G, kNumHeadSlots}, f64) : at::full({G, kNumHeadSlots}, NAN, f64);
  at::Tensor rows = at::empty({want_rows ? R : 0, kNumRowSlots}, x4.options().dtype(at::kFloat));
  at::Tensor top = at::empty({R, topk}, x4.options().dtype(at::kLong));
  if (R == 0) return {sums, head_sums, rows, top};
  TORCH_CHECK(query_len >= 1, "dist_stats_cpu: query_len must be >= 1, got ", query_len);

  at::Tensor mask;
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->device().is_cpu(), "dist_stats_cpu: row_mask must be a CPU tensor");
    TORCH_CHECK(row_mask->numel() == R, "dist_stats_cpu: row_mask must have A*C = ", R,
                " elements, got shape ", row_mask->sizes());
    mask = row_mask->to(at::kBool).contiguous();
  }
  Problem P{A, G, C, N,
            x4.stride(0), x4.stride(1), x4.stride(2), x4.stride(3),
            from_logits, want_heads, topk, static_cast<float>(tau), static_cast<float>(eps),
            window, query_offset, query_len,
            mask.defined() ? mask.data_ptr<bool>() : nullptr,
            want_rows ? rows.data_ptr<float>() : nullptr,
            top.data_ptr<int64_t>()};
  double* s = sums.data_ptr<double>();
  double* h = head_sums.data_ptr<double>();
  const void* x = x4.const_data_ptr();
  switch (dt) {
    case at::kFloat:
      run<F32>(P, static_cast<const float*>(x), s, h);
      break;
    case at::kDouble:
      run<F64>(P, static_cast<const double*>(x), s, h);
      break;
    case at::kBFloat16:
      run<BF16>(P, static_cast<const uint16_t*>(x), s, h);
      break;
    default:
      run<F16>(P, static_cast<const uint16_t*>(x), s, h);
      break;
  }
  return {sums, head_sums, rows, top};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def(
      "dist_stats_cpu(Tensor x4, Tensor? row_mask, bool from_logits, int topk, float tau, "
      "float eps, int window, int query_offset, SymInt query_len, bool want_rows, "
      "bool want_heads=True) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) { m.impl("dist_stats_cpu", &dist_stats_cpu); }
