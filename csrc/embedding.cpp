// Batch statistics of embedding rows, fused for the CPU (fastdiag/ops/embedding.py holds the
// torch code for other devices and the definitions; docs/metrics.md §1-§2).
//
// embedding_stats(x, perm, sample) -> (values float64 [5], finite_rows)
//   x      floating [..., D], seen as rows [M, D]; a row holding a NaN / inf is non-finite
//   perm   None: the cosine values over every row; else int64, its first min(sample, M) entries
//          are the drawn rows (the caller's torch.randperm, so the draw stays torch's)
//   values [variance, norm_mean, cosine_mean, cosine_max, nonfinite_rows]:
//          variance   per-column unbiased variance over the finite rows, averaged over columns
//                     (NaN with fewer than two finite rows)
//          norm_mean  mean L2 norm of the finite rows (NaN without one)
//          cosine_*   mean / max of cos_ij = <x_i, x_j> / (|x_i| |x_j| + 1e-8) over the ordered
//                     pairs i != j of the drawn rows with the non-finite ones zeroed; the mean
//                     is over the pairs of finite drawn rows (a zero row's cosines are 0), both
//                     NaN without such a pair
//   finite_rows  x's shape, x's dtype (float32 for half inputs), non-finite rows zeroed
// One pass over the rows (finiteness, norms, the zeroed copy, column sums), one for the
// centred squares, then the drawn rows' Gram matrix in row blocks. Everything is accumulated in
// float64 in a fixed order (fixed row blocks, combined in order): results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double COSINE_EPS = 1e-8;              // fastdiag/ops/_cosine_layout.py COSINE_EPS
constexpr int64_t GRAM_BLOCK_ELEMS = 1 << 22;    // Gram entries per row block
constexpr int64_t DIRECT_FLOPS = 1 << 15;        // k * k * D below this: plain loops, no GEMM call
constexpr int SCALE_EXP = 30;                    // fastdiag/ops/embedding.py _SCALE_EXP

// the L2 norm of a row of finite entries whose squares overflow a float64 sum (float64 rows
// beyond ~1e154): scaled by the largest |entry| (inf only if the norm itself is not a double)
template <typename T>
double scaled_norm(const T* row, int64_t d) {
  double big = 0.0;
  for (int64_t j = 0; j < d; ++j) big = std::max(big, std::abs(static_cast<double>(row[j])));
  if (big == 0.0) return 0.0;
  double sq = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double v = static_cast<double>(row[j]) / big;
    sq += v * v;
  }
  return big * std::sqrt(sq);
}

template <typename T>
bool all_finite(const T* row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    if (!std::isfinite(static_cast<double>(row[j]))) return false;
  }
  return true;
}

int64_t row_block(int64_t m) { return std::max<int64_t>(256, (m + 255) / 256); }

template <typename T, typename O>
void row_pass(const T* x, O* clean, int64_t m, int64_t d, double* norms, uint8_t* ok, std::vector<double>& colsum) {
  const int64_t rb = row_block(m);
  const int64_t nb = (m + rb - 1) / rb;
  std::vector<double> part(static_cast<size_t>(nb * d), 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* ps = part.data() + b * d;
      for (int64_t r = b * rb; r < std::min(m, (b + 1) * rb); ++r) {
        const T* row = x + r * d;
        O* out = clean + r * d;
        // finite row = no NaN / inf entry, as the torch code decides: the squares of float32 /
        // half values cannot overflow a float64 sum, so a finite sum says it; a non-finite sum
        // of a float64 row is checked entry by entry (entries beyond ~1e154: a scaled norm)
        double sq = 0.0;
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < d; ++j) {
          const double v = static_cast<double>(row[j]);
          sq += v * v;
        }
        bool finite = std::isfinite(sq);
        double norm = finite ? std::sqrt(sq) : 0.0;
        if (!finite && all_finite(row, d)) {
          finite = true;
          norm = scaled_norm(row, d);
        }
        ok[r] = finite;
        norms[r] = norm;
        if (finite) {
          for (int64_t j = 0; j < d; ++j) {
            const double v = static_cast<double>(row[j]);
            out[j] = static_cast<O>(v);
            ps[j] += v;
          }
        } else {
          std::fill(out, out + d, O(0));
        }
      }
    }
  });
  colsum.assign(static_cast<size_t>(d), 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t j = 0; j < d; ++j) colsum[j] += part[b * d + j];
  }
}

template <typename T>
double centred_squares(const T* x, int64_t m, int64_t d, const uint8_t* ok, const std::vector<double>& mu) {
  const int64_t rb = row_block(m);
  const int64_t nb = (m + rb - 1) / rb;
  std::vector<double> part(static_cast<size_t>(nb * d), 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* ps = part.data() + b * d;
      for (int64_t r = b * rb; r < std::min(m, (b + 1) * rb); ++r) {
        if (!ok[r]) continue;
        const T* row = x + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const double c = static_cast<double>(row[j]) - mu[j];
          ps[j] += c * c;
        }
      }
    }
  });
  std::vector<double> q(static_cast<size_t>(d), 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t j = 0; j < d; ++j) q[j] += part[b * d + j];
  }
  double total = 0.0;
  for (int64_t j = 0; j < d; ++j) total += q[j];
  return total;
}

// sum and max of the off-diagonal cosines of the rows `rows` of `clean` ([m, d], zeroed rows).
// Scale-free: when the largest drawn norm is beyond 2^(+-SCALE_EXP), the rows are scaled by a
// power of two 1 / s (exact) before the dot products, and cos = <a', b'> / (|a'| |b'| + eps / s^2)
// is the same formula (float32 dots of 1e19 rows would overflow, of 1e-30 rows underflow).
template <typename O>
std::pair<double, double> cosine_pass(const at::Tensor& clean2d, const std::vector<int64_t>& rows,
                                      const double* norms, const uint8_t* ok) {
  const int64_t k = static_cast<int64_t>(rows.size());
  const int64_t d = clean2d.size(1);
  double big = 0.0;
  for (int64_t r : rows) {
    if (ok[r]) big = std::max(big, norms[r]);
  }
  int e = 0;
  if (big > 0.0 && std::isfinite(big)) std::frexp(big, &e);
  if (e <= SCALE_EXP && e >= -SCALE_EXP) e = 0;
  const double inv = std::ldexp(1.0, -e);                // 1 / s
  const double eps = std::ldexp(COSINE_EPS, -2 * e);     // eps / s^2 (0 or inf at the extremes)
  std::vector<double> rn(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) rn[i] = norms[rows[i]] * inv;
  if (k * k * d <= DIRECT_FLOPS) {  // small: the dots in float64 loops (both orders of a pair)
    const O* pc = clean2d.const_data_ptr<O>();
    double s = 0.0, mx = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < k; ++i) {
      const O* a = pc + rows[i] * d;
      for (int64_t j = i + 1; j < k; ++j) {
        const O* b = pc + rows[j] * d;
        double dot = 0.0;
        for (int64_t t = 0; t < d; ++t) dot += (static_cast<double>(a[t]) * inv) * (static_cast<double>(b[t]) * inv);
        const double c = dot / (rn[i] * rn[j] + eps);
        s += 2.0 * c;
        mx = std::max(mx, c);
      }
    }
    return {s, mx};
  }
  auto idx = at::from_blob(const_cast<int64_t*>(rows.data()), {k}, at::TensorOptions().dtype(at::kLong)).clone();
  at::Tensor w = clean2d.index_select(0, idx);  // [k, d], O
  if (e != 0) w.mul_(inv);                       // a power of two: exact
  const at::Tensor wt = w.t();
  std::vector<double> rsum(static_cast<size_t>(k), 0.0);
  std::vector<double> rmax(static_cast<size_t>(k), -std::numeric_limits<double>::infinity());
  const int64_t bs = std::max<int64_t>(1, std::min<int64_t>(k, GRAM_BLOCK_ELEMS / std::max<int64_t>(k, 1)));
  for (int64_t i0 = 0; i0 < k; i0 += bs) {
    const int64_t i1 = std::min(k, i0 + bs);
    const at::Tensor dots = at::mm(w.narrow(0, i0, i1 - i0), wt).contiguous();  // [i1 - i0, k]
    const O* pd = dots.const_data_ptr<O>();
    at::parallel_for(i0, i1, 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const O* row = pd + (i - i0) * k;
        double s = 0.0, mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < k; ++j) {
          if (j == i) continue;
          const double c = static_cast<double>(row[j]) / (rn[i] * rn[j] + eps);
          s += c;
          mx = std::max(mx, c);
        }
        rsum[i] = s;
        rmax[i] = mx;
      }
    });
  }
  double s = 0.0, mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    s += rsum[i];
    mx = std::max(mx, rmax[i]);
  }
  return {s, mx};
}

std::tuple<at::Tensor, at::Tensor> embedding_stats(const at::Tensor& x_in, const std::optional<at::Tensor>& perm,
                                                   int64_t sample) {
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "embedding_stats: x must be floating point");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "embedding_stats: x must have shape [..., D], D >= 1");
  const auto x = x_in.contiguous();
  const int64_t d = x.size(-1);
  const int64_t m = x.numel() / d;
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor clean = at::empty(x.sizes(), x.options().dtype(out_type));
  std::vector<double> norms(static_cast<size_t>(m));
  std::vector<uint8_t> ok(static_cast<size_t>(m));
  std::vector<double> colsum, mu;
  double q = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "embedding_stats", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    int64_t n = 0;
    if (out_type == at::kDouble) {
      row_pass<scalar_t, double>(px, clean.data_ptr<double>(), m, d, norms.data(), ok.data(), colsum);
    } else {
      row_pass<scalar_t, float>(px, clean.data_ptr<float>(), m, d, norms.data(), ok.data(), colsum);
    }
    for (int64_t r = 0; r < m; ++r) n += ok[r];
    mu.assign(static_cast<size_t>(d), 0.0);
    for (int64_t j = 0; j < d; ++j) mu[j] = n > 0 ? colsum[j] / static_cast<double>(n) : 0.0;
    q = centred_squares<scalar_t>(px, m, d, ok.data(), mu);
  });
  int64_t n = 0;
  double norm_sum = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    n += ok[r];
    norm_sum += norms[r];
  }
  const double dn = static_cast<double>(n);
  auto values = at::empty({5}, x.options().dtype(at::kDouble));
  double* o = values.data_ptr<double>();
  o[0] = n > 1 ? q / (dn - 1.0) / static_cast<double>(d) : kNaN;
  o[1] = norm_sum / dn;  // 0 / 0 = NaN without a finite row
  o[2] = kNaN;
  o[3] = kNaN;
  o[4] = static_cast<double>(m - n);

  std::vector<int64_t> rows;
  if (perm.has_value() && perm->defined()) {
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->dim() == 1, "embedding_stats: perm must be int64 [>= k]");
    TORCH_CHECK(sample >= 1, "embedding_stats: sample must be >= 1 with perm");
    const int64_t k = std::min(sample, m);
    TORCH_CHECK(perm->numel() >= k, "embedding_stats: perm holds fewer than min(sample, M) rows");
    const auto pc = perm->contiguous();
    const int64_t* pp = pc.const_data_ptr<int64_t>();
    rows.assign(pp, pp + k);
    for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < m, "embedding_stats: perm entry out of range");
  } else {
    rows.resize(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) rows[r] = r;
  }
  int64_t v = 0;
  for (int64_t r : rows) v += ok[r];
  const double pairs = static_cast<double>(v) * static_cast<double>(v - 1);
  if (rows.size() >= 2 && pairs > 0) {
    const at::Tensor clean2d = clean.view({m, d});
    const auto sm = out_type == at::kDouble ? cosine_pass<double>(clean2d, rows, norms.data(), ok.data())
                                            : cosine_pass<float>(clean2d, rows, norms.data(), ok.data());
    o[2] = sm.first / pairs;
    o[3] = sm.second;
  }
  return {values, clean};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def("embedding_stats(Tensor x, Tensor? perm, int sample) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) { m.impl("embedding_stats", &embedding_stats); }
