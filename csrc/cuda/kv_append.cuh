// KV-cache append on the GPU: torch-free launcher interface (raw pointers, element strides, a stream).
// Semantics: effkern/ops/kv_append.py (reference). The torch glue is csrc/cuda/bindings_cuda.cu.
//
// For every sequence b (slot t = slots[b]) and cache KV head j (g = Hk / Hkv input heads per group):
//   k' = RoPE(k[b, i]) in fp32 for each input head i   (rotary dim R; 0 = no RoPE; dims >= R pass through)
//   k_cache[b, j, t] = concat(k'[b, j*g .. j*g+g-1]) @ k_proj[j]   (with k_proj [Hkv, g*D, Dk] fp32)
//                    = k'[b, j]                                     (without: g == 1, Dk == D)
//   v_cache[b, j, t] = v[b, j]
// Values are written in the cache dtype (rounded once, from fp32).
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

namespace effkern::gpu {

struct KvAppendArgs {
  cudaDataType_t dtype = CUDA_R_16F;  // CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF: k, v and both caches share it
  void* k_cache = nullptr;            // [B, Hkv, S_max, Dk], strides below, last dim contiguous
  void* v_cache = nullptr;            // [B, Hkv, S_max, Dv], strides below, last dim contiguous
  const void* k = nullptr;            // [B, Hk, D] contiguous
  const void* v = nullptr;            // [B, Hkv, Dv] contiguous
  const int32_t* slots = nullptr;     // [B], 0 <= slots[b] < S_max (a slot outside is skipped, never written)
  const float* cos = nullptr;         // [B, R/2] contiguous, or null when rotary_dim == 0
  const float* sin = nullptr;         // [B, R/2] contiguous, or null when rotary_dim == 0
  const float* k_proj = nullptr;      // [Hkv, g*D, Dk] contiguous, or null (then Hk == Hkv and Dk == D)
  int* err = nullptr;                 // int32 error word (common.cuh kErrSlots for a slot outside), or null

  int64_t batch = 0, k_heads = 0, kv_heads = 0;  // B, Hk, Hkv
  int64_t head_dim = 0, k_dim = 0, v_dim = 0;     // D, Dk, Dv
  int64_t max_seq = 0;                            // S_max
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;  // element strides of k_cache
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;  // element strides of v_cache

  int rope_style = 0;  // 0 = half (pairs i, i + R/2), 1 = interleaved (pairs 2i, 2i + 1)
  int rotary_dim = 0;  // R, even, 0 <= R <= D
};

// Checks the arguments and enqueues the kernel on `stream` (no workspace). Returns cudaSuccess,
// cudaErrorInvalidValue when an argument check fails (then *why, if given, names the check; a static
// string), or the launch error.
cudaError_t kv_append_launch(const KvAppendArgs& args, cudaStream_t stream, const char** why = nullptr);

}  // namespace effkern::gpu
