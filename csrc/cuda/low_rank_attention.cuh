// Low-rank (side-network) attention core on the GPU: torch-free launcher interface (raw pointers, strides, stream).
// Semantics: effkern/ops/low_rank_attention.py (reference / bwd_reference). The torch glue is
// csrc/cuda/bindings_cuda.cu.
//
// qkv holds, per side network k, image b and token n, the row [q | k | v] of 3r values (r = H * dh; head h at
// columns [h * dh, (h + 1) * dh) of each part). Work item (k, b, h) attends within one head over the N tokens:
//   forward:  out = softmax(scale q k^T) v,  lse = logsumexp(scale q k^T) per query row (fp32)
//   backward: P = exp(scale q k^T - lse), delta = rowsum(dout * out), dS = P (dout v^T - delta),
//             dq = scale dS k,  dk = scale dS^T q,  dv = P^T dout
// All accumulation is fp32; results are written in qkv's dtype.
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

namespace effkern::gpu {

// The largest head dim dh the compiled kernels cover; effkern/ops/low_rank_attention.py routes larger heads to
// Triton.
constexpr int kLowRankAttnMaxHeadDim = 128;

struct LowRankAttnArgs {
  cudaDataType_t dtype = CUDA_R_32F;  // CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF (qkv, out, dout, dqkv)
  const void* qkv = nullptr;          // [K, B, N, 3r], element strides below, last dim contiguous
  int64_t s_k = 0, s_b = 0, s_n = 0;
  void* out = nullptr;                // [K, B, N, r] contiguous: written by forward, read by backward
  float* lse = nullptr;               // [K, B, H, N] contiguous: written by forward, read by backward
  const void* dout = nullptr;         // [K, B, N, r] contiguous (backward)
  void* dqkv = nullptr;               // [K, B, N, 3r] contiguous (backward)
  float* delta = nullptr;             // [K, B, H, N] fp32 workspace (backward)
  int64_t K = 0, B = 0, N = 0, H = 0, dh = 0;
  float scale = 1.0f;
};

// Check the arguments and enqueue the kernels on `stream`. Return cudaSuccess, cudaErrorInvalidValue when a
// check fails (then *why, if given, names it; a static string), or the launch error.
cudaError_t low_rank_attention_fwd_launch(const LowRankAttnArgs& args, cudaStream_t stream,
                                          const char** why = nullptr);
cudaError_t low_rank_attention_bwd_launch(const LowRankAttnArgs& args, cudaStream_t stream,
                                          const char** why = nullptr);

}  // namespace effkern::gpu
