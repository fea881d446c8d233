// GQA decode attention on the GPU: torch-free launcher interface (raw pointers, element strides, a stream).
// Semantics: effkern/ops/gqa_decode.py (reference). The torch glue is csrc/cuda/bindings_cuda.cu.
//
// For every sequence b and query head h (KV head h / G, G = Hq / Hkv):
//   q'  = RoPE(q[b, h]) with the row's cos/sin [R/2]   (rotary dim R; 0 = no RoPE; dims >= R pass through)
//   q'  = q' @ q_proj[h]                               (optional [D, Dk] fp32 projection)
//   s_t = scale * q' . k_cache[b, h / G, t]            (kv_start[b] <= t < seq_lens[b]; softcap: cap * tanh(s / cap))
//   out[b, h] = sum_t softmax(s)_t v_cache[b, h / G, t] (fp32 accumulation, written in the cache dtype)
// An empty context (seq_lens[b] == 0) gives zeros; NaN / Inf in q, q_proj or a valid K / V row propagate as in
// torch's softmax, and rows outside [kv_start, seq_lens) are never read.
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

namespace effkern::gpu {

// The largest Dk / Dv the compiled tiles cover; effkern/ops/gqa_decode.py routes larger heads to Triton.
constexpr int kGqaDecodeMaxHeadDim = 256;
// Upper bound on KV splits per (sequence, KV head); the combine kernel stages one weight per split.
constexpr int kGqaDecodeMaxSplits = 64;
// A split streams at least this many keys (when the context has them): below a few hundred keys the fixed
// cost of a CTA (prologue, cross-warp merge, partial write, combine read) is no longer small against the
// K/V bytes it streams.
constexpr int kGqaDecodeMinKeysPerSplit = 256;

struct GqaDecodeArgs {
  cudaDataType_t dtype = CUDA_R_16F;  // CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF: q, caches and out share it
  const void* q = nullptr;            // [B, Hq, D] contiguous
  const void* k_cache = nullptr;      // [B, Hkv, S_max, Dk], strides below, last dim contiguous
  const void* v_cache = nullptr;      // [B, Hkv, S_max, Dv], strides below, last dim contiguous
  const int32_t* seq_lens = nullptr;  // [B], 0 <= seq_lens[b] <= S_max (values outside are clamped)
  const int32_t* kv_start = nullptr;  // [B] first valid key (left padding), 0 <= kv_start[b] <= seq_lens[b]; null: 0
  const float* cos = nullptr;         // [B, R/2] contiguous, or null when rotary_dim == 0
  const float* sin = nullptr;         // [B, R/2] contiguous, or null when rotary_dim == 0
  const float* q_proj = nullptr;      // [Hq, D, Dk] contiguous, or null (then Dk == D)
  void* out = nullptr;                // [B, Hq, Dv] contiguous
  int* err = nullptr;  // int32 error word (common.cuh kErrSeqLens / kErrKvStart for a value outside), or null

  int64_t batch = 0, q_heads = 0, kv_heads = 0;  // B, Hq, Hkv
  int64_t head_dim = 0, k_dim = 0, v_dim = 0;     // D, Dk, Dv
  int64_t max_seq = 0;                            // S_max
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;  // element strides of k_cache
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;  // element strides of v_cache

  float scale = 1.0f;
  float softcap = 0.0f;  // 0 = off
  int rope_style = 0;    // 0 = half (pairs i, i + R/2), 1 = interleaved (pairs 2i, 2i + 1)
  int rotary_dim = 0;    // R, even, 0 <= R <= D

  int num_sms = 0;     // SM count of the target device, for the split rule (0: query the current device)
  int num_splits = 0;  // 0: the automatic rule (gqa_decode.cu); > 0 forces it (clamped to the same bounds)
};

// KV splits per (sequence, KV head group) the launcher will use for these arguments (>= 1).
int gqa_decode_num_splits(const GqaDecodeArgs& args);

// Bytes of device workspace gqa_decode_launch needs (0 = none; pass nullptr then). With S = num_splits and
// a(x) = x rounded up to 256 bytes:
//   (S > 1)   ? a(4 * B * Hq * S * Dv) + a(4 * B * Hq * S) : 0    partial outputs and log-sum-exps, fp32
// + (q_proj)  ? a(4 * B * Hq * Dk) : 0                            projected, scaled queries, fp32
size_t gqa_decode_workspace_bytes(const GqaDecodeArgs& args);

// Checks the arguments and enqueues the kernels on `stream`. `workspace` must be 16-byte aligned and hold
// gqa_decode_workspace_bytes(args) bytes. Returns cudaSuccess, cudaErrorInvalidValue when an argument check
// fails (then *why, if given, names the check; a static string), or the launch error.
cudaError_t gqa_decode_launch(const GqaDecodeArgs& args, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream, const char** why = nullptr);

}  // namespace effkern::gpu
