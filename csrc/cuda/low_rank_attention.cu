// Low-rank (side-network) attention core: forward and backward CUDA kernels. Interface and semantics:
// low_rank_attention.cuh. Torch-free.
//
// LAST's side networks attend in a rank-r space split into heads of dh = 8..64 dims over N ~ 50..600 tokens: too
// narrow for tensor-core tiles to pay (the Triton kernels cover that route), so these kernels run fp32 FMAs with
// one warp per row of the item and the other side's rows staged in shared memory 32 at a time, one per lane:
//   forward   warp = query row;  lane j scores key j, online softmax across tiles, P.V by broadcasting p_j;
//   dq        warp = query row;  recomputes P from the saved lse, dq = scale sum_j dS_ij k_j, writes delta_i;
//   dk, dv    warp = key row;    dv_j = sum_i P_ij dout_i, dk_j = scale sum_i dS_ij q_i (needs delta from dq).
// No atomics: every output row has one owner warp. Probabilities are never stored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common.cuh"
#include "low_rank_attention.cuh"

namespace effkern::gpu {
namespace {

constexpr int kWarps = 8;  // rows per block, one warp each
constexpr int kTile = 32;  // other-side rows per shared-memory tile: one per lane
constexpr unsigned kFull = 0xffffffffu;

struct Params {
  const void* qkv;
  int64_t s_k, s_b, s_n;
  void* out;
  float* lse;
  const void* dout;
  void* dqkv;
  float* delta;
  int B, N, H, dh, r;
  float scale;
};

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Rows of one head of one (side network, image): element (n, d) at p[n * stride + d].
template <typename T>
struct Rows {
  const T* p;
  int64_t stride;
  __device__ __forceinline__ float at(int n, int d) const { return to_float(p[n * stride + d]); }
};

// The item's view of the kernels' tensors. Item i = (k * B + b) * H + h.
template <typename T>
struct Item {
  int64_t i, kb;  // item and (k * B + b)
  int h;
  __device__ Item(const Params& p) : i(blockIdx.x), kb(blockIdx.x / p.H), h(static_cast<int>(blockIdx.x % p.H)) {}
  __device__ Rows<T> qkv(const Params& p, int part) const {  // part 0 = q, 1 = k, 2 = v
    const int64_t k = kb / p.B, b = kb % p.B;
    return {static_cast<const T*>(p.qkv) + k * p.s_k + b * p.s_b + part * p.r + h * p.dh, p.s_n};
  }
  __device__ int64_t row_offset(const Params& p, int n, int width) const {  // [K, B, N, width] contiguous
    return (kb * p.N + n) * width + h * p.dh;
  }
  __device__ Rows<T> out(const Params& p, const void* base) const {
    return {static_cast<const T*>(base) + row_offset(p, 0, p.r), p.r};
  }
};

// This warp's row of the item (one row per warp) and its lane.
struct WarpRow {
  int warp, lane, row;
  bool active;
  __device__ explicit WarpRow(int n)
      : warp(threadIdx.x >> 5), lane(threadIdx.x & 31), row(blockIdx.y * kWarps + warp), active(row < n) {}
};

template <int DHP>
struct Shared {
  float a[kTile][DHP + 1];  // +1: lane j reads row j, so the lanes hit distinct banks
  float b[kTile][DHP + 1];
  float mine[kWarps][2][DHP];  // each warp's own row vectors
  float ra[kTile], rb[kTile];  // per-row scalars of the tile (dk/dv: the queries' lse and delta)
};

template <typename T, int DHP>
__device__ __forceinline__ void load_tile(float (*dst)[DHP + 1], Rows<T> src, int t0, int n, int dh) {
  for (int i = threadIdx.x; i < kTile * dh; i += blockDim.x) {
    const int j = i / dh, d = i - j * dh;
    dst[j][d] = t0 + j < n ? src.at(t0 + j, d) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void load_vector(float* dst, Rows<T> src, int row, int dh, float scale, int lane) {
  for (int d = lane; d < dh; d += 32) dst[d] = src.at(row, d) * scale;
}

// Dot product of a warp's own vector with tile row `lane`.
template <int DHP>
__device__ __forceinline__ float dot_row(const float* mine, const float (*tile)[DHP + 1], int lane, int dh) {
  float s = 0.f;
  for (int d = 0; d < dh; ++d) s = fmaf(mine[d], tile[lane][d], s);
  return s;
}

// acc[t] (dim lane + 32 t) += sum_j coef_j * tile[j][dim], where lane j holds coef_j.
template <int DHP>
__device__ __forceinline__ void accumulate(float (&acc)[DHP / 32], float coef, const float (*tile)[DHP + 1],
                                           int lane, int dh) {
#pragma unroll 4
  for (int j = 0; j < kTile; ++j) {
    const float c = __shfl_sync(kFull, coef, j);
#pragma unroll
    for (int t = 0; t < DHP / 32; ++t)
      if (lane + 32 * t < dh) acc[t] = fmaf(c, tile[j][lane + 32 * t], acc[t]);
  }
}

template <typename T, int DHP>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[DHP / 32], float mul, int lane, int dh) {
#pragma unroll
  for (int t = 0; t < DHP / 32; ++t)
    if (lane + 32 * t < dh) dst[lane + 32 * t] = from_float<T>(acc[t] * mul);
}

template <typename T, int DHP>
__global__ void __launch_bounds__(kWarps * 32) lsa_fwd_kernel(Params p) {
  __shared__ Shared<DHP> sh;
  const Item<T> it(p);
  const WarpRow w(p.N);
  const int lane = w.lane, row = w.row, warp = w.warp;
  const bool active = w.active;
  float* q = sh.mine[warp][0];
  if (active) load_vector(q, it.qkv(p, 0), row, p.dh, p.scale, lane);
  __syncwarp();
  float m = -INFINITY, l = 0.f, acc[DHP / 32] = {};
  for (int t0 = 0; t0 < p.N; t0 += kTile) {
    __syncthreads();  // the previous tile is consumed
    load_tile<T, DHP>(sh.a, it.qkv(p, 1), t0, p.N, p.dh);
    load_tile<T, DHP>(sh.b, it.qkv(p, 2), t0, p.N, p.dh);
    __syncthreads();
    if (!active) continue;
    const bool valid = t0 + lane < p.N;
    const float s = valid ? dot_row<DHP>(q, sh.a, lane, p.dh) : -INFINITY;
    const float m_new = fmaxf(m, warp_max(s));  // finite: key t0 (lane 0) is valid
    const float e = valid ? __expf(s - m_new) : 0.f;
    const float correction = __expf(m - m_new);  // 0 on the first tile
    l = l * correction + warp_sum(e);
#pragma unroll
    for (int t = 0; t < DHP / 32; ++t) acc[t] *= correction;
    accumulate<DHP>(acc, e, sh.b, lane, p.dh);
    m = m_new;
  }
  if (!active) return;
  store_row<T, DHP>(static_cast<T*>(p.out) + it.row_offset(p, row, p.r), acc, 1.f / l, lane, p.dh);
  if (lane == 0) p.lse[it.i * p.N + row] = m + logf(l);
}

template <typename T, int DHP>
__global__ void __launch_bounds__(kWarps * 32) lsa_bwd_dq_kernel(Params p) {
  __shared__ Shared<DHP> sh;
  const Item<T> it(p);
  const WarpRow w(p.N);
  const int lane = w.lane, row = w.row, warp = w.warp;
  const bool active = w.active;
  float *q = sh.mine[warp][0], *dout = sh.mine[warp][1];
  float delta = 0.f, lse = 0.f;
  if (active) {
    load_vector(q, it.qkv(p, 0), row, p.dh, p.scale, lane);
    load_vector(dout, it.out(p, p.dout), row, p.dh, 1.f, lane);
    const Rows<T> out = it.out(p, p.out);
    for (int d = lane; d < p.dh; d += 32) delta += dout[d] * out.at(row, d);
    delta = warp_sum(delta);
    lse = p.lse[it.i * p.N + row];
  }
  __syncwarp();
  float acc[DHP / 32] = {};
  for (int t0 = 0; t0 < p.N; t0 += kTile) {
    __syncthreads();
    load_tile<T, DHP>(sh.a, it.qkv(p, 1), t0, p.N, p.dh);
    load_tile<T, DHP>(sh.b, it.qkv(p, 2), t0, p.N, p.dh);
    __syncthreads();
    if (!active) continue;
    const bool valid = t0 + lane < p.N;
    const float prob = valid ? __expf(dot_row<DHP>(q, sh.a, lane, p.dh) - lse) : 0.f;
    const float ds = prob * (dot_row<DHP>(dout, sh.b, lane, p.dh) - delta);
    accumulate<DHP>(acc, ds, sh.a, lane, p.dh);
  }
  if (!active) return;
  store_row<T, DHP>(static_cast<T*>(p.dqkv) + it.row_offset(p, row, 3 * p.r), acc, p.scale, lane, p.dh);
  if (lane == 0) p.delta[it.i * p.N + row] = delta;
}

template <typename T, int DHP>
__global__ void __launch_bounds__(kWarps * 32) lsa_bwd_dkdv_kernel(Params p) {
  __shared__ Shared<DHP> sh;
  const Item<T> it(p);
  const WarpRow w(p.N);  // w.row is a key row
  const int lane = w.lane, row = w.row, warp = w.warp;
  const bool active = w.active;
  float *k = sh.mine[warp][0], *v = sh.mine[warp][1];
  if (active) {
    load_vector(k, it.qkv(p, 1), row, p.dh, p.scale, lane);
    load_vector(v, it.qkv(p, 2), row, p.dh, 1.f, lane);
  }
  __syncwarp();
  float dk[DHP / 32] = {}, dv[DHP / 32] = {};
  for (int t0 = 0; t0 < p.N; t0 += kTile) {
    __syncthreads();
    load_tile<T, DHP>(sh.a, it.qkv(p, 0), t0, p.N, p.dh);
    load_tile<T, DHP>(sh.b, it.out(p, p.dout), t0, p.N, p.dh);
    if (threadIdx.x < kTile && t0 + static_cast<int>(threadIdx.x) < p.N) {
      sh.ra[threadIdx.x] = p.lse[it.i * p.N + t0 + threadIdx.x];
      sh.rb[threadIdx.x] = p.delta[it.i * p.N + t0 + threadIdx.x];
    }
    __syncthreads();
    if (!active) continue;
    const bool valid = t0 + lane < p.N;
    const float prob = valid ? __expf(dot_row<DHP>(k, sh.a, lane, p.dh) - sh.ra[lane]) : 0.f;
    const float ds = valid ? prob * (dot_row<DHP>(v, sh.b, lane, p.dh) - sh.rb[lane]) : 0.f;
    accumulate<DHP>(dv, prob, sh.b, lane, p.dh);
    accumulate<DHP>(dk, ds, sh.a, lane, p.dh);
  }
  if (!active) return;
  T* dst = static_cast<T*>(p.dqkv) + it.row_offset(p, row, 3 * p.r);
  store_row<T, DHP>(dst + p.r, dk, p.scale, lane, p.dh);
  store_row<T, DHP>(dst + 2 * p.r, dv, 1.f, lane, p.dh);
}

template <typename T, int DHP>
cudaError_t launch_dh(const Params& p, int64_t items, bool backward, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>((p.N + kWarps - 1) / kWarps));
  if (!backward) {
    lsa_fwd_kernel<T, DHP><<<grid, kWarps * 32, 0, stream>>>(p);
    return cudaGetLastError();
  }
  lsa_bwd_dq_kernel<T, DHP><<<grid, kWarps * 32, 0, stream>>>(p);  // writes delta, which dk/dv reads
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  lsa_bwd_dkdv_kernel<T, DHP><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Params& p, int64_t items, bool backward, cudaStream_t stream) {
  if (p.dh <= 32) return launch_dh<T, 32>(p, items, backward, stream);
  if (p.dh <= 64) return launch_dh<T, 64>(p, items, backward, stream);
  return launch_dh<T, 128>(p, items, backward, stream);
}

cudaError_t launch(const LowRankAttnArgs& a, bool backward, cudaStream_t stream, const char** why) {
  auto fail = [why](const char* msg) { return invalid_argument(why, msg); };
  if (dtype_bytes(a.dtype) == 0) return fail(kDtypeError);
  if (a.K < 0 || a.B < 0 || a.N < 0 || a.H < 1 || a.dh < 1) return fail("K, B, N must be >= 0 and H, dh >= 1");
  if (a.dh > kLowRankAttnMaxHeadDim) return fail("dh must be <= kLowRankAttnMaxHeadDim (128)");
  const int64_t items = a.K * a.B * a.H;
  if (items > kIntMax || a.B > kIntMax) return fail("K * B * H must be < 2^31");
  if ((a.N + kWarps - 1) / kWarps > 65535) return fail("N must be <= 524280");
  if (a.s_k < 0 || a.s_b < 0 || a.s_n < 0) return fail("qkv strides must be non-negative");
  if (items == 0 || a.N == 0) return cudaSuccess;
  if (a.qkv == nullptr || a.out == nullptr || a.lse == nullptr) return fail("qkv, out and lse must be non-null");
  if (backward && (a.dout == nullptr || a.dqkv == nullptr || a.delta == nullptr))
    return fail("the backward needs dout, dqkv and delta");
  const Params p{a.qkv, a.s_k, a.s_b, a.s_n, a.out, a.lse, a.dout, a.dqkv, a.delta,
                 static_cast<int>(a.B), static_cast<int>(a.N), static_cast<int>(a.H), static_cast<int>(a.dh),
                 static_cast<int>(a.H * a.dh), a.scale};
  switch (a.dtype) {
    case CUDA_R_32F: return launch_typed<float>(p, items, backward, stream);
    case CUDA_R_16F: return launch_typed<__half>(p, items, backward, stream);
    default: return launch_typed<__nv_bfloat16>(p, items, backward, stream);
  }
}

}  // namespace

cudaError_t low_rank_attention_fwd_launch(const LowRankAttnArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, false, stream, why);
}

cudaError_t low_rank_attention_bwd_launch(const LowRankAttnArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, true, stream, why);
}

}  // namespace effkern::gpu
