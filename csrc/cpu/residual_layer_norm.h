// Residual add + LayerNorm (no affine) on the CPU: torch-free parameters and per-ISA entry points.
#pragma once

#include <cstdint>

#include "common.h"

namespace effkern::cpu {

// Row r of u (rows x d, contiguous) pairs with row r % z_rows of z (z_rows x d): z's rows repeat over u's
// leading dims (one backbone feature shared by K side streams).
struct ResidualLayerNormParams {
  const void* u;     // forward: [rows, d]
  const void* z;     // forward: [z_rows, d]
  void* h;           // forward: [rows, d] = u + z
  void* x;           // forward: [rows, d] = LayerNorm(h); backward: read
  float* rstd;       // [rows] 1 / sqrt(var(h) + eps): written by forward, read by backward
  const void* dh;    // backward: [rows, d]
  const void* dx;    // backward: [rows, d]
  void* du;          // backward: [rows, d]
  int64_t rows, z_rows, d;
  DType dtype;
  float eps;
};

using ResidualLayerNormRowsFn = void (*)(const ResidualLayerNormParams&, int64_t begin, int64_t end,
                                         float* scratch);

// Scratch floats per thread: one fp32 row.
inline int64_t residual_layer_norm_scratch(const ResidualLayerNormParams& p) { return p.d; }

EFFKERN_PER_ISA(void residual_layer_norm_fwd_rows(const ResidualLayerNormParams& p, int64_t begin, int64_t end,
                                                 float* scratch);
                void residual_layer_norm_bwd_rows(const ResidualLayerNormParams& p, int64_t begin, int64_t end,
                                                  float* scratch);)

}  // namespace effkern::cpu
