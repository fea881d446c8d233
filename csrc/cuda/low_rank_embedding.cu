// Compressed embedding lookup + reconstruction: CUDA kernels. Interface and semantics: low_rank_embedding.cuh.
// Torch-free.
//
// One warp per (row, field): lane c < k sums component c of the bag's compressed rows (the bag's ids are read
// once per warp, the k-wide rows are consecutive floats: one coalesced access per id), then the d outputs are
// spread over the lanes, each an FMA chain over the k components shuffled from their lanes, plus c mu_f.
// The backward kernel is the same walk in reverse: lane c forms de_c = s sum_o U_f[o][c] g[o] from the lanes'
// partial products (a warp reduction per component).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "low_rank_embedding.cuh"

namespace effkern::gpu {
namespace {

constexpr int kWarps = 8;  // (row, field) pairs per block
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const int64_t* ids;
  const void* table;
  const int64_t* offsets;
  const void* u;
  const void* mu;
  void* out;
  const void* g;
  float* de;
  int* err;
  int64_t pairs, V;
  int F, L, k, d;
  bool mean;
};

// This warp's (row, field) pair: its bag's component `lane` summed (lanes >= k hold 0), the bag size n. An id
// outside the field's [0, V_f), or whose row falls outside the table (bad offsets), is skipped and recorded.
template <typename T>
__device__ __forceinline__ float bag_sum(const Params& p, int64_t pair, int lane, int& n) {
  const int f = static_cast<int>(pair % p.F);
  const int64_t* ids = p.ids + pair * p.L;
  const T* table = static_cast<const T*>(p.table);
  const int64_t first = p.offsets[f];
  const int64_t size = (f + 1 < p.F ? p.offsets[f + 1] : p.V) - first;
  float e = 0.f;
  bool bad = false;
  n = 0;
  for (int j = 0; j < p.L; ++j) {
    const int64_t id = ids[j];
    if (id == -1) continue;
    const int64_t row = id >= 0 && id < size ? first + id : -1;
    if (row < 0 || row >= p.V) {  // the row test also catches offsets that do not fit the table
      bad = true;
      continue;
    }
    if (lane < p.k) e += to_float(table[row * p.k + lane]);
    ++n;
  }
  if (bad && lane == 0) record_error(p.err, kErrIds);
  return e;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) lre_fwd_kernel(Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pair >= p.pairs) return;
  int n;
  const float e = bag_sum<T>(p, pair, lane, n);
  const float c = p.mean ? (n > 0 ? 1.f : 0.f) : static_cast<float>(n);
  const float s = p.mean && n > 0 ? 1.f / static_cast<float>(n) : 1.f;
  const int f = static_cast<int>(pair % p.F);
  const T* u = static_cast<const T*>(p.u) + static_cast<int64_t>(f) * p.d * p.k;
  const T* mu = static_cast<const T*>(p.mu) + static_cast<int64_t>(f) * p.d;
  T* out = static_cast<T*>(p.out) + pair * p.d;
  for (int o0 = 0; o0 < p.d; o0 += 32) {
    const int o = o0 + lane;
    float acc = o < p.d ? c * to_float(mu[o]) : 0.f;
    for (int kk = 0; kk < p.k; ++kk) {
      const float ek = __shfl_sync(kFull, e, kk) * s;
      if (o < p.d) acc = fmaf(to_float(u[static_cast<int64_t>(o) * p.k + kk]), ek, acc);
    }
    if (o < p.d) out[o] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) lre_de_kernel(Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pair >= p.pairs) return;
  int n = 0;
  for (int j = 0; j < p.L; ++j) n += p.ids[pair * p.L + j] >= 0;
  const float s = p.mean && n > 0 ? 1.f / static_cast<float>(n) : 1.f;
  const int f = static_cast<int>(pair % p.F);
  const T* u = static_cast<const T*>(p.u) + static_cast<int64_t>(f) * p.d * p.k;
  const T* g = static_cast<const T*>(p.g) + pair * p.d;
  float mine = 0.f;  // lane c ends with de_c
  for (int kk = 0; kk < p.k; ++kk) {
    float part = 0.f;
    for (int o = lane; o < p.d; o += 32) part = fmaf(to_float(u[static_cast<int64_t>(o) * p.k + kk]), to_float(g[o]), part);
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(kFull, part, off);
    if (lane == kk) mine = part * s;
  }
  if (lane < p.k) p.de[pair * p.k + lane] = mine;
}

cudaError_t launch(const LowRankEmbeddingArgs& a, bool backward, cudaStream_t stream, const char** why) {
  if (dtype_bytes(a.dtype) == 0) return invalid_argument(why, kDtypeError);
  if (a.B < 0 || a.F < 1 || a.L < 1 || a.k < 1 || a.d < 1 || a.F > kIntMax || a.L > kIntMax || a.d > kIntMax)
    return invalid_argument(why, "B must be >= 0 and F, L, k, d >= 1, all below 2^31");
  if (a.k > kLowRankEmbeddingMaxRank) return invalid_argument(why, "k exceeds kLowRankEmbeddingMaxRank");
  if (a.V < 0) return invalid_argument(why, "V must be >= 0");
  if (a.ids == nullptr || a.u == nullptr || (backward ? a.g == nullptr || a.de == nullptr
                                                      : a.table == nullptr || a.offsets == nullptr ||
                                                            a.mu == nullptr || a.out == nullptr))
    return invalid_argument(why, "missing pointer");
  const int64_t pairs = a.B * a.F;
  if (pairs == 0) return cudaSuccess;
  if ((pairs + kWarps - 1) / kWarps > kIntMax) return invalid_argument(why, "B * F too large for the grid");
  const Params p{a.ids, a.table, a.offsets, a.u, a.mu, a.out, a.g, a.de, a.err, pairs, a.V, static_cast<int>(a.F),
                 static_cast<int>(a.L), static_cast<int>(a.k), static_cast<int>(a.d), a.mean};
  const dim3 grid(static_cast<unsigned>((pairs + kWarps - 1) / kWarps));
  auto run = [&](auto kernel) { kernel<<<grid, kWarps * 32, 0, stream>>>(p); };
  switch (a.dtype) {
    case CUDA_R_16F: backward ? run(lre_de_kernel<__half>) : run(lre_fwd_kernel<__half>); break;
    case CUDA_R_16BF: backward ? run(lre_de_kernel<__nv_bfloat16>) : run(lre_fwd_kernel<__nv_bfloat16>); break;
    default: backward ? run(lre_de_kernel<float>) : run(lre_fwd_kernel<float>); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t low_rank_embedding_fwd_launch(const LowRankEmbeddingArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, false, stream, why);
}

cudaError_t low_rank_embedding_de_launch(const LowRankEmbeddingArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, true, stream, why);
}

}  // namespace effkern::gpu
