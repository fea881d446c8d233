// Helpers shared by the CUDA kernel families: launcher argument checks, index-error recording, explicit element
// conversions (the torch build defines __CUDA_NO_HALF_CONVERSIONS__) and RoPE of one element. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

namespace effkern::gpu {

constexpr int64_t kIntMax = 0x7fffffff;  // bound of the launchers' int indices and grid dimensions

// A launcher's argument check failed: name it through *why (a static string), return cudaErrorInvalidValue.
inline cudaError_t invalid_argument(const char** why, const char* msg) {
  if (why != nullptr) *why = msg;
  return cudaErrorInvalidValue;
}

// Bytes per element of the kernels' dtypes, 0 for any other.
inline size_t dtype_bytes(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: return sizeof(float);
    case CUDA_R_16F: return sizeof(__half);
    case CUDA_R_16BF: return sizeof(__nv_bfloat16);
    default: return 0;
  }
}
constexpr const char* kDtypeError = "dtype must be CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF";

// Index errors the kernels find in their device-side index arguments (the bits of effkern/ops/_device_errors.py,
// which turns them into messages). A kernel never dereferences a bad index: it clamps a length, skips a slot or
// reads nothing for an id, and records the code in the caller's int32 error word.
enum IndexError : int { kErrSeqLens = 1, kErrKvStart = 2, kErrSlots = 4, kErrIds = 8 };

// Records `code` in the error word (null: not recorded). A plain volatile store, not an atomic: the word is
// usually pinned host memory, where atomics are not portable (they need PCIe atomics). Kernels racing with
// different codes leave one of them, which still raises.
__device__ __forceinline__ void record_error(int* err, int code) {
  if (err != nullptr) *static_cast<volatile int*>(err) = code;
}

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
