// Fused low-rank linear on the GPU: torch-free launcher interface (raw pointers, stream). Semantics:
// effkern/ops/low_rank_linear.py (reference / bwd_reference); the torch glue is csrc/cuda/bindings_cuda.cu.
//
//   forward:  y = act(x U^T + b1) V^T + b2                       x [M, d_in], U [r, d_in], V [d_out, r]
//   backward: t = x U^T + b1 (recomputed), dt = (g V) * act'(t), dx = dt U; writes act(t) and dt [M, r] for the
//             two weight-gradient GEMMs (dU = dt^T x, dV = g^T act(t): reductions over all rows, left to cuBLAS).
// act: 0 none, 1 relu, 2 gelu (exact, erf). All tensors contiguous; accumulation fp32; outputs in x's dtype.
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

namespace effkern::gpu {

// The largest rank r the compiled kernels hold in one shared-memory tile; effkern/ops/low_rank_linear.py routes
// larger ranks to Triton.
constexpr int kLowRankLinearMaxRank = 64;

struct LowRankLinearArgs {
  cudaDataType_t dtype = CUDA_R_32F;  // CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF (every tensor below)
  const void* x = nullptr;            // [M, d_in]
  const void* u = nullptr;            // [r, d_in]
  const void* b1 = nullptr;           // [r] or null
  const void* v = nullptr;            // [d_out, r]
  const void* b2 = nullptr;           // [d_out] or null (forward)
  void* y = nullptr;                  // [M, d_out] (forward)
  const void* g = nullptr;            // [M, d_out] gradient of y (backward)
  void* dx = nullptr;                 // [M, d_in] (backward)
  void* hidden = nullptr;             // [M, r] act(t) (backward)
  void* dt = nullptr;                 // [M, r] (backward)
  int64_t M = 0, d_in = 0, r = 0, d_out = 0;
  int act = 0;
  bool relu_out = false;  // forward: y = relu(act(t) V^T + b2)
};

// Check the arguments and enqueue the kernel on `stream`. Return cudaSuccess, cudaErrorInvalidValue when a check
// fails (then *why, if given, names it; a static string), or the launch error.
cudaError_t low_rank_linear_fwd_launch(const LowRankLinearArgs& args, cudaStream_t stream, const char** why = nullptr);
cudaError_t low_rank_linear_bwd_launch(const LowRankLinearArgs& args, cudaStream_t stream, const char** why = nullptr);

}  // namespace effkern::gpu
