// Low-rank (side-network) attention core on the CPU: torch-free parameters and per-ISA entry points.
#pragma once

#include <cstdint>

#include "common.h"

namespace effkern::cpu {

// qkv holds, per side network k, image b and token n, the row [q | k | v] of 3 * r values (r = H * dh, head h
// at columns [h * dh, (h + 1) * dh) of each part). Work item i = (k * B + b) * H + h attends within one head.
struct LowRankAttnParams {
  const void* qkv;            // [K, B, N, 3r], element strides below, last dim contiguous
  int64_t s_k, s_b, s_n;
  const void* out;            // [K, B, N, r] contiguous: written by forward, read by backward
  float* lse;                 // [K, B, H, N] log-sum-exp of each query row's logits (forward writes it)
  const void* dout;           // [K, B, N, r] contiguous (backward)
  void* dqkv;                 // [K, B, N, 3r] contiguous (backward)
  int64_t K, B, N, H, dh;
  DType dtype;
  float scale;
};

// Keys padded to a multiple of 16 (every vector width), so the kernels' key loops have no tails.
inline int64_t low_rank_attn_padded(int64_t n) { return (n + 15) / 16 * 16; }

// Query rows the kernels process together: their loads of keys, values and key/value gradients are shared.
constexpr int kLowRankAttnRows = 4;

// Scratch floats per thread for the forward and the backward work items.
inline int64_t low_rank_attn_fwd_scratch(const LowRankAttnParams& p) {
  const int64_t np = low_rank_attn_padded(p.N);
  return p.N * p.dh + 2 * p.dh * np + kLowRankAttnRows * (np + p.dh);
}
inline int64_t low_rank_attn_bwd_scratch(const LowRankAttnParams& p) {
  const int64_t np = low_rank_attn_padded(p.N);
  return p.N * p.dh + 4 * p.dh * np + kLowRankAttnRows * (np + 2 * p.dh);
}

using LowRankAttnItemsFn = void (*)(const LowRankAttnParams&, int64_t begin, int64_t end, float* scratch);

EFFKERN_PER_ISA(void low_rank_attn_fwd_items(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch);
                void low_rank_attn_bwd_items(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch);)

}  // namespace effkern::cpu
