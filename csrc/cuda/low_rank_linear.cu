// Fused low-rank linear: forward and backward CUDA kernels. Interface and semantics: low_rank_linear.cuh.
// Torch-free.
//
// A block owns kRows = 64 rows of x and the whole rank (RP = r padded to 16 / 32 / 64): 256 threads as 16 x 16,
// each holding a 4-row x (RP / 16)-column register tile of the hidden layer t = x U^T + b1, accumulated over d_in
// in 32-wide slices of x and U^T staged in shared memory. The hidden tile then lives in shared memory only:
//   forward   act(t) -> smem; y = act(t) V^T + b2 in 64-column slices (V^T staged per slice), 4 x 4 per thread;
//   backward  act(t) -> global (for dV), act'(t) -> smem; da = g V over 32-column slices of g and V; dt = da *
//             act'(t) in place (each thread rewrites only its own elements), -> global (for dU); dx = dt U in
//             64-column slices. The weight-gradient GEMMs over all rows are cuBLAS's (the torch glue).
// fp32 FMAs: CTR ranks are 16..64, below where a tensor-core tile pays; fp16/bf16 are widened when staged.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "low_rank_linear.cuh"

namespace effkern::gpu {
namespace {

constexpr int kThreads = 256;  // 16 x 16
constexpr int kRows = 64;      // rows of x per block: 16 thread rows x 4
constexpr int kSlice = 32;     // d_in slice of the hidden-layer product
constexpr int kCols = 64;      // output slice of the second products: 16 thread columns x 4

struct Params {
  const void* x;
  const void* u;
  const void* b1;
  const void* v;
  const void* b2;
  void* y;
  const void* g;
  void* dx;
  void* hidden;
  void* dt;
  int M, d_in, r, d_out, act;
  bool relu_out;
};

// ReLU as torch's: NaN stays NaN (fmaxf(NaN, 0) would return 0 and hide a diverged row).
__device__ __forceinline__ float relu(float t) { return t < 0.f ? 0.f : t; }

__device__ __forceinline__ float activation(float t, int act) {
  if (act == 1) return relu(t);
  if (act == 2) return t * normcdff(t);
  return t;
}

__device__ __forceinline__ float activation_grad(float t, int act) {
  if (act == 1) return t <= 0.f ? 0.f : 1.f;  // NaN passes the gradient, as torch's threshold_backward
  if (act == 2) return normcdff(t) + t * expf(-0.5f * t * t) * 0.3989422804014327f;
  return 1.f;
}

template <int RP>
struct Smem {
  float hid[kRows][RP + 1];  // act(t) (forward) or act'(t), then dt (backward); +1 against bank conflicts
  union {
    struct {
      float x[kRows][kSlice + 1];
      float ut[kSlice][RP + 1];
    } a;                            // hidden-layer product: slices of x and U^T
    float vt[RP][kCols + 1];        // forward: a slice of V^T
    struct {
      float g[kRows][kSlice + 1];
      float v[kSlice][RP + 1];
    } b;                            // backward da = g V: slices of g and V
    float u[RP][kCols + 1];         // backward dx = dt U: a slice of U
  } stage;
};

// acc[i][j] += sum_{k < K} A[4 ty + i][k] * B[k][CT tx + j]: this thread's 4 x CT tile of a product of two
// shared-memory tiles.
template <int CT, int LDA, int LDB>
__device__ __forceinline__ void tile_fma(float (&acc)[4][CT], const float (*A)[LDA], const float (*B)[LDB], int K) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 8
  for (int k = 0; k < K; ++k) {
    float a[4], b[CT];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = A[4 * ty + i][k];
#pragma unroll
    for (int j = 0; j < CT; ++j) b[j] = B[k][CT * tx + j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < CT; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

template <typename T>
__device__ __forceinline__ float bias_at(const void* b, int c, int n) {
  return b != nullptr && c < n ? to_float(static_cast<const T*>(b)[c]) : 0.f;
}

// dst[row][c] = acc (+ bias[c], then relu when asked) for this thread's 4 x 4 tile at rows row0 + 4 ty..,
// columns c0 + 4 tx.. of a [M, n] matrix, inside its bounds.
template <typename T>
__device__ __forceinline__ void store_tile(const float (&acc)[4][4], T* dst, const void* bias, bool relu_out,
                                           int64_t row0, int c0, int M, int n) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + 4 * ty + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + 4 * tx + j;
      const float out = acc[i][j] + bias_at<T>(bias, c, n);
      if (row < M && c < n) dst[row * n + c] = from_float<T>(relu_out ? relu(out) : out);
    }
  }
}

// Stages rows [r0, r0 + R) x columns [c0, c0 + C) of a row-major [rmax, cmax] matrix (leading dim ld) into shared
// memory in fp32, zeros outside it: at dst[i][j], or at dst[j][i] when TRANSPOSE. Threads walk the source row-wise,
// so global reads coalesce.
template <bool TRANSPOSE, int R, int C, typename T, int LD>
__device__ __forceinline__ void stage(float (*dst)[LD], const void* src, int64_t ld, int64_t r0, int64_t rmax,
                                      int64_t c0, int64_t cmax) {
  const T* m = static_cast<const T*>(src);
  for (int e = threadIdx.x; e < R * C; e += kThreads) {
    const int i = e / C, j = e % C;
    const float x = r0 + i < rmax && c0 + j < cmax ? to_float(m[(r0 + i) * ld + c0 + j]) : 0.f;
    if (TRANSPOSE) {
      dst[j][i] = x;
    } else {
      dst[i][j] = x;
    }
  }
}

// acc = this thread's 4 x CT tile of t = x U^T + b1 (rows 4 ty.., columns CT tx..; padded columns: zero rows of
// U^T and no bias, so t = 0 there).
template <typename T, int RP>
__device__ __forceinline__ void hidden_product(const Params& p, Smem<RP>& s, int64_t row0, float (&acc)[4][RP / 16]) {
  constexpr int CT = RP / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < CT; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < p.d_in; k0 += kSlice) {
    stage<false, kRows, kSlice, T>(s.stage.a.x, p.x, p.d_in, row0, p.M, k0, p.d_in);
    stage<true, RP, kSlice, T>(s.stage.a.ut, p.u, p.d_in, 0, p.r, k0, p.d_in);
    __syncthreads();
    tile_fma<CT>(acc, s.stage.a.x, s.stage.a.ut, kSlice);
    __syncthreads();
  }
  const int tx = threadIdx.x % 16;
#pragma unroll
  for (int j = 0; j < CT; ++j) {
    const float b = bias_at<T>(p.b1, CT * tx + j, p.r);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i][j] += b;
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 2) lrl_fwd_kernel(Params p) {
  constexpr int CT = RP / 16;
  __shared__ Smem<RP> s;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  float acc[4][CT];
  hidden_product<T, RP>(p, s, row0, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      // Padded columns are 0 outright: t there is x . 0, NaN for an infinite x, and NaN * 0 would reach y.
      const int c = CT * tx + j;
      s.hid[4 * ty + i][c] = c < p.r ? activation(acc[i][j], p.act) : 0.f;
    }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  for (int n0 = 0; n0 < p.d_out; n0 += kCols) {
    stage<true, kCols, RP, T>(s.stage.vt, p.v, p.r, n0, p.d_out, 0, p.r);
    __syncthreads();
    float out[4][4] = {};
    tile_fma<4>(out, s.hid, s.stage.vt, RP);
    store_tile<T>(out, y, p.b2, p.relu_out, row0, n0, p.M, p.d_out);
    __syncthreads();
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 2) lrl_bwd_kernel(Params p) {
  constexpr int CT = RP / 16;
  __shared__ Smem<RP> s;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  T* hidden = static_cast<T*>(p.hidden);
  T* dt = static_cast<T*>(p.dt);
  float acc[4][CT];
  hidden_product<T, RP>(p, s, row0, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + 4 * ty + i;
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      const int c = CT * tx + j;
      const float t = acc[i][j];
      if (row < p.M && c < p.r) hidden[row * p.r + c] = from_float<T>(activation(t, p.act));
      s.hid[4 * ty + i][c] = activation_grad(t, p.act);
      acc[i][j] = 0.f;  // reused for da
    }
  }
  for (int n0 = 0; n0 < p.d_out; n0 += kSlice) {  // da = g V
    stage<false, kRows, kSlice, T>(s.stage.b.g, p.g, p.d_out, row0, p.M, n0, p.d_out);
    stage<false, kSlice, RP, T>(s.stage.b.v, p.v, p.r, n0, p.d_out, 0, p.r);
    __syncthreads();
    tile_fma<CT>(acc, s.stage.b.g, s.stage.b.v, kSlice);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // dt = da * act'(t), in place: each thread rewrites its own elements
    const int64_t row = row0 + 4 * ty + i;
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      const int c = CT * tx + j;
      const float d = c < p.r ? acc[i][j] * s.hid[4 * ty + i][c] : 0.f;  // padded: 0, as in the forward
      s.hid[4 * ty + i][c] = d;
      if (row < p.M && c < p.r) dt[row * p.r + c] = from_float<T>(d);
    }
  }
  __syncthreads();
  T* dx = static_cast<T*>(p.dx);
  for (int k0 = 0; k0 < p.d_in; k0 += kCols) {  // dx = dt U
    stage<false, RP, kCols, T>(s.stage.u, p.u, p.d_in, 0, p.r, k0, p.d_in);
    __syncthreads();
    float out[4][4] = {};
    tile_fma<4>(out, s.hid, s.stage.u, RP);
    store_tile<T>(out, dx, nullptr, false, row0, k0, p.M, p.d_in);
    __syncthreads();
  }
}

cudaError_t check(const LowRankLinearArgs& a, bool backward, const char** why) {
  if (dtype_bytes(a.dtype) == 0) return invalid_argument(why, kDtypeError);
  if (a.M < 0 || a.d_in < 1 || a.r < 1 || a.d_out < 1 || a.M > kIntMax || a.d_in > kIntMax || a.d_out > kIntMax)
    return invalid_argument(why, "M must be >= 0 and d_in, r, d_out >= 1, all below 2^31");
  if (a.r > kLowRankLinearMaxRank) return invalid_argument(why, "r exceeds kLowRankLinearMaxRank");
  if (a.act < 0 || a.act > 2) return invalid_argument(why, "act must be 0 (none), 1 (relu) or 2 (gelu)");
  if (a.x == nullptr || a.u == nullptr || a.v == nullptr) return invalid_argument(why, "x, u and v are required");
  if (backward ? (a.g == nullptr || a.dx == nullptr || a.hidden == nullptr || a.dt == nullptr) : a.y == nullptr)
    return invalid_argument(why, "missing output or gradient pointer");
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_typed(const LowRankLinearArgs& a, bool backward, cudaStream_t stream) {
  const Params p{a.x, a.u, a.b1, a.v, a.b2, a.y, a.g, a.dx, a.hidden, a.dt, static_cast<int>(a.M),
                 static_cast<int>(a.d_in), static_cast<int>(a.r), static_cast<int>(a.d_out), a.act, a.relu_out};
  const dim3 grid(static_cast<unsigned>((a.M + kRows - 1) / kRows));
  auto run = [&](auto kernel) { kernel<<<grid, kThreads, 0, stream>>>(p); };
  if (a.r <= 16) {
    backward ? run(lrl_bwd_kernel<T, 16>) : run(lrl_fwd_kernel<T, 16>);
  } else if (a.r <= 32) {
    backward ? run(lrl_bwd_kernel<T, 32>) : run(lrl_fwd_kernel<T, 32>);
  } else {
    backward ? run(lrl_bwd_kernel<T, 64>) : run(lrl_fwd_kernel<T, 64>);
  }
  return cudaGetLastError();
}

cudaError_t launch(const LowRankLinearArgs& a, bool backward, cudaStream_t stream, const char** why) {
  const cudaError_t err = check(a, backward, why);
  if (err != cudaSuccess || a.M == 0) return err;
  switch (a.dtype) {
    case CUDA_R_16F: return launch_typed<__half>(a, backward, stream);
    case CUDA_R_16BF: return launch_typed<__nv_bfloat16>(a, backward, stream);
    default: return launch_typed<float>(a, backward, stream);
  }
}

}  // namespace

cudaError_t low_rank_linear_fwd_launch(const LowRankLinearArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, false, stream, why);
}

cudaError_t low_rank_linear_bwd_launch(const LowRankLinearArgs& args, cudaStream_t stream, const char** why) {
  return launch(args, true, stream, why);
}

}  // namespace effkern::gpu
