// KV-cache append on the CPU: rotate the new token's key heads, optionally project each group of them with
// its [g*D, Dk] matrix, and write keys and values at each sequence's slot. One token per sequence is
// O(B * Hkv * g * D * Dk) work, so plain loops (auto-vectorised axpy) are enough; it runs in parallel over
// (sequence, KV head) pairs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "host.h"
#include "rope.h"

namespace effkern {
namespace {

template <typename T>
void append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
            const int32_t* slots, const float* cos, const float* sin, const float* k_proj, int64_t rope_style,
            int64_t rotary_dim) {
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), Dk = k_cache.size(3), Dv = v_cache.size(3);
  const int64_t Hk = k.size(1), D = k.size(2), g = Hk / Hkv, half = rotary_dim / 2;
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  at::parallel_for(0, B * Hkv, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(g * D), y(Dk);
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / Hkv, j = bj % Hkv;
      for (int64_t e = 0; e < g * D; ++e) x[e] = static_cast<float>(kp[(b * Hk + j * g) * D + e]);
      for (int64_t hh = 0; hh < g && half > 0; ++hh)
        cpu::rope_rotate(x.data() + hh * D, cos + b * half, sin + b * half, half, rope_style);
      const float* kv_row = x.data();
      if (k_proj != nullptr) {
        const float* P = k_proj + j * g * D * Dk;
        std::fill(y.begin(), y.end(), 0.f);
        for (int64_t e = 0; e < g * D; ++e)
          for (int64_t f = 0; f < Dk; ++f) y[f] += x[e] * P[e * Dk + f];
        kv_row = y.data();
      }
      const int64_t t = slots[b];
      T* kdst = kc + b * k_cache.stride(0) + j * k_cache.stride(1) + t * k_cache.stride(2);
      for (int64_t f = 0; f < Dk; ++f) kdst[f] = static_cast<T>(kv_row[f]);
      T* vdst = vc + b * v_cache.stride(0) + j * v_cache.stride(1) + t * v_cache.stride(2);
      const T* vsrc = vp + (b * Hkv + j) * Dv;
      for (int64_t f = 0; f < Dv; ++f) vdst[f] = vsrc[f];
    }
  });
}

}  // namespace

void kv_append_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& k_proj,
                   int64_t rope_style, int64_t rotary_dim) {
  const char* op = "kv_append_cpu";
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                        v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
                    op, ": caches must be [B, Hkv, S_max, D] with a contiguous last dim and equal B, Hkv and S_max, "
                    "got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), Dk = k_cache.size(3);
  TORCH_CHECK_VALUE(k.dim() == 3 && k.is_contiguous() && k.size(0) == B && Hkv > 0 && k.size(1) % Hkv == 0, op,
                    ": k must be a contiguous [B=", B, ", Hk, D] tensor with Hk a multiple of Hkv=", Hkv, ", got ",
                    k.sizes());
  const int64_t Hk = k.size(1), D = k.size(2);
  TORCH_CHECK_VALUE(v.is_contiguous() && v.sizes() == at::IntArrayRef({B, Hkv, v_cache.size(3)}), op,
                    ": v must be a contiguous [B, Hkv, Dv] = ", at::IntArrayRef({B, Hkv, v_cache.size(3)}),
                    " tensor, got ", v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                        v_cache.scalar_type() == k_cache.scalar_type(),
                    op, ": the new keys / values and both caches must share a dtype");
  TORCH_CHECK_VALUE(k_proj ? cpu::is_dense(*k_proj, at::kFloat, {Hkv, Hk / Hkv * D, Dk}) : Hk == Hkv && D == Dk, op,
                    ": k_proj must be a contiguous float32 [Hkv, g*D, Dk] = [", Hkv, ", ", Hk / Hkv * D, ", ", Dk,
                    "] tensor, or None with k's heads and head dim equal to the cache's");
  cpu::check_rope(cos, sin, B, D, rope_style, rotary_dim, op);
  const int32_t* sl = cpu::check_indices(slots, B, [](int64_t) { return 0; }, [&](int64_t) { return S - 1; }, "slots",
                                         "the cache's slots 0 to S_max - 1", op);
  const float* c = rotary_dim ? cos->data_ptr<float>() : nullptr;
  const float* s = rotary_dim ? sin->data_ptr<float>() : nullptr;
  const float* P = k_proj ? k_proj->data_ptr<float>() : nullptr;
  switch (k_cache.scalar_type()) {
    case at::kFloat: append<float>(k_cache, v_cache, k, v, sl, c, s, P, rope_style, rotary_dim); break;
    case at::kHalf: append<c10::Half>(k_cache, v_cache, k, v, sl, c, s, P, rope_style, rotary_dim); break;
    case at::kBFloat16: append<c10::BFloat16>(k_cache, v_cache, k, v, sl, c, s, P, rope_style, rotary_dim); break;
    default: TORCH_CHECK(false, "kv_append_cpu: unsupported dtype ", k_cache.scalar_type());
  }
}

}  // namespace effkern
