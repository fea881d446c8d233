// GQA decode attention on the CPU: torch-free parameters and the per-ISA work-item entry points.
#pragma once

#include <cstdint>

#include "common.h"

namespace effkern::cpu {

// Keys per tile of the CPU kernel. A K tile and a V tile (2 x 32 x 128 dims x 4 B = 32 KB in fp32) stay in
// L1/L2 while every head of the group passes over them; a multiple of every vector width (16, 8, 1).
constexpr int kTile = 32;

struct GqaDecodeParams {
  const void* q;            // [B, Hq, D] contiguous
  const void* k;            // [B, Hkv, S, Dk], strides below, last dim contiguous
  const void* v;            // [B, Hkv, S, Dv]
  const int32_t* seq_lens;  // [B]
  const int32_t* kv_start;  // [B] first valid key (left padding), or null: 0
  const float* cos;         // [B, R/2] or null
  const float* sin;
  const float* q_proj;  // [Hq, D, Dk] or null
  void* out;            // [B, Hq, Dv] contiguous, q's dtype (written when splits == 1)
  float* part_acc;      // [B, Hq, splits, Dv] unnormalised partial outputs (splits > 1)
  float* part_ml;       // [B, Hq, splits, 2] running max and sum of each split
  int64_t B, Hq, Hkv, D, Dk, Dv;
  int64_t k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;  // element strides of the caches
  DType dtype;
  float scale, softcap;  // softcap 0 = off
  int rope_style, rotary_dim;
  int64_t splits, split_len;  // split s covers keys [start + s * split_len, start + (s + 1) * split_len)
};

// Work item i = ((b * Hkv) + kv_head) * splits + split: processes the whole query group of one KV head over
// one KV range, reading each cache row once. Runs items [begin, end).
// `scratch` holds gqa_decode_scratch_floats(p) floats private to the calling thread.
using GqaDecodeItemsFn = void (*)(const GqaDecodeParams&, int64_t begin, int64_t end, float* scratch);

inline int64_t gqa_decode_scratch_floats(const GqaDecodeParams& p) {
  const int64_t G = p.Hq / p.Hkv;
  return G * p.Dk + p.D + G * kTile + G * p.Dv + 2 * G;
}

EFFKERN_PER_ISA(void gqa_decode_items(const GqaDecodeParams& p, int64_t begin, int64_t end, float* scratch);)

}  // namespace effkern::cpu
