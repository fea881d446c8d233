// Device helpers shared by the CUDA kernel families: explicit element conversions (the torch build defines
// __CUDA_NO_HALF_CONVERSIONS__) and RoPE of one element. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effkern::gpu {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Element e of RoPE(x) in fp32 for one head x[D]; cs/sn are the row's [R/2] tables (unused when R == 0).
template <typename T>
__device__ __forceinline__ float rope_at(const T* __restrict__ x, int e, const float* __restrict__ cs,
                                         const float* __restrict__ sn, int style, int R) {
  const float xe = to_float(x[e]);
  if (e >= R) return xe;
  if (style == 0) {  // half: pairs (i, i + R/2)
    const int half = R / 2;
    if (e < half) return xe * cs[e] - to_float(x[e + half]) * sn[e];
    return xe * cs[e - half] + to_float(x[e - half]) * sn[e - half];
  }
  const int i = e >> 1;  // interleaved: pairs (2i, 2i + 1)
  if ((e & 1) == 0) return xe * cs[i] - to_float(x[e + 1]) * sn[i];
  return xe * cs[i] + to_float(x[e - 1]) * sn[i];
}

}  // namespace effkern::gpu
