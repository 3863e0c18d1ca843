// fastdiag::spectral_stats, CUDA dispatch key: torch glue around the C-ABI launcher in
// spectral_cuda.cu. Compiled only when the extension is built with CUDA sources
// (FASTDIAG_WITH_CUDA); in a CPU-only build this translation unit is empty.

#ifdef FASTDIAG_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

extern "C" {
int64_t fastdiag_spectral_cuda_workspace(int n);
int fastdiag_spectral_cuda(const void* x, int dtype, int64_t batch, int n, int64_t m, int64_t sb,
                           int64_t sn, int64_t sm, double* stats, double* sigma,
                           long long* nonfinite, int* sweeps, double* workspace,
                           int64_t workspace_matrices, void* stream);
const char* fastdiag_spectral_cuda_error(int code);
}

namespace fastdiag {
std::vector<at::Tensor> spectral_outputs(const at::Tensor& x);  // spectral_cpu.cpp
void spectral_check_input(const at::Tensor& x);                  // spectral_cpu.cpp
}  // namespace fastdiag

namespace {

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;  // cap of the global workspace

int dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      return 3;  // kDouble (spectral_check_input admits nothing else)
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_stats_cuda(
    const at::Tensor& x_in, c10::string_view method) {
  fastdiag::spectral_check_input(x_in);
  // one kernel on CUDA: the Jacobi method, whose rotations a thread block runs in parallel
  TORCH_CHECK(method == "auto" || method == "jacobi",
              "spectral_stats: method must be 'auto' or 'jacobi' for CUDA tensors, got '", method,
              "'");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto out = fastdiag::spectral_outputs(x_in);
  const int64_t rows = x_in.size(-2), cols = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, rows, cols});
  const int64_t batch = x.size(0);
  if (batch == 0) return {out[0], out[1], out[2], out[3]};
  const bool wide = rows <= cols;
  const int n = static_cast<int>(wide ? rows : cols);
  const int64_t m = wide ? cols : rows;
  const int64_t sn = wide ? x.stride(1) : x.stride(2);
  const int64_t sm = wide ? x.stride(2) : x.stride(1);

  at::Tensor workspace;
  int64_t workspace_matrices = 0;
  const int64_t per_matrix = fastdiag_spectral_cuda_workspace(n);
  if (per_matrix > 0) {
    const int64_t fit = std::max<int64_t>(1, kWorkspaceBytes / (per_matrix * 8));
    workspace_matrices = std::min(batch, fit);
    workspace = at::empty({workspace_matrices * per_matrix}, x.options().dtype(at::kDouble));
  }
  const int code = fastdiag_spectral_cuda(
      x.data_ptr(), dtype_code(x.scalar_type()), batch, n, m, x.stride(0), sn, sm,
      out[0].data_ptr<double>(), out[1].data_ptr<double>(),
      reinterpret_cast<long long*>(out[2].data_ptr<int64_t>()), out[3].data_ptr<int32_t>(),
      workspace.defined() ? workspace.data_ptr<double>() : nullptr, workspace_matrices,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(code == 0, "spectral_stats: CUDA launch failed: ", fastdiag_spectral_cuda_error(code));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiag, CUDA, m) { m.impl("spectral_stats", &spectral_stats_cuda); }

#endif  // FASTDIAG_WITH_CUDA
