// fastdiag::spectral_stats on CUDA: one thread block per matrix (a plain C-ABI launcher; the
// torch glue is spectral_cuda_glue.cpp, so this file includes no torch header and nvcc
// compiles it in seconds). The math is spectral.h, shared with the CPU build:
//   nonfinite count -> Gram (a warp per entry) -> pivoted Cholesky (threads over the trailing
//   block) -> one-sided Jacobi (a round's disjoint pairs in parallel, a warp per pair) ->
//   statistics (block tree reduction) and the sorted singular values (rank placement).
// The n x n working matrix lives in shared memory when it fits (n <= ~165 on sm_90), else in a
// caller-provided global workspace; batches needing the workspace run in chunks. Every
// reduction has a fixed order: results do not depend on timing.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "spectral.h"

namespace {

namespace sp = fastdiag::spectral;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double load_elem(const float* p) { return (double)*p; }
__device__ __forceinline__ double load_elem(const double* p) { return *p; }
__device__ __forceinline__ double load_elem(const __half* p) { return (double)__half2float(*p); }
__device__ __forceinline__ double load_elem(const __nv_bfloat16* p) {
  return (double)__bfloat162float(*p);
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // butterfly: every lane holds the same, order-fixed sum
}

// Max of every thread's v, returned to every thread; red: kThreads doubles of shared scratch,
// free again on return (a tree in fixed order, so the result does not depend on timing).
__device__ __forceinline__ double block_max(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) red[tid] = fmax(red[tid], red[tid + w]);
    __syncthreads();
  }
  const double out = red[0];
  __syncthreads();
  return out;
}

// Shared scratch besides the working matrix (sizes in doubles, n <= kMaxDim).
struct Scratch {
  double* s;      // n   Jacobi row scales
  double* is;     // n   their inverses
  double* a2;     // n   tracked squared row norms, then eigenvalues
  double* sigma;  // n   singular values (unsorted)
  double* red;    // kThreads * 5  reduction slots
  int* ired;      // kThreads      reduction indices
  long long* cnt; // kThreads      nonfinite counts
};

__host__ __device__ inline size_t scratch_bytes(int n) {
  return (size_t)(4 * n + 5 * kThreads) * sizeof(double) + kThreads * sizeof(int) +
         kThreads * sizeof(long long);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    spectral_kernel(const T* __restrict__ x, int n, int64_t m, int64_t sb, int64_t sn, int64_t sm,
                    int64_t batch_offset, double* __restrict__ stats, double* __restrict__ sigma_out,
                    long long* __restrict__ nonfinite_out, int* __restrict__ sweeps_out,
                    double* workspace, bool use_shared) {
  extern __shared__ double smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = batch_offset + blockIdx.x;
  const T* xb = x + b * sb;
  double* A = use_shared ? smem : workspace + (int64_t)blockIdx.x * n * n;
  char* base = reinterpret_cast<char*>(smem) + (use_shared ? (size_t)n * n * sizeof(double) : 0);
  Scratch sc;
  sc.s = reinterpret_cast<double*>(base);
  sc.is = sc.s + n;
  sc.a2 = sc.is + n;
  sc.sigma = sc.a2 + n;
  sc.red = sc.sigma + n;
  sc.ired = reinterpret_cast<int*>(sc.red + 5 * kThreads);
  sc.cnt = reinterpret_cast<long long*>(sc.ired + kThreads);
  __shared__ int s_flag, s_piv, s_rank;
  __shared__ double s_val;

  // 1. nonfinite count (threads along the long side: coalesced when it is contiguous)
  long long bad = 0;
  for (int i = 0; i < n; ++i)
    for (int64_t k = tid; k < m; k += kThreads) bad += !sp::is_finite(load_elem(xb + i * sn + k * sm));
  sc.cnt[tid] = bad;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) sc.cnt[tid] += sc.cnt[tid + w];
    __syncthreads();
  }
  const long long nonfinite = sc.cnt[0];
  if (nonfinite > 0) {
    if (tid == 0) {
      nonfinite_out[b] = nonfinite;
      sweeps_out[b] = 0;
      sp::stats_nonfinite(stats + b * sp::kNumStats);
    }
    for (int i = tid; i < n; i += kThreads) sigma_out[b * n + i] = sp::nan_value();
    return;
  }

  // 2. Gram G = Y Y^T: a warp per entry (i <= j), lanes along the long side
  for (int i = 0; i < n; ++i) {
    for (int j = i + warp; j < n; j += kWarps) {
      double acc = 0.0;
      for (int64_t k = lane; k < m; k += 32)
        acc += load_elem(xb + i * sn + k * sm) * load_elem(xb + j * sn + k * sm);
      acc = warp_sum(acc);
      if (lane == 0) {
        A[(int64_t)i * n + j] = acc;
        A[(int64_t)j * n + i] = acc;
      }
    }
  }
  __syncthreads();

  // 3. rank_cut (the Cholesky stop) from the largest diagonal entry
  double dmax = 0.0;
  for (int i = tid; i < n; i += kThreads) dmax = fmax(dmax, A[(int64_t)i * n + i]);
  const double cut = sp::rank_cut(n, block_max(dmax, sc.red));

  // 4. pivoted Cholesky (same pivot rule as sp::pivoted_cholesky: largest, then lowest index)
  if (tid == 0) s_rank = n;
  for (int k = 0; k < n; ++k) {
    double best = -1.0;
    int bi = n;
    for (int i = k + tid; i < n; i += kThreads) {
      const double d = A[(int64_t)i * n + i];
      if (d > best) {
        best = d;
        bi = i;
      }
    }
    sc.red[tid] = best;
    sc.ired[tid] = bi;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (tid < w) {
        const double o = sc.red[tid + w];
        const int oi = sc.ired[tid + w];
        if (o > sc.red[tid] || (o == sc.red[tid] && oi < sc.ired[tid])) {
          sc.red[tid] = o;
          sc.ired[tid] = oi;
        }
      }
      __syncthreads();
    }
    if (tid == 0) {
      s_piv = sc.ired[0];
      s_flag = sc.red[0] > cut;
      if (!s_flag) s_rank = k;
    }
    __syncthreads();
    if (!s_flag) break;
    const int piv = s_piv;
    if (piv != k) {
      for (int j = tid; j < n; j += kThreads)
        sp::swap_values(&A[(int64_t)k * n + j], &A[(int64_t)piv * n + j]);
      __syncthreads();
      for (int i = tid; i < n; i += kThreads)
        sp::swap_values(&A[(int64_t)i * n + k], &A[(int64_t)i * n + piv]);
      __syncthreads();
    }
    double* rk = A + (int64_t)k * n;
    if (tid == 0) {
      s_val = sqrt(rk[k]);
      rk[k] = s_val;
    }
    __syncthreads();
    const double inv = 1.0 / s_val;
    for (int j = k + 1 + tid; j < n; j += kThreads) rk[j] *= inv;
    __syncthreads();
    const int t = n - k - 1;
    for (int64_t e = tid; e < (int64_t)t * t; e += kThreads) {
      const int i = k + 1 + (int)(e / t), j = k + 1 + (int)(e % t);
      A[(int64_t)i * n + j] = sp::cholesky_update_entry(A[(int64_t)i * n + j], rk[i], rk[j]);
    }
    __syncthreads();
  }
  const int rank = s_rank;
  for (int64_t e = tid; e < (int64_t)rank * n; e += kThreads) {
    const int i = (int)(e / n), j = (int)(e % n);
    if (j < i) A[e] = 0.0;
  }
  __syncthreads();

  // 5. one-sided Jacobi on rows 0..rank-1: a warp per row (refresh) or per pair (rounds)
  auto refresh = [&]() {
    for (int i = warp; i < rank; i += kWarps) {
      double* ri = A + (int64_t)i * n;
      const double si = sc.s[i];
      if (si != 1.0) sp::scale_strided(ri, lane, n, 32, si);
      __syncwarp();
      const double nrm = warp_sum(sp::dot_strided(ri, ri, lane, n, 32));
      __syncwarp();
      if (lane == 0) {
        sc.s[i] = 1.0;
        sc.is[i] = 1.0;
        sc.a2[i] = nrm;
      }
    }
    __syncthreads();
  };
  for (int i = tid; i < rank; i += kThreads) sc.s[i] = 1.0;
  __syncthreads();
  refresh();
  int sweep = 0;
  if (rank >= 2) {
    const int ne = rank + (rank & 1);
    bool clean = false;
    while (!clean && sweep < sp::kMaxSweeps) {
      if (sweep++ > 0) refresh();
      int large = 0;
      for (int round = 0; round < ne - 1; ++round) {
        for (int slot = warp; slot < ne / 2; slot += kWarps) {
          int p, q;
          sp::round_robin_pair(round, slot, ne, &p, &q);
          if (q >= rank) continue;
          double* rp = A + (int64_t)p * n;
          double* rq = A + (int64_t)q * n;
          const double d = warp_sum(sp::dot_strided(rp, rq, lane, n, 32));
          const sp::PairPlan plan =
              sp::plan_pair(d, sc.s[p], sc.s[q], sc.is[p], sc.is[q], sc.a2[p], sc.a2[q]);
          __syncwarp();
          if (!plan.rotate) continue;
          if (lane == 0) {
            sc.s[p] = plan.sp;
            sc.s[q] = plan.sq;
            sc.is[p] = plan.ip;
            sc.is[q] = plan.iq;
            sc.a2[p] = plan.a;
            sc.a2[q] = plan.b;
          }
          large |= plan.large;
          sp::update_strided(rp, rq, lane, n, 32, plan.alpha, plan.beta);
          __syncwarp();
        }
        __syncthreads();
      }
      clean = !__syncthreads_or(large);
    }
    refresh();
  }

  // 6. eigen_cut from the largest eigenvalue, then the statistics and the sorted singular values
  double lmax = 0.0;
  for (int i = tid; i < rank; i += kThreads) lmax = fmax(lmax, sc.a2[i]);
  const double lcut = sp::eigen_cut(n, block_max(lmax, sc.red));
  sp::SigmaSums acc;
  sp::sigma_init(&acc);
  for (int i = tid; i < n; i += kThreads) {
    const double sg = sp::sigma_from_lambda(i < rank ? sc.a2[i] : 0.0, lcut);
    sc.sigma[i] = sg;
    sp::sigma_add(&acc, sg);
  }
  double* slot = sc.red + 5 * tid;
  slot[0] = acc.sum;
  slot[1] = acc.sum_slog;
  slot[2] = acc.sum_sq;
  slot[3] = acc.max;
  slot[4] = acc.min;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) {
      const double* o = sc.red + 5 * (tid + w);
      sp::SigmaSums mine{slot[0], slot[1], slot[2], slot[3], slot[4]};
      const sp::SigmaSums other{o[0], o[1], o[2], o[3], o[4]};
      sp::sigma_merge(&mine, other);
      slot[0] = mine.sum;
      slot[1] = mine.sum_slog;
      slot[2] = mine.sum_sq;
      slot[3] = mine.max;
      slot[4] = mine.min;
    }
    __syncthreads();
  }
  if (tid == 0) {
    const sp::SigmaSums total{sc.red[0], sc.red[1], sc.red[2], sc.red[3], sc.red[4]};
    sp::stats_finalize(total, n, stats + b * sp::kNumStats);
    nonfinite_out[b] = 0;
    sweeps_out[b] = sweep;
  }
  for (int i = tid; i < n; i += kThreads) {
    const double v = sc.sigma[i];
    int pos = 0;
    for (int j = 0; j < n; ++j) {
      const double u = sc.sigma[j];
      pos += (u > v) || (u == v && j < i);
    }
    sigma_out[b * n + pos] = v;
  }
}

int max_shared_bytes(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    v = 48 * 1024;
  return v;
}

template <typename T>
cudaError_t launch(const void* x, int64_t batch, int n, int64_t m, int64_t sb, int64_t sn,
                   int64_t sm, double* stats, double* sigma, long long* nonfinite, int* sweeps,
                   double* workspace, int64_t workspace_matrices, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const size_t matrix_bytes = (size_t)n * n * sizeof(double);
  const bool use_shared = scratch_bytes(n) + matrix_bytes <= (size_t)max_shared_bytes(device);
  const size_t smem = scratch_bytes(n) + (use_shared ? matrix_bytes : 0);
  if (!use_shared && (workspace == nullptr || workspace_matrices < 1)) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(spectral_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)smem);
  if (err != cudaSuccess) return err;
  const int64_t chunk = use_shared ? batch : workspace_matrices;
  for (int64_t off = 0; off < batch; off += chunk) {
    const int64_t blocks = batch - off < chunk ? batch - off : chunk;
    spectral_kernel<T><<<(unsigned)blocks, kThreads, smem, stream>>>(
        static_cast<const T*>(x), n, m, sb, sn, sm, off, stats, sigma, nonfinite, sweeps,
        workspace, use_shared);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

extern "C" {

// Doubles of global workspace one matrix needs (0 when the working matrix fits in shared
// memory on the current device).
int64_t fastdiag_spectral_cuda_workspace(int n) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return (int64_t)n * n;
  const size_t need = scratch_bytes(n) + (size_t)n * n * sizeof(double);
  return need <= (size_t)max_shared_bytes(device) ? 0 : (int64_t)n * n;
}

// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64. Strides in elements. Returns a
// cudaError_t (0 = success); no synchronisation.
int fastdiag_spectral_cuda(const void* x, int dtype, int64_t batch, int n, int64_t m, int64_t sb,
                           int64_t sn, int64_t sm, double* stats, double* sigma,
                           long long* nonfinite, int* sweeps, double* workspace,
                           int64_t workspace_matrices, void* stream) {
  if (batch == 0) return 0;
  if (n < 1 || n > sp::kMaxDim) return (int)cudaErrorInvalidValue;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return (int)launch<float>(x, batch, n, m, sb, sn, sm, stats, sigma, nonfinite, sweeps,
                                workspace, workspace_matrices, st);
    case 1:
      return (int)launch<__half>(x, batch, n, m, sb, sn, sm, stats, sigma, nonfinite, sweeps,
                                 workspace, workspace_matrices, st);
    case 2:
      return (int)launch<__nv_bfloat16>(x, batch, n, m, sb, sn, sm, stats, sigma, nonfinite,
                                        sweeps, workspace, workspace_matrices, st);
    case 3:
      return (int)launch<double>(x, batch, n, m, sb, sn, sm, stats, sigma, nonfinite, sweeps,
                                 workspace, workspace_matrices, st);
    default:
      return (int)cudaErrorInvalidValue;
  }
}

const char* fastdiag_spectral_cuda_error(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
