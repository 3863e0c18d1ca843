// fastdiag::spectral_stats - schema and the CPU implementation (parallel over the batch).
//
// The math (Gram panel, pivoted Cholesky, one-sided Jacobi, statistics) lives in spectral.h
// and is shared with the CUDA kernel (spectral_cuda.cu, glued in spectral_cuda_glue.cpp).
// Contract: fastdiag/ops/spectral.py (public wrapper, torch fallback = executable spec).
//
// Op: spectral_stats(x [..., rows, cols] float32/float16/bfloat16/float64, any strides,
//                    method "auto" | "jacobi" | "tridiagonal"; "auto" is "tridiagonal" here)
//   -> (stats f64[..., 5]   effective_rank, effective_rank_ratio, top1_singular_share,
//                            stable_rank, condition_number (NaN where nonfinite > 0),
//       sigma f64[..., r]   singular values, descending, r = min(rows, cols),
//       nonfinite i64[...]  count of NaN / inf entries of each matrix,
//       sweeps i32[...]     Jacobi sweeps run for each matrix (0 for "tridiagonal"))

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "spectral.h"

namespace {

namespace sp = fastdiag::spectral;

constexpr int kPanel = 256;  // columns of Y converted to float64 at a time (bounded workspace)

// SIMD row operations for the Jacobi driver in spectral.h (same API as spectral::RowOps). Rows
// are zero-padded to a multiple of 8, so there are no tails; GCC / Clang vector extensions map
// to AVX-512, AVX2 or NEON. Four accumulators hide the FMA latency (fixed combine order).
typedef double v8d __attribute__((vector_size(64)));
inline v8d load8(const double* p) {
  v8d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(double* p, v8d v) { std::memcpy(p, &v, sizeof(v)); }

struct SimdRowOps {
  static double dot(const double* x, const double* y, int n8) {
    v8d acc[4] = {};
    int i = 0;
    for (; i + 32 <= n8; i += 32) {
      for (int u = 0; u < 4; ++u) acc[u] += load8(x + i + 8 * u) * load8(y + i + 8 * u);
    }
    for (int u = 0; i < n8; i += 8, ++u) acc[u] += load8(x + i) * load8(y + i);
    const v8d v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
  static void update(double* x, double* y, int n8, double alpha, double beta) {
    for (int i = 0; i < n8; i += 8) {
      const v8d u = load8(x + i), w = load8(y + i);
      store8(x + i, u - alpha * w);
      store8(y + i, w + beta * u);
    }
  }
  static void scale(double* x, int n8, double s) {
    for (int i = 0; i < n8; i += 8) store8(x + i, load8(x + i) * s);
  }
  static void rank2(double* x, const double* v, const double* w, int n8, double a, double b) {
    for (int i = 0; i < n8; i += 8) store8(x + i, load8(x + i) - (a * load8(w + i) + b * load8(v + i)));
  }
};

enum class Method { kJacobi, kTridiagonal };

struct Workspace {
  std::vector<double> a;      // n x n8: Gram, then R (rows zero-padded to n8)
  std::vector<double> panel;  // n4 x kPanel
  std::vector<double> sigma, scale, inv_scale, norm2, coef;  // n each
  std::vector<double> diag, offdiag, u, z;                    // n8 each (tridiagonal)
  int n = -1;
  void resize(int n_) {
    if (n_ == n) return;
    n = n_;
    const int n4 = (n + 3) / 4 * 4, n8 = (n + 7) / 8 * 8;
    a.assign((size_t)n * n8, 0.0);
    panel.assign((size_t)n4 * kPanel, 0.0);
    sigma.assign(n, 0.0);
    scale.assign(n, 1.0);
    norm2.assign(n, 0.0);
    inv_scale.assign(n, 1.0);
    coef.assign(2 * (n / 2 + 1), 0.0);
    diag.assign(n8, 0.0);
    offdiag.assign(n8, 0.0);
    u.assign(n8, 0.0);
    z.assign(n8, 0.0);
  }
};

// One matrix: Y[i, k] = x[i * sn + k * sm], i < n (short side), k < m (long side).
template <typename T>
void spectral_one(const T* x, int n, int64_t m, int64_t sn, int64_t sm, Workspace& ws,
                  Method method, double* stats, double* sigma_out, int64_t* nonfinite_out,
                  int32_t* sweeps_out) {
  ws.resize(n);
  const int n4 = (n + 3) / 4 * 4, n8 = (n + 7) / 8 * 8;
  double* a = ws.a.data();
  double* panel = ws.panel.data();
  std::fill(ws.a.begin(), ws.a.end(), 0.0);

  int64_t nonfinite = 0;
  for (int64_t k0 = 0; k0 < m; k0 += kPanel) {
    const int kc = (int)std::min<int64_t>(kPanel, m - k0);
    const int kpad = (kc + 7) / 8 * 8;
    if (sm <= sn) {
      for (int i = 0; i < n; ++i) {
        const T* xi = x + i * sn + k0 * sm;
        double* pi = panel + (int64_t)i * kPanel;
        for (int k = 0; k < kc; ++k) {
          const double v = static_cast<double>(xi[k * sm]);
          nonfinite += !sp::is_finite(v);
          pi[k] = v;
        }
        for (int k = kc; k < kpad; ++k) pi[k] = 0.0;
      }
    } else {
      for (int k = 0; k < kc; ++k) {
        const T* xk = x + (k0 + k) * sm;
        for (int i = 0; i < n; ++i) {
          const double v = static_cast<double>(xk[i * sn]);
          nonfinite += !sp::is_finite(v);
          panel[(int64_t)i * kPanel + k] = v;
        }
      }
      for (int i = 0; i < n; ++i)
        for (int k = kc; k < kpad; ++k) panel[(int64_t)i * kPanel + k] = 0.0;
    }
    if (nonfinite == 0) sp::gram_panel_accumulate(panel, n4, kPanel, kpad, a, n8, n);
  }
  *nonfinite_out = nonfinite;
  if (nonfinite > 0) {
    sp::stats_nonfinite(stats);
    for (int i = 0; i < n; ++i) sigma_out[i] = sp::nan_value();
    *sweeps_out = 0;
    return;
  }
  sp::gram_mirror(a, n, n8);

  double max_diag = 0.0;
  for (int i = 0; i < n; ++i) max_diag = std::max(max_diag, a[(int64_t)i * n8 + i]);
  double* lambda = ws.norm2.data();  // eigenvalues of G, lambda[i] for i < n
  bool failed = false;
  *sweeps_out = 0;
  if (!(max_diag > 0.0)) {
    std::fill(lambda, lambda + n, 0.0);  // zero matrix
  } else if (method == Method::kJacobi) {
    const int k = sp::pivoted_cholesky(a, n, n8, sp::rank_cut(n, max_diag));
    *sweeps_out = sp::jacobi_rows<SimdRowOps>(a, k, n8, n8, ws.scale.data(),
                                              ws.inv_scale.data(), lambda, ws.coef.data());
    std::fill(lambda + k, lambda + n, 0.0);
  } else {
    // scaled to max diag 1, so the QR steps' absolute thresholds are scale-free
    const double inv = 1.0 / max_diag;
    for (int i = 0; i < n; ++i) SimdRowOps::scale(a + (int64_t)i * n8, n8, inv);
    double* d = ws.diag.data();
    sp::householder_tridiagonal<SimdRowOps>(a, n, n8, d, ws.offdiag.data(), ws.u.data(),
                                            ws.z.data());
    failed = sp::tridiagonal_eigenvalues(d, ws.offdiag.data(), n) < 0;
    for (int i = 0; i < n; ++i) lambda[i] = d[i] * max_diag;
  }
  double lambda_max = 0.0;
  for (int i = 0; i < n; ++i) lambda_max = std::max(lambda_max, lambda[i]);
  const double cut = sp::eigen_cut(n, lambda_max);

  double* sigma = ws.sigma.data();
  sp::SigmaSums sums;
  sp::sigma_init(&sums);
  for (int i = 0; i < n; ++i) {
    sigma[i] = sp::sigma_from_lambda(lambda[i], cut);
    sp::sigma_add(&sums, sigma[i]);
  }
  sp::stats_finalize(sums, n, stats);
  if (failed) {
    sp::stats_nonfinite(stats);
    for (int i = 0; i < n; ++i) sigma[i] = sp::nan_value();
  }
  std::sort(sigma, sigma + n, std::greater<double>());
  std::copy(sigma, sigma + n, sigma_out);
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "spectral_stats: x must have shape [..., rows, cols], got shape ",
              x.sizes());
  const int64_t rows = x.size(-2), cols = x.size(-1);
  TORCH_CHECK(rows > 0 && cols > 0, "spectral_stats: x needs rows > 0 and cols > 0, got shape ",
              x.sizes());
  TORCH_CHECK(std::min(rows, cols) <= sp::kMaxDim, "spectral_stats: min(rows, cols) must be <= ",
              sp::kMaxDim, ", got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "spectral_stats: x must be float32, float16, bfloat16 or float64, got ", st);
}

}  // namespace

namespace fastdiag {

// Outputs shaped like the leading dims of x; shared with the CUDA glue.
std::vector<at::Tensor> spectral_outputs(const at::Tensor& x) {
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 2);
  const int64_t r = std::min(x.size(-2), x.size(-1));
  auto with = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s = lead;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  auto f64 = x.options().dtype(at::kDouble);
  return {at::empty(with({sp::kNumStats}), f64), at::empty(with({r}), f64),
          at::empty(lead, x.options().dtype(at::kLong)),
          at::empty(lead, x.options().dtype(at::kInt))};
}

void spectral_check_input(const at::Tensor& x) { check_input(x); }

}  // namespace fastdiag

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_stats_cpu(
    const at::Tensor& x_in, c10::string_view method_name) {
  check_input(x_in);
  Method method = Method::kTridiagonal;
  if (method_name == "jacobi") {
    method = Method::kJacobi;
  } else {
    TORCH_CHECK(method_name == "auto" || method_name == "tridiagonal",
                "spectral_stats: method must be 'auto', 'jacobi' or 'tridiagonal', got '",
                method_name, "'");
  }
  auto out = fastdiag::spectral_outputs(x_in);
  const int64_t rows = x_in.size(-2), cols = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, rows, cols});
  const int64_t batch = x.size(0);
  if (batch == 0) return {out[0], out[1], out[2], out[3]};
  const bool wide = rows <= cols;  // short side = rows
  const int n = (int)(wide ? rows : cols);
  const int64_t m = wide ? cols : rows;
  const int64_t sb = x.stride(0);
  const int64_t sn = wide ? x.stride(1) : x.stride(2);
  const int64_t sm = wide ? x.stride(2) : x.stride(1);
  double* stats = out[0].data_ptr<double>();
  double* sigma = out[1].data_ptr<double>();
  int64_t* nonfinite = out[2].data_ptr<int64_t>();
  int32_t* sweeps = out[3].data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spectral_stats", [&] {
    const scalar_t* base = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        spectral_one<scalar_t>(base + b * sb, n, m, sn, sm, ws, method, stats + b * sp::kNumStats,
                               sigma + b * n, nonfinite + b, sweeps + b);
      }
    });
  });
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def(
      "spectral_stats(Tensor x, str method=\"auto\") -> (Tensor stats, Tensor sigma, Tensor nonfinite, Tensor sweeps)");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) { m.impl("spectral_stats", &spectral_stats_cpu); }
