// Fused low-rank linear y = out_act(act(x U^T + b1) V^T + b2) on the CPU: torch-free parameters and per-ISA entry
// points.
#pragma once

#include <cstdint>

#include "common.h"

namespace effkern::cpu {

// Rows of x per tile (a thread's rows run in tiles, the last one shorter): the kernels' register tiles are 6, 8 or
// 12 rows tall (by their width), all of which divide it; two of the 12-row tiles share each weight row read into L1.
constexpr int kLowRankLinearRows = 24;

// Forwards of up to kLowRankLinearFewRows rows, or kLowRankLinearFewRowsLarge when u and v take at least
// kLowRankLinearLargeBytes, run as dot products straight from u and v: packing the weights costs more than those
// rows' products, and large weights take longer to pack (measured on the CPU VM: README "Backends").
constexpr int64_t kLowRankLinearFewRows = 4, kLowRankLinearFewRowsLarge = 32;
constexpr int64_t kLowRankLinearLargeBytes = int64_t{1} << 20;

// Padded widths: multiples of 16 floats (every vector width), zero-filled by the host.
inline int64_t low_rank_linear_padded(int64_t n) { return (n + 15) / 16 * 16; }

enum class LowRankAct : int { none = 0, relu = 1, gelu = 2 };

struct LowRankLinearParams {
  // Weights packed by the host in fp32, zero-padded (rp = padded r, dop = padded d_out, dinp = padded d_in).
  const float* ut;  // [d_in][rp]    U^T
  const float* b1;  // [rp]
  const float* vt;  // [r][dop]      V^T (forward)
  const float* b2;  // [dop]
  const float* up;  // [r][dinp]     U (backward: dx = dt U)
  const float* vp;  // [d_out][rp]   V (backward: da = g V)
  const void* u;    // [r][d_in]     U, in dtype, read in place (the forward of a few rows)
  const void* v;    // [d_out][r]    V, the same
  const void* x;    // [M][d_in] contiguous, in dtype
  void* y;          // [M][d_out] (forward)
  const void* g;    // [M][d_out] gradient of y (backward)
  const void* g_mask;  // [M][d_out] or null (backward): y of a relu'd output; g counts only where it is > 0
  void* dx;         // [M][d_in] (backward)
  // Backward weight-gradient accumulators, one slice per thread (summed by the host): dU^T, dV, db1, db2.
  float* dut;  // [threads][d_in][rp]
  float* dv;   // [threads][d_out][rp]
  float* db1;  // [threads][rp]
  float* db2;  // [threads][dop]
  int64_t M, d_in, r, d_out, rp, dop, dinp;
  bool relu_y;    // y = relu(...) (the forward's out_act)
  bool stream;    // write y (forward) / dx (backward) with non-temporal stores (the host: fp32, larger than a
                  // core's L2, 64-byte rows)
  LowRankAct act;
  DType dtype;
};

// Scratch floats per thread.
inline int64_t low_rank_linear_fwd_scratch(const LowRankLinearParams& p) {
  return kLowRankLinearRows * (p.d_in + p.rp + 64);
}
inline int64_t low_rank_linear_bwd_scratch(const LowRankLinearParams& p) {
  return kLowRankLinearRows * (p.d_in + p.dop + 3 * p.rp + 64);
}

// Rows [begin, end) of x, in tiles of kLowRankLinearRows; the backward accumulates into the `thread`'s slices.
EFFKERN_PER_ISA(
    void low_rank_linear_fwd_rows(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch);
    void low_rank_linear_few_hidden(const LowRankLinearParams& p, const float* xf, int64_t j0, int64_t j1, float* t);
    void low_rank_linear_few_out(const LowRankLinearParams& p, const float* t, int64_t o0, int64_t o1,
                                 float* scratch);
    void low_rank_linear_bwd_rows(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch,
                                  int64_t thread);)

}  // namespace effkern::cpu
