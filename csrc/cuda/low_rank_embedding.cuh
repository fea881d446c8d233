// Compressed embedding lookup with its low-rank reconstruction on the GPU: torch-free launcher interface.
// Semantics: effkern/ops/low_rank_embedding.py (reference / bwd_reference); torch glue: csrc/cuda/bindings_cuda.cu.
//
//   forward:  out[b, f] = U_f e + c mu_f, e = the sum (mean: / n) of the bag's rows table[offsets[f] + id]
//             (id -1 is padding), c = n (sum) or 1 (mean; 0 for an empty bag). An id outside field f's
//             [0, V_f) (V_f = offsets[f + 1] - offsets[f], the last field to V) or a row outside [0, V) reads
//             nothing, counts as padding and records kErrIds.
//   backward: de[b, f] = s U_f^T g[b, f] (s = 1 or 1 / n), the gradient of each bag's compressed-row sum (fp32);
//             its scatter into the table and the batch reductions of dU, dmu are torch ops (the glue's caller).
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

namespace effkern::gpu {

// The largest compressed width k the kernels hold per warp (a lane per component); larger k runs Triton.
constexpr int kLowRankEmbeddingMaxRank = 32;

struct LowRankEmbeddingArgs {
  cudaDataType_t dtype = CUDA_R_32F;  // of table, u, mu, out, g
  const int64_t* ids = nullptr;       // [B, F, L] contiguous
  const void* table = nullptr;        // [V, k] contiguous (forward)
  const int64_t* offsets = nullptr;   // [F] (forward)
  const void* u = nullptr;            // [F, d, k] contiguous
  const void* mu = nullptr;           // [F, d] contiguous
  void* out = nullptr;                // [B, F, d] (forward)
  const void* g = nullptr;            // [B, F, d] (backward)
  float* de = nullptr;                // [B, F, k] fp32 (backward)
  int* err = nullptr;                 // int32 error word (forward; common.cuh kErrIds), or null
  int64_t B = 0, F = 0, L = 0, k = 0, d = 0;
  int64_t V = 0;                      // table rows (forward)
  bool mean = false;
};

cudaError_t low_rank_embedding_fwd_launch(const LowRankEmbeddingArgs& args, cudaStream_t stream,
                                          const char** why = nullptr);
cudaError_t low_rank_embedding_de_launch(const LowRankEmbeddingArgs& args, cudaStream_t stream,
                                         const char** why = nullptr);

}  // namespace effkern::gpu
