// fastdiag::spectral_stats - schema and the CPU implementation (parallel over the batch).
//
// The eigenvalue math (pivoted Cholesky + one-sided Jacobi, Householder + tridiagonal QR) and
// the statistics live in spectral.h, shared with the CUDA kernel (spectral_cuda.cu, glued in
// spectral_cuda_glue.cpp); this file adds the SIMD Gram panel and the batch driver.
// Contract: fastdiag/ops/spectral.py (public wrapper, torch fallback = executable spec).
//
// Op: spectral_stats(x [..., rows, cols] float32/float16/bfloat16/float64, any strides,
//                    method "auto" | "jacobi" | "tridiagonal"; "auto" is "tridiagonal" here)
//   -> (stats f64[..., 5]   effective_rank, effective_rank_ratio, top1_singular_share,
//                            stable_rank, condition_number (NaN where nonfinite > 0),
//       sigma f64[..., r]   singular values, descending, r = min(rows, cols),
//       nonfinite i64[...]  count of NaN / inf entries of each matrix,
//       iterations i32[...] per matrix: Jacobi sweeps ("jacobi") or implicit QR steps
//                           ("tridiagonal"); 0 for zero and non-finite matrices)

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

// Adds Y[:, panel] Y[:, panel]^T into the upper triangle of g (n x n, leading dimension ldg)
// from the float64 panel buf (n8 rows, zero past n; kc columns, a multiple of 8, zero past the
// data). 2 x 8 tiles of 8-wide sums: 16 accumulators + 10 operands fit the 32 vector registers
// of AVX-512 (4 x 8 spills); each tile sums in a fixed order, so results do not depend on
// threads. Tiles left of the diagonal are skipped, entries left of it in a tile dropped.
void gram_panel(const double* buf, int n, int n8, int ldb, int kc, double* g, int ldg) {
  for (int i0 = 0; i0 < n; i0 += 2) {
    for (int j0 = i0 / 8 * 8; j0 < n8; j0 += 8) {
      v8d acc[2][8] = {};
      const double* a0 = buf + (int64_t)i0 * ldb;
      const double* b0 = buf + (int64_t)j0 * ldb;
      for (int k = 0; k < kc; k += 8) {
        const v8d x0 = load8(a0 + k), x1 = load8(a0 + ldb + k);
        for (int v = 0; v < 8; ++v) {
          const v8d y = load8(b0 + (int64_t)v * ldb + k);
          acc[0][v] += x0 * y;
          acc[1][v] += x1 * y;
        }
      }
      for (int u = 0; u < 2; ++u) {
        for (int v = 0; v < 8; ++v) {
          const int i = i0 + u, j = j0 + v;
          if (i >= n || j >= n || j < i) continue;
          const v8d t = acc[u][v];
          g[(int64_t)i * ldg + j] += ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
        }
      }
    }
  }
}

void gram_mirror(double* g, int n, int ldg) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) g[(int64_t)i * ldg + j] = g[(int64_t)j * ldg + i];
}

enum class Method { kJacobi, kTridiagonal };

// Matrices whose tridiagonal QR iterations one thread interleaves: each iteration is a chain
// of dependent sqrt / division latencies, so four chains in flight run ~2.7x faster than one.
constexpr int kGroup = 4;

struct Workspace {
  std::vector<double> a;      // n x n8: Gram, then R or the Householder-reduced matrix
  std::vector<double> panel;  // n8 x kPanel (rows past n stay zero)
  std::vector<double> scale, inv_scale, coef, u, z, sigma;  // n8 each: per-matrix scratch
  std::vector<double> lambda, diag, offdiag;                // kGroup x n8: per group slot
  int n = -1;
  void resize(int n_) {
    if (n_ == n) return;
    n = n_;
    const int n8 = (n + 7) / 8 * 8;
    a.assign((size_t)n * n8, 0.0);
    panel.assign((size_t)n8 * kPanel, 0.0);
    for (auto* v : {&scale, &inv_scale, &u, &z, &sigma}) v->assign(n8, 0.0);
    coef.assign(2 * (n / 2 + 1), 0.0);
    for (auto* v : {&lambda, &diag, &offdiag}) v->assign((size_t)kGroup * n8, 0.0);
  }
};

// ws.a <- the Gram matrix G = Y Y^T (full, rows zero-padded to n8) of one matrix,
// Y[i, k] = x[i * sn + k * sm], i < n (short side), k < m (long side). Returns the number of
// NaN / inf entries of Y (G is not formed when there are any).
template <typename T>
int64_t gram_matrix(const T* x, int n, int64_t m, int64_t sn, int64_t sm, Workspace& ws) {
  const int n8 = (n + 7) / 8 * 8;
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
    if (nonfinite == 0) gram_panel(panel, n, n8, kPanel, kpad, a, n8);
  }
  if (nonfinite == 0) gram_mirror(a, n, n8);
  return nonfinite;
}

// stats / sigma (descending) of one matrix from the eigenvalues lambda[0..n-1] of its Gram.
void finish(const double* lambda, int n, bool failed, Workspace& ws, double* stats,
            double* sigma_out) {
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

// Matrices [begin, end) of the batch (one thread), in groups of kGroup. Every matrix's
// arithmetic is the same whatever its group or thread: results do not depend on threads.
template <typename T>
void spectral_range(const T* base, int64_t begin, int64_t end, int64_t sb, int n, int64_t m,
                    int64_t sn, int64_t sm, Method method, Workspace& ws, double* stats,
                    double* sigma, int64_t* nonfinite, int32_t* iterations) {
  ws.resize(n);
  const int n8 = (n + 7) / 8 * 8;
  double* a = ws.a.data();
  for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
    const int count = (int)std::min<int64_t>(kGroup, end - g0);
    sp::TridiagonalQR qr[kGroup];
    bool iterate[kGroup] = {};
    double max_diag[kGroup] = {};
    for (int j = 0; j < count; ++j) {
      const int64_t b = g0 + j;
      double* lambda = ws.lambda.data() + (int64_t)j * n8;
      iterations[b] = 0;
      nonfinite[b] = gram_matrix<T>(base + b * sb, n, m, sn, sm, ws);
      if (nonfinite[b] > 0) continue;
      double md = 0.0;
      for (int i = 0; i < n; ++i) md = std::max(md, a[(int64_t)i * n8 + i]);
      max_diag[j] = md;
      if (!(md > 0.0)) {
        std::fill(lambda, lambda + n, 0.0);  // zero matrix
      } else if (method == Method::kJacobi) {
        const int k = sp::pivoted_cholesky(a, n, n8, sp::rank_cut(n, md));
        iterations[b] = sp::jacobi_rows<SimdRowOps>(a, k, n8, n8, ws.scale.data(),
                                                ws.inv_scale.data(), lambda, ws.coef.data());
        std::fill(lambda + k, lambda + n, 0.0);
      } else {
        // scaled to max diag 1, so the QR iteration's absolute threshold is scale-free
        const double inv = 1.0 / md;
        for (int i = 0; i < n; ++i) SimdRowOps::scale(a + (int64_t)i * n8, n8, inv);
        double* d = ws.diag.data() + (int64_t)j * n8;
        double* e = ws.offdiag.data() + (int64_t)j * n8;
        sp::householder_tridiagonal<SimdRowOps>(a, n, n8, d, e, ws.u.data(), ws.z.data());
        sp::tridiagonal_qr_init(&qr[j], d, e, n);
        iterate[j] = true;
      }
    }
    for (bool busy = true; busy;) {
      busy = false;
      for (int j = 0; j < count; ++j)
        if (iterate[j]) busy |= (iterate[j] = sp::tridiagonal_qr_tick(&qr[j]));
    }
    for (int j = 0; j < count; ++j) {
      const int64_t b = g0 + j;
      if (nonfinite[b] > 0) {
        sp::stats_nonfinite(stats + b * sp::kNumStats);
        for (int i = 0; i < n; ++i) sigma[b * n + i] = sp::nan_value();
        continue;
      }
      double* lambda = ws.lambda.data() + (int64_t)j * n8;
      bool failed = false;
      if (method == Method::kTridiagonal && max_diag[j] > 0.0) {
        const double* d = ws.diag.data() + (int64_t)j * n8;
        for (int i = 0; i < n; ++i) lambda[i] = d[i] * max_diag[j];
        failed = qr[j].failed;
        iterations[b] = qr[j].steps;
      }
      finish(lambda, n, failed, ws, stats + b * sp::kNumStats, sigma + b * n);
    }
  }
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
  int32_t* iterations = out[3].data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spectral_stats", [&] {
    const scalar_t* base = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Workspace ws;
      spectral_range<scalar_t>(base, begin, end, sb, n, m, sn, sm, method, ws, stats, sigma,
                               nonfinite, iterations);
    });
  });
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiag, m) {
  m.def(
      "spectral_stats(Tensor x, str method=\"auto\") -> (Tensor stats, Tensor sigma, Tensor nonfinite, Tensor iterations)");
}

TORCH_LIBRARY_IMPL(fastdiag, CPU, m) { m.impl("spectral_stats", &spectral_stats_cpu); }
