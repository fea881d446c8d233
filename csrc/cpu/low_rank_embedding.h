// Compressed embedding lookup with its low-rank reconstruction, on the CPU: torch-free parameters and per-ISA
// entry points.
#pragma once

#include <atomic>
#include <cstdint>

#include "common.h"

namespace effkern::cpu {

// out[b][f] = U_f e + c mu_f with e = the sum (or mean) of the bag's compressed rows table[offsets[f] + id]
// (-1 pads a bag) and c = the number of ids (sum) or 1 (mean; 0 for an empty bag).
struct LowRankEmbeddingParams {
  const int64_t* ids;      // [B][F][L]
  const void* table;       // [V][k] in dtype
  const int64_t* offsets;  // [F] first table row of each field
  const int64_t* sizes;    // [F] rows of each field, V_f
  std::atomic<bool>* bad_ids;  // set by a kernel that met an id outside [-1, V_f) (and skipped it)
  const float* ut;         // [F][k][dp] U_f^T, fp32, zero-padded to dp (host-packed)
  const float* mu;         // [F][dp]
  void* out;               // [B][F][d] in dtype (forward)
  const void* g;           // [B][F][d] gradient of out (backward)
  // Backward accumulators, one slice per thread (summed by the host): the table's, U^T's and mu's gradients.
  float* dtable;  // [threads][V][k]
  float* dut;     // [threads][F][k][dp]
  float* dmu;     // [threads][F][dp]
  int64_t B, F, L, V, k, d, dp;
  bool mean;
  DType dtype;
};

inline int64_t low_rank_embedding_scratch(const LowRankEmbeddingParams& p) { return 2 * (p.k + p.dp); }

// Batch rows [begin, end); the backward accumulates into the `thread`'s slices.
EFFKERN_PER_ISA(
    void low_rank_embedding_fwd_rows(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch);
    void low_rank_embedding_bwd_rows(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch,
                                     int64_t thread);)

}  // namespace effkern::cpu
