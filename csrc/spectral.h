// fastdiag spectral statistics: the math shared by the CPU (spectral_cpu.cpp) and CUDA
// (spectral_cuda.cu) implementations of fastdiag::spectral_stats. Plain C++ with no torch or
// CUDA headers, every function __host__ __device__, so nvcc compiles it in seconds and the CPU
// build (and its tests) exercises the same code the GPU runs.
//
// For a matrix X [rows, cols] let n = min(rows, cols), m = max(rows, cols). Per matrix:
//   1. G = Y Y^T (n x n, float64 sums) where Y is X or X^T, whichever has n rows.
//   2. The eigenvalues lambda of G, by one of two methods:
//      "jacobi" (CPU and CUDA):
//        a. Pivoted Cholesky G = P R^T R P^T, stopping at the first pivot <= rank_cut,
//           rank_cut = n * eps64 * max(diag G): below that a pivot is rounding noise of the Gram
//           itself. R has k = numerical-rank rows (the Drmac-Veselic preconditioner for Jacobi).
//        b. Squared singular values of R by the one-sided (Hestenes) cyclic Jacobi method on
//           the k rows of R: rotate row pairs until every pair is orthogonal to
//           |<r_p, r_q>| <= kJacobiTol * |r_p| |r_q|; then lambda_i = |r_i|^2. This is the
//           implicit form of two-sided Jacobi on R R^T (same rotations, same convergence), but
//           each rotation touches two contiguous rows only, so it vectorises on the CPU and
//           coalesces on the GPU. Pairs are visited in round-robin (tournament) order: the n/2
//           pairs of a round are disjoint, so a GPU block rotates them in parallel.
//        About 6 n^3 flops per sweep and ~8 sweeps for a random matrix: the method for a GPU
//        block, where a round's n / 2 rotations run at once.
//      "tridiagonal" (CPU): Householder reduction of G to tridiagonal form (4/3 n^3 flops),
//        then implicit QR steps with Wilkinson shifts on the tridiagonal (O(n^2), eigenvalues
//        only). Some 30x fewer flops than Jacobi, all of them in one serial thread's rows: the
//        method for a CPU core.
//   3. lambda <= eigen_cut = n * eps64 * lambda_max -> 0 (both methods resolve eigenvalues of G
//      to about eps64 * lambda_max, so smaller ones are noise), sigma = sqrt(lambda), then the
//      statistics (docs/metrics.md §4).
//
// Accuracy: singular values below sqrt(n * eps64) * sigma_1 (~1.7e-7 sigma_1 for n = 128)
// are not resolved by any Gram-based method and are reported as 0 (so condition numbers above
// ~1e7 read as inf). Those above are accurate to ~eps64 (sigma_1 / sigma_i)^2 relative.

#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdiag {
namespace spectral {

constexpr int kMaxDim = 1024;         // largest n = min(rows, cols) the kernels take
constexpr int kMaxSweeps = 40;        // hard cap; random 128 x 128 Grams need ~8 (tested)
constexpr double kJacobiTol = 1e-9;   // rotate a row pair when |cos(angle)| exceeds this
constexpr double kStopTol = 1e-6;     // stop after a sweep whose largest |cos| was below this
constexpr double kEps = 2.220446049250313e-16;

// Output slots of the stats vector (mirrors fastdiag/ops/spectral.py: SpectralStats).
enum StatSlot : int {
  kEffectiveRank = 0,
  kEffectiveRankRatio,
  kTop1SingularShare,
  kStableRank,
  kConditionNumber,
  kNumStats
};

FD_HD double inf_value() { return __builtin_huge_val(); }
FD_HD double nan_value() { return __builtin_nan(""); }
// True for finite x (NaN - NaN and inf - inf are NaN); needs no fast-math, which we never use.
FD_HD bool is_finite(double x) { return (x - x) == 0.0; }

// Thresholds below which a Cholesky pivot / an eigenvalue of G is 0 (see the header comment).
FD_HD double rank_cut(int n, double max_diag) { return n * kEps * max_diag; }
FD_HD double eigen_cut(int n, double lambda_max) { return n * kEps * lambda_max; }

// ---- round-robin pair order -----------------------------------------------------------------
// ne = n rounded up to even; a sweep is ne - 1 rounds of ne / 2 disjoint pairs (circle method:
// slot 0 is fixed, the other slots rotate by one per round). Returns p < q; q >= n marks the
// dummy partner of an odd n (skip the pair).
FD_HD int round_robin_player(int slot, int round, int ne) {
  if (slot == 0) return 0;
  const int v = slot - 1 + round;  // < 2 (ne - 1): one conditional subtraction is the modulo
  return 1 + (v >= ne - 1 ? v - (ne - 1) : v);
}
FD_HD void round_robin_pair(int round, int k, int ne, int* p, int* q) {
  const int a = round_robin_player(k, round, ne);
  const int b = round_robin_player(ne - 1 - k, round, ne);
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// ---- one Jacobi rotation --------------------------------------------------------------------
// Rows p, q with squared norms a, b and inner product c. The rotation that zeroes c (Golub and
// Van Loan, sym.schur2 on [[a, c], [c, b]]), t = tan(theta), |t| <= 1:
//   r_p' = cs * r_p - sn * r_q,  r_q' = sn * r_p + cs * r_q,  |r_p'|^2 = a - t c, |r_q'|^2 = b + t c.
// Rows are stored scaled (true row i = scale_i * stored row i), so a rotation costs two FMAs
// per element ("fast" rotation): stored_p' = stored_p - alpha * stored_q,
// stored_q' = stored_q + beta * stored_p with alpha = t s_q / s_p, beta = t s_p / s_q, and
// s_p' = cs s_p, s_q' = cs s_q. Scales are folded back into the rows at every sweep start,
// where the squared norms are also recomputed exactly (within a sweep they are tracked).
FD_HD bool needs_rotation(double a, double b, double c) {
  // |c| > tol sqrt(a b); squared, no sqrt (a, b <= ~1e80 for float32-range data: no overflow)
  return c * c > (kJacobiTol * kJacobiTol) * (a * b);
}
// tan(theta) without forming zeta = (b - a) / (2c): t = 2c / (d + sign(d) sqrt(d^2 + 4c^2)),
// d = b - a (d = 0 gives |t| = 1). No overflow for a, b <= ~1e150.
FD_HD double jacobi_tangent(double a, double b, double c) {
  const double d = b - a;
  const double h = sqrt(d * d + 4.0 * c * c);
  return 2.0 * c / (d + (d >= 0.0 ? h : -h));
}

struct PairPlan {
  bool rotate;
  bool large;          // |cos| > kStopTol: the sweep has not converged yet
  double alpha, beta;  // element update coefficients (see above)
  double sp, sq;       // new scales of rows p, q
  double ip, iq;       // their inverses (tracked, so a plan costs two divisions)
  double a, b;         // new tracked squared norms of rows p, q
};
// Pure function of the pair's state (scales sp, sq and inverses ip, iq, tracked squared norms
// a, b) and the dot product of the stored rows, so the lanes of a GPU warp can all evaluate it.
// Shared by the CPU and GPU drivers.
FD_HD PairPlan plan_pair(double stored_dot, double sp, double sq, double ip, double iq, double a,
                         double b) {
  PairPlan plan;
  plan.rotate = false;
  plan.large = false;
  plan.alpha = plan.beta = 0.0;
  plan.sp = sp;
  plan.sq = sq;
  plan.ip = ip;
  plan.iq = iq;
  plan.a = a;
  plan.b = b;
  const double c = sp * sq * stored_dot;
  if (!needs_rotation(a, b, c)) return plan;
  const double t = jacobi_tangent(a, b, c);
  const double inv_cs = sqrt(1.0 + t * t);
  const double cs = 1.0 / inv_cs;
  plan.rotate = true;
  plan.large = c * c > (kStopTol * kStopTol) * (a * b);
  plan.alpha = t * sq * ip;
  plan.beta = t * sp * iq;
  plan.sp = cs * sp;
  plan.sq = cs * sq;
  plan.ip = inv_cs * ip;
  plan.iq = inv_cs * iq;
  const double ap = a - t * c;
  plan.a = ap > 0.0 ? ap : 0.0;
  plan.b = b + t * c;
  return plan;
}

// Element loops. Strided forms: one thread (or lane) handles begin, begin + step, ... < end;
// the CPU passes its own SIMD versions of the contiguous forms (RowOps below).
FD_HD double dot_strided(const double* x, const double* y, int begin, int end, int step) {
  double acc = 0.0;
  for (int i = begin; i < end; i += step) acc += x[i] * y[i];
  return acc;
}
FD_HD void update_strided(double* x, double* y, int begin, int end, int step, double alpha,
                          double beta) {
  for (int i = begin; i < end; i += step) {
    const double u = x[i], v = y[i];
    x[i] = u - alpha * v;
    y[i] = v + beta * u;
  }
}
FD_HD void scale_strided(double* x, int begin, int end, int step, double s) {
  for (int i = begin; i < end; i += step) x[i] *= s;
}

// Portable contiguous row operations (the CPU build substitutes SIMD ones with the same API).
struct RowOps {
  static FD_HD double dot(const double* x, const double* y, int n) {
    return dot_strided(x, y, 0, n, 1);
  }
  static FD_HD void update(double* x, double* y, int n, double alpha, double beta) {
    update_strided(x, y, 0, n, 1, alpha, beta);
  }
  static FD_HD void scale(double* x, int n, double s) { scale_strided(x, 0, n, 1, s); }
  // x -= a * w + b * v (the symmetric rank-2 update of one row)
  static FD_HD void rank2(double* x, const double* v, const double* w, int n, double a,
                          double b) {
    for (int i = 0; i < n; ++i) x[i] -= a * w[i] + b * v[i];
  }
};

// ---- pivoted Cholesky, one step -------------------------------------------------------------
// A is the full symmetric n x n working matrix (leading dimension lda), already holding rows
// 0..k-1 of R in its upper part. After pivot j (>= k, largest remaining diagonal) has been
// swapped into position k (rows and columns, whole matrix), these finish step k:
//   cholesky_scale_row:    A[k, k] = sqrt(A[k, k]); A[k, j] /= A[k, k] for j > k
//   cholesky_update_entry: A[i, j] -= A[k, i] * A[k, j] for i, j > k
FD_HD void swap_values(double* a, double* b) {
  const double t = *a;
  *a = *b;
  *b = t;
}
FD_HD double cholesky_update_entry(double aij, double rki, double rkj) { return aij - rki * rkj; }

// Serial pivoted Cholesky on the full symmetric A (CPU; the GPU runs the same steps with the
// loops split over threads). Returns k, the number of rows of R (0 for a zero matrix); rows
// 0..k-1 of A hold R with zeros left of the diagonal.
FD_HD int pivoted_cholesky(double* A, int n, int lda, double cut) {
  int k = 0;
  for (; k < n; ++k) {
    int piv = k;
    double best = A[(int64_t)k * lda + k];
    for (int i = k + 1; i < n; ++i) {
      const double d = A[(int64_t)i * lda + i];
      if (d > best) {
        best = d;
        piv = i;
      }
    }
    if (!(best > cut)) break;
    if (piv != k) {
      for (int j = 0; j < n; ++j) swap_values(&A[(int64_t)k * lda + j], &A[(int64_t)piv * lda + j]);
      for (int i = 0; i < n; ++i) swap_values(&A[(int64_t)i * lda + k], &A[(int64_t)i * lda + piv]);
    }
    double* rk = A + (int64_t)k * lda;
    const double d = sqrt(rk[k]);
    rk[k] = d;
    const double inv = 1.0 / d;
    for (int j = k + 1; j < n; ++j) rk[j] *= inv;
    for (int i = k + 1; i < n; ++i) {
      double* ai = A + (int64_t)i * lda;
      const double rki = rk[i];
      for (int j = k + 1; j < n; ++j) ai[j] = cholesky_update_entry(ai[j], rki, rk[j]);
    }
  }
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < i; ++j) A[(int64_t)i * lda + j] = 0.0;
  return k;
}

// Folds the scales into the rows and recomputes their squared norms exactly (sweep start).
template <typename Ops>
FD_HD void jacobi_refresh(double* A, int k, int n, int lda, double* s, double* is, double* a2) {
  for (int i = 0; i < k; ++i) {
    double* ri = A + (int64_t)i * lda;
    if (s[i] != 1.0) Ops::scale(ri, n, s[i]);
    s[i] = is[i] = 1.0;
    a2[i] = Ops::dot(ri, ri, n);
  }
}

// One-sided cyclic Jacobi on rows 0..k-1 (length n, leading dimension lda) of A, one thread.
// Each round runs in three phases, as on the GPU: the dot products of its (disjoint) pairs,
// their rotation plans, the row updates. Since the pairs are disjoint this equals visiting them
// one by one, but the plans' division chains are independent and overlap (for small n they
// dominate). s, is, a2: k doubles each (scales, inverse scales, squared norms); coef:
// 2 * (k / 2 + 1) doubles.
// On return the rows are unscaled and a2 holds their exact squared norms (the eigenvalues of
// G). Convergence: a sweep in which no pair was further from orthogonal than kStopTol ends the
// iteration (its rotations, all < kStopTol, leave pairs at ~kStopTol^2 by the quadratic
// convergence of cyclic Jacobi, far below kJacobiTol). Returns the sweeps run (<= kMaxSweeps),
// 0 when k < 2.
template <typename Ops>
FD_HD int jacobi_rows(double* A, int k, int n, int lda, double* s, double* is, double* a2,
                      double* coef) {
  for (int i = 0; i < k; ++i) s[i] = 1.0;
  jacobi_refresh<Ops>(A, k, n, lda, s, is, a2);
  if (k < 2) return 0;
  const int ne = k + (k & 1), half = ne / 2;
  double* dots = coef;  // phase 1 writes dots[slot]; phase 2 turns them into alpha[slot]
  double* beta = coef + half;
  int sweep = 0;
  bool clean = false;
  while (!clean && sweep < kMaxSweeps) {
    if (sweep++ > 0) jacobi_refresh<Ops>(A, k, n, lda, s, is, a2);
    clean = true;
    for (int round = 0; round < ne - 1; ++round) {
      for (int slot = 0; slot < half; ++slot) {
        int p, q;
        round_robin_pair(round, slot, ne, &p, &q);
        dots[slot] = q < k ? Ops::dot(A + (int64_t)p * lda, A + (int64_t)q * lda, n) : 0.0;
      }
      for (int slot = 0; slot < half; ++slot) {
        int p, q;
        round_robin_pair(round, slot, ne, &p, &q);
        beta[slot] = 0.0;
        if (q >= k) continue;
        const PairPlan pl = plan_pair(dots[slot], s[p], s[q], is[p], is[q], a2[p], a2[q]);
        dots[slot] = pl.alpha;  // 0 when the pair does not rotate
        beta[slot] = pl.beta;
        if (!pl.rotate) continue;
        s[p] = pl.sp;
        s[q] = pl.sq;
        is[p] = pl.ip;
        is[q] = pl.iq;
        a2[p] = pl.a;
        a2[q] = pl.b;
        if (pl.large) clean = false;
      }
      for (int slot = 0; slot < half; ++slot) {
        if (beta[slot] == 0.0) continue;  // no rotation (a rotation has t != 0)
        int p, q;
        round_robin_pair(round, slot, ne, &p, &q);
        Ops::update(A + (int64_t)p * lda, A + (int64_t)q * lda, n, dots[slot], beta[slot]);
      }
    }
  }
  jacobi_refresh<Ops>(A, k, n, lda, s, is, a2);  // unscale; exact norms of the final rows
  return sweep;
}

// ---- Householder tridiagonalisation + implicit QR (method "tridiagonal") --------------------
// Reduces the symmetric A (n x n, full storage, rows of length ld zero-padded past n, ld a
// multiple of the Ops' vector width) to tridiagonal T = Q^T A Q in place: d[0..n-1] gets the
// diagonal, e[0..n-2] the off-diagonal. v, w: ld doubles of scratch each.
// Step k reflects x = A[k+1:, k] (= row k past the diagonal, contiguous) onto alpha e_1 with
// H = I - beta u u^T, then A22 <- H A22 H = A22 - u z^T - z u^T with p = beta A22 u,
// z = p - (beta / 2)(p . u) u. u and z are kept zero left of k + 1, so the row operations can
// start at the aligned index below k + 1 and stay whole vectors.
template <typename Ops>
FD_HD void householder_tridiagonal(double* A, int n, int ld, double* d, double* e, double* v,
                                   double* w) {
  for (int i = 0; i < ld; ++i) v[i] = w[i] = 0.0;
  for (int k = 0; k + 2 < n; ++k) {
    double* rk = A + (int64_t)k * ld;
    d[k] = rk[k];
    double tail = 0.0;  // |x[1:]|^2
    for (int i = k + 2; i < n; ++i) tail += rk[i] * rk[i];
    const double x0 = rk[k + 1];
    if (tail == 0.0) {  // already tridiagonal in this column: H = I
      e[k] = x0;
      continue;
    }
    const double norm = sqrt(x0 * x0 + tail);
    const double alpha = x0 > 0.0 ? -norm : norm;  // sign opposite to x0: no cancellation in u0
    const double u0 = x0 - alpha;
    const double beta = 1.0 / (norm * (norm + (x0 > 0.0 ? x0 : -x0)));  // 2 / |u|^2
    e[k] = alpha;
    const int start = (k + 1) / 8 * 8;  // Ops act on whole 8-vectors from here
    v[k] = w[k] = 0.0;
    v[k + 1] = u0;
    for (int i = k + 2; i < n; ++i) v[i] = rk[i];
    double pu = 0.0;
    for (int i = k + 1; i < n; ++i) {
      w[i] = beta * Ops::dot(A + (int64_t)i * ld + start, v + start, ld - start);
      pu += w[i] * v[i];
    }
    const double half = 0.5 * beta * pu;
    for (int i = k + 1; i < n; ++i) w[i] -= half * v[i];
    for (int i = k + 1; i < n; ++i)
      Ops::rank2(A + (int64_t)i * ld + start, v + start, w + start, ld - start, v[i], w[i]);
  }
  if (n >= 2) {
    d[n - 2] = A[(int64_t)(n - 2) * ld + n - 2];
    e[n - 2] = A[(int64_t)(n - 2) * ld + n - 1];
  }
  d[n - 1] = A[(int64_t)(n - 1) * ld + n - 1];
}

// Eigenvalues of the symmetric tridiagonal (d [n], e [n - 1]) into d, unsorted; e is destroyed.
// Implicit QR steps with the Wilkinson shift on the bottom unreduced block (Golub and Van Loan,
// Algorithm 8.3.2), chasing the bulge with Givens rotations. e[i] is set to zero when
// |e[i]| <= eps64 (|d[i]| + |d[i + 1]|) or <= kTinyOffdiag (callers scale T to norm ~1, so an
// entry of 1e-20 moves the eigenvalues far less than eigen_cut). At most 30 n QR steps (never
// reached in practice; then `failed` is set and the caller reports NaN).
//
// The iteration is a state machine advanced one rotation per tick, because each rotation
// depends on the previous one (a sqrt and a division deep): one thread interleaving the ticks
// of several matrices keeps that many independent chains in flight.
constexpr double kTinyOffdiag = 1e-20;
struct TridiagonalQR {
  double* d;
  double* e;
  int hi;      // d[hi + 1..] are eigenvalues; done when hi == 0
  int k;       // next rotation of the current QR step (k < end), or -1 between steps
  int lo, end;  // the current step's unreduced block is [lo, end]
  int steps;   // QR steps started
  int max_steps;
  bool failed;
  double x, z;  // the entries the next rotation zeroes against each other
};
FD_HD void tridiagonal_qr_init(TridiagonalQR* s, double* d, double* e, int n) {
  s->d = d;
  s->e = e;
  s->hi = n - 1;
  s->k = -1;
  s->lo = s->end = 0;
  s->steps = 0;
  s->max_steps = 30 * n;
  s->failed = false;
  s->x = s->z = 0.0;
}
FD_HD bool negligible_offdiag(const double* d, const double* e, int i) {
  const double a = fabs(e[i]);
  return a <= kEps * (fabs(d[i]) + fabs(d[i + 1])) || a <= kTinyOffdiag;
}
// One tick: a rotation of the current QR step, or (between steps) deflation and the start of
// the next step. Returns false once every eigenvalue is found (or the iteration failed).
FD_HD bool tridiagonal_qr_tick(TridiagonalQR* s) {
  double* d = s->d;
  double* e = s->e;
  if (s->k < 0) {
    while (s->hi > 0 && negligible_offdiag(d, e, s->hi - 1)) --s->hi;
    const int hi = s->hi;
    if (hi == 0) return false;
    if (++s->steps > s->max_steps) {
      s->failed = true;
      return false;
    }
    int lo = hi - 1;
    while (lo > 0 && !negligible_offdiag(d, e, lo - 1)) --lo;
    // Wilkinson shift: the eigenvalue of the trailing 2 x 2 nearer to d[hi]
    const double half_gap = 0.5 * (d[hi - 1] - d[hi]);
    const double b2 = e[hi - 1] * e[hi - 1];
    const double root = sqrt(half_gap * half_gap + b2);
    const double mu = d[hi] - b2 / (half_gap + (half_gap >= 0.0 ? root : -root));
    s->x = d[lo] - mu;
    s->z = e[lo];
    s->k = s->lo = lo;
    s->end = hi;
    return true;
  }
  // rotation R = [[c, s], [-s, c]] on rows / columns (k, k + 1), T <- R T R^T, chosen so that
  // R [x, z]^T = [r, 0]^T: at k > lo, x and z are T[k, k-1] and the bulge T[k+1, k-1]
  const int k = s->k;
  const double x = s->x, z = s->z;
  const double r = sqrt(x * x + z * z);
  const double inv = r > 0.0 ? 1.0 / r : 0.0;
  const double c = r > 0.0 ? x * inv : 1.0;
  const double sn = z * inv;
  if (k > s->lo) e[k - 1] = r;
  const double a = d[k], b = e[k], dn = d[k + 1];
  const double cs = c * sn, cc = c * c, ss = sn * sn;
  d[k] = cc * a + 2.0 * cs * b + ss * dn;
  d[k + 1] = ss * a - 2.0 * cs * b + cc * dn;
  e[k] = cs * (dn - a) + (cc - ss) * b;
  double bulge = 0.0;
  if (k + 1 < s->end) {
    bulge = sn * e[k + 1];
    e[k + 1] *= c;
  }
  s->x = e[k];
  s->z = bulge;
  s->k = k + 1 < s->end ? k + 1 : -1;
  return true;
}
// The whole iteration for one matrix; returns the QR steps taken, or -1 on failure.
FD_HD int tridiagonal_eigenvalues(double* d, double* e, int n) {
  TridiagonalQR s;
  tridiagonal_qr_init(&s, d, e, n);
  while (tridiagonal_qr_tick(&s)) {
  }
  return s.failed ? -1 : s.steps;
}

// ---- statistics from the eigenvalues of G ---------------------------------------------------
// With sigma_i = sqrt(lambda_i) and S = sum sigma: H(p) = log S - (1/S) sum sigma log sigma, so
// one pass of five sums gives every statistic (no sort, mergeable in any fixed tree order).
struct SigmaSums {
  double sum;       // sum sigma
  double sum_slog;  // sum sigma log sigma (sigma > 0)
  double sum_sq;    // sum sigma^2
  double max;       // sigma_1
  double min;       // sigma_r (zeros included)
};
FD_HD void sigma_init(SigmaSums* s) {
  s->sum = 0.0;
  s->sum_slog = 0.0;
  s->sum_sq = 0.0;
  s->max = 0.0;
  s->min = inf_value();
}
FD_HD double sigma_from_lambda(double lambda, double cut) { return lambda > cut ? sqrt(lambda) : 0.0; }
FD_HD void sigma_add(SigmaSums* s, double sigma) {
  s->sum += sigma;
  if (sigma > 0.0) s->sum_slog += sigma * log(sigma);
  s->sum_sq += sigma * sigma;
  s->max = sigma > s->max ? sigma : s->max;
  s->min = sigma < s->min ? sigma : s->min;
}
FD_HD void sigma_merge(SigmaSums* s, const SigmaSums& o) {
  s->sum += o.sum;
  s->sum_slog += o.sum_slog;
  s->sum_sq += o.sum_sq;
  s->max = o.max > s->max ? o.max : s->max;
  s->min = o.min < s->min ? o.min : s->min;
}
// r = min(rows, cols). A zero matrix gives effective rank 0, ratio 0, top-1 share 0, stable
// rank 0 and condition number inf (sigma_r = 0).
FD_HD void stats_finalize(const SigmaSums& s, int r, double* out) {
  if (!(s.sum > 0.0)) {
    out[kEffectiveRank] = 0.0;
    out[kEffectiveRankRatio] = 0.0;
    out[kTop1SingularShare] = 0.0;
    out[kStableRank] = 0.0;
    out[kConditionNumber] = inf_value();
    return;
  }
  double h = log(s.sum) - s.sum_slog / s.sum;
  h = h > 0.0 ? h : 0.0;  // rounding can give -1e-16 for rank one
  const double erank = exp(h);
  out[kEffectiveRank] = erank;
  out[kEffectiveRankRatio] = erank / r;
  out[kTop1SingularShare] = s.max / s.sum;
  out[kStableRank] = s.sum_sq / (s.max * s.max);
  out[kConditionNumber] = s.min > 0.0 ? s.max / s.min : inf_value();
}
FD_HD void stats_nonfinite(double* out) {
  for (int i = 0; i < kNumStats; ++i) out[i] = nan_value();
}

}  // namespace spectral
}  // namespace fastdiag
