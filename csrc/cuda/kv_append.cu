// KV-cache append kernels; interface and semantics in kv_append.cuh.
//
// One decode step writes one token per sequence, so this op moves B * Hkv * (Dk + Dv) elements: it is
// launch-latency bound, and the kernels aim for one small launch with coalesced row writes.
//   * Without k_proj: one CTA per (sequence, KV head) rotates the key row and copies the value row.
//   * With k_proj: one CTA per (KV head j, up to kProjRows sequences) stages the rotated, concatenated group
//     heads of its sequences in shared memory and streams k_proj[j] once for all of them (each [g*D, Dk]
//     matrix is read B / kProjRows times instead of B times).
#include "kv_append.cuh"

#include "common.cuh"

#include <cstdint>

namespace effkern::gpu {
namespace {

constexpr int kThreads = 128;  // a KV row has 64..256 elements: one or two per thread
constexpr int kProjRows = 8;   // sequences per projection CTA (register accumulators per thread)
constexpr size_t kSmemLimit = 48 * 1024;  // dynamic shared memory available without an opt-in

struct Params {
  void* k_cache;
  void* v_cache;
  const void* k;
  const void* v;
  const int32_t* slots;
  const float* cos;
  const float* sin;
  const float* k_proj;
  int* err;
  int64_t ksb, ksh, kss, vsb, vsh, vss;
  int B, Hk, Hkv, G, D, Dk, Dv, S_max;
  int rows;  // sequences per projection CTA
  int rope_style, rotary_dim;
};

__device__ __forceinline__ bool slot_ok(int slot, int s_max) { return slot >= 0 && slot < s_max; }

// Grid: B * Hkv CTAs, (b, j) = (blockIdx.x / Hkv, blockIdx.x % Hkv). Here Hk == Hkv and Dk == D.
template <typename T>
__global__ void __launch_bounds__(kThreads) kv_append_kernel(const Params p) {
  const int b = static_cast<int>(blockIdx.x / p.Hkv), j = static_cast<int>(blockIdx.x % p.Hkv);
  const int slot = p.slots[b];
  if (!slot_ok(slot, p.S_max)) {
    if (j == 0 && threadIdx.x == 0) record_error(p.err, kErrSlots);
    return;
  }
  const int half = p.rotary_dim / 2;
  const float* cs = p.rotary_dim ? p.cos + static_cast<int64_t>(b) * half : nullptr;
  const float* sn = p.rotary_dim ? p.sin + static_cast<int64_t>(b) * half : nullptr;
  const T* k = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Hk + j) * p.D;
  const T* v = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Hkv + j) * p.Dv;
  T* kc = static_cast<T*>(p.k_cache) + b * p.ksb + j * p.ksh + slot * p.kss;
  T* vc = static_cast<T*>(p.v_cache) + b * p.vsb + j * p.vsh + slot * p.vss;
  for (int e = threadIdx.x; e < p.Dk; e += kThreads) kc[e] = from_float<T>(rope_at(k, e, cs, sn, p.rope_style, p.rotary_dim));
  for (int e = threadIdx.x; e < p.Dv; e += kThreads) vc[e] = v[e];
}

// Grid (Hkv, ceil(B / rows)); dynamic shared memory rows * G * D floats.
template <typename T>
__global__ void __launch_bounds__(kThreads) kv_append_proj_kernel(const Params p) {
  extern __shared__ float x_s[];  // [rows][G * D]: rotated input heads j*G .. j*G+G-1, concatenated
  const int j = blockIdx.x;
  const int b0 = blockIdx.y * p.rows;
  const int nb = min(p.rows, p.B - b0);
  const int width = p.G * p.D;
  const int half = p.rotary_dim / 2;
  const int t = static_cast<int>(threadIdx.x);
  if (j == 0 && t < nb && !slot_ok(p.slots[b0 + t], p.S_max)) record_error(p.err, kErrSlots);  // one per sequence
  for (int i = threadIdx.x; i < nb * width; i += kThreads) {
    const int r = i / width, c = i % width;
    const int head = j * p.G + c / p.D, d = c % p.D;  // concat order: input head j*G + c/D, element d
    const int64_t b = b0 + r;
    const float* cs = p.rotary_dim ? p.cos + b * half : nullptr;
    const float* sn = p.rotary_dim ? p.sin + b * half : nullptr;
    x_s[i] = rope_at(static_cast<const T*>(p.k) + (b * p.Hk + head) * p.D, d, cs, sn, p.rope_style, p.rotary_dim);
  }
  __syncthreads();

  const float* w = p.k_proj + static_cast<int64_t>(j) * width * p.Dk;
  for (int e = threadIdx.x; e < p.Dk; e += kThreads) {
    float a[kProjRows];
#pragma unroll
    for (int r = 0; r < kProjRows; ++r) a[r] = 0.f;
    for (int c = 0; c < width; ++c) {
      const float wce = __ldg(w + static_cast<int64_t>(c) * p.Dk + e);  // coalesced over e
#pragma unroll
      for (int r = 0; r < kProjRows; ++r)
        if (r < nb) a[r] = fmaf(x_s[r * width + c], wce, a[r]);
    }
#pragma unroll
    for (int r = 0; r < kProjRows; ++r) {
      if (r >= nb) break;
      const int64_t b = b0 + r;
      const int slot = p.slots[b];
      if (slot_ok(slot, p.S_max))
        static_cast<T*>(p.k_cache)[b * p.ksb + j * p.ksh + slot * p.kss + e] = from_float<T>(a[r]);
    }
  }
  for (int i = threadIdx.x; i < nb * p.Dv; i += kThreads) {
    const int r = i / p.Dv, e = i % p.Dv;
    const int64_t b = b0 + r;
    const int slot = p.slots[b];
    if (slot_ok(slot, p.S_max))
      static_cast<T*>(p.v_cache)[b * p.vsb + j * p.vsh + slot * p.vss + e] =
          static_cast<const T*>(p.v)[(b * p.Hkv + j) * p.Dv + e];
  }
}

template <typename T>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
  if (p.k_proj == nullptr) {
    kv_append_kernel<T><<<static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Hkv), kThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(p.Hkv), static_cast<unsigned>((p.B + p.rows - 1) / p.rows));
    const size_t smem = sizeof(float) * static_cast<size_t>(p.rows) * p.G * p.D;
    kv_append_proj_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kv_append_launch(const KvAppendArgs& a, cudaStream_t stream, const char** why) {
  auto fail = [why](const char* msg) { return invalid_argument(why, msg); };
  if (dtype_bytes(a.dtype) == 0) return fail(kDtypeError);
  if (a.batch < 0 || a.batch > kIntMax) return fail("batch must be in [0, 2^31)");
  if (a.k_heads < 1 || a.kv_heads < 1 || a.k_heads > kIntMax) return fail("k_heads and kv_heads must be >= 1");
  if (a.head_dim < 1 || a.k_dim < 1 || a.v_dim < 1 || a.head_dim > kIntMax || a.k_dim > kIntMax || a.v_dim > kIntMax)
    return fail("head_dim, k_dim and v_dim must be in [1, 2^31)");
  if (a.max_seq < 1 || a.max_seq > kIntMax) return fail("max_seq must be in [1, 2^31)");
  if (a.k_proj == nullptr && (a.k_heads != a.kv_heads || a.k_dim != a.head_dim))
    return fail("without k_proj, k_heads must equal kv_heads and k_dim must equal head_dim");
  if (a.k_proj != nullptr && a.k_heads % a.kv_heads != 0) return fail("k_heads must be a multiple of kv_heads");
  if (a.rotary_dim < 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim)
    return fail("rotary_dim must be even and in [0, head_dim]");
  if (a.rotary_dim > 0 && (a.cos == nullptr || a.sin == nullptr)) return fail("rotary_dim > 0 needs cos and sin");
  if (a.rope_style != 0 && a.rope_style != 1) return fail("rope_style must be 0 (half) or 1 (interleaved)");
  if (a.k_stride_b < 0 || a.k_stride_h < 0 || a.k_stride_s < 0 || a.v_stride_b < 0 || a.v_stride_h < 0 ||
      a.v_stride_s < 0)
    return fail("cache strides must be non-negative");
  if (a.batch == 0) return cudaSuccess;
  if (a.k_cache == nullptr || a.v_cache == nullptr || a.k == nullptr || a.v == nullptr || a.slots == nullptr)
    return fail("k_cache, v_cache, k, v and slots must be non-null");

  const int64_t g = a.k_heads / a.kv_heads;
  int rows = 0;
  if (a.k_proj != nullptr) {
    const int64_t width = g * a.head_dim;
    const int64_t by_smem = static_cast<int64_t>(kSmemLimit / sizeof(float)) / width;
    rows = static_cast<int>(by_smem < kProjRows ? by_smem : kProjRows);
    if (rows < 1) return fail("(k_heads / kv_heads) * head_dim too large for shared memory (needs <= 12288)");
    if ((a.batch + rows - 1) / rows > 65535) return fail("batch too large for the projection grid");
    if (a.kv_heads > kIntMax) return fail("kv_heads too large");
  } else if (a.batch * a.kv_heads > kIntMax) {
    return fail("batch * kv_heads must be < 2^31");
  }

  Params p{};
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.k = a.k;
  p.v = a.v;
  p.slots = a.slots;
  p.cos = a.cos;
  p.sin = a.sin;
  p.k_proj = a.k_proj;
  p.err = a.err;
  p.ksb = a.k_stride_b;
  p.ksh = a.k_stride_h;
  p.kss = a.k_stride_s;
  p.vsb = a.v_stride_b;
  p.vsh = a.v_stride_h;
  p.vss = a.v_stride_s;
  p.B = static_cast<int>(a.batch);
  p.Hk = static_cast<int>(a.k_heads);
  p.Hkv = static_cast<int>(a.kv_heads);
  p.G = static_cast<int>(g);
  p.D = static_cast<int>(a.head_dim);
  p.Dk = static_cast<int>(a.k_dim);
  p.Dv = static_cast<int>(a.v_dim);
  p.S_max = static_cast<int>(a.max_seq);
  p.rows = rows;
  p.rope_style = a.rope_style;
  p.rotary_dim = a.rotary_dim;
  switch (a.dtype) {
    case CUDA_R_32F: return launch_typed<float>(p, stream);
    case CUDA_R_16F: return launch_typed<__half>(p, stream);
    default: return launch_typed<__nv_bfloat16>(p, stream);
  }
}

}  // namespace effkern::gpu
