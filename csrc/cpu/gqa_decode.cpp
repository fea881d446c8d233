// GQA decode attention, CPU host side: picks the SIMD level, splits the work, runs it on ATen's thread pool
// and merges KV splits. The arithmetic lives in gqa_decode_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "../ops.h"
#include "gqa_decode.h"
#include "host.h"

namespace effkern {
namespace {

using cpu::DType;

void store(void* out, DType dt, int64_t i, float x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(out)[i] = x; break;
    case DType::f16: static_cast<c10::Half*>(out)[i] = c10::Half(x); break;
    case DType::bf16: static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(x); break;
  }
}

// out[row] = merge of the row's splits: sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
void combine_splits(const cpu::GqaDecodeParams& p) {
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(p.Dv);
    for (int64_t row = begin; row < end; ++row) {
      const float* ml = p.part_ml + row * p.splits * 2;
      float M = -INFINITY;
      // An empty split has l = 0 and m = -inf: skip it, never exp(-inf + inf). A NaN l or m is not skipped, so a
      // NaN in one split reaches the output as torch's softmax would carry it.
      for (int64_t s = 0; s < p.splits; ++s)
        if (ml[2 * s + 1] != 0.f) M = std::max(M, ml[2 * s]);
      std::fill(o.begin(), o.end(), 0.f);
      float L = 0.f;
      for (int64_t s = 0; s < p.splits; ++s) {
        if (ml[2 * s + 1] == 0.f) continue;
        const float w = std::exp(ml[2 * s] - M);
        L += w * ml[2 * s + 1];
        const float* a = p.part_acc + (row * p.splits + s) * p.Dv;
        for (int64_t c = 0; c < p.Dv; ++c) o[c] += w * a[c];
      }
      const float inv = L == 0.f ? 0.f : 1.f / L;
      for (int64_t c = 0; c < p.Dv; ++c) store(p.out, p.dtype, row * p.Dv + c, o[c] * inv);
    }
  });
}

}  // namespace

at::Tensor gqa_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& seq_lens, const std::optional<at::Tensor>& kv_start,
                          const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& q_proj,
                          double scale, double softcap, int64_t rope_style, int64_t rotary_dim) {
  const char* op = "gqa_decode_cpu";
  TORCH_CHECK_VALUE(q.dim() == 3 && q.is_contiguous() && q.size(2) > 0, op,
                    ": q must be a contiguous [B, Hq, D] tensor with D >= 1, got ", q.sizes());
  const int64_t B = q.size(0), S = k_cache.dim() == 4 ? k_cache.size(2) : 0;
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                        k_cache.size(0) == B && v_cache.size(0) == B && v_cache.size(1) == k_cache.size(1) &&
                        v_cache.size(2) == S,
                    op, ": caches must be [B=", B, ", Hkv, S_max, D] with a contiguous last dim and equal B, Hkv and "
                    "S_max, got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0 = off), got ",
                    softcap);
  cpu::check_rope(cos, sin, B, q.size(2), rope_style, rotary_dim, op);
  const int32_t* lens = cpu::check_indices(seq_lens, B, [](int64_t) { return 0; }, [&](int64_t) { return S; },
                                           "seq_lens", "the cache length S_max", op);
  const int32_t* starts = kv_start ? cpu::check_indices(*kv_start, B, [](int64_t) { return 0; },
                                                        [&](int64_t b) { return lens[b]; }, "kv_start",
                                                        "0 to the sequence's seq_lens", op)
                                   : nullptr;
  cpu::GqaDecodeParams p{};
  p.B = q.size(0), p.Hq = q.size(1), p.D = q.size(2);
  p.Hkv = k_cache.size(1), p.Dk = k_cache.size(3), p.Dv = v_cache.size(3);
  TORCH_CHECK_VALUE(p.Hkv > 0 && p.Hq % p.Hkv == 0, op, ": Hq=", p.Hq, " must be a multiple of Hkv=", p.Hkv);
  TORCH_CHECK_VALUE(q_proj ? cpu::is_dense(*q_proj, at::kFloat, {p.Hq, p.D, p.Dk}) : p.Dk == p.D, op,
                    ": q_proj must be a contiguous float32 [Hq, D, Dk] = [", p.Hq, ", ", p.D, ", ", p.Dk,
                    "] tensor, or None with the caches' Dk equal to q's D");
  p.dtype = cpu::dtype_of(q, op);
  TORCH_CHECK_VALUE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
                    ": q and the caches must share a dtype");
  p.k_sb = k_cache.stride(0), p.k_sh = k_cache.stride(1), p.k_ss = k_cache.stride(2);
  p.v_sb = v_cache.stride(0), p.v_sh = v_cache.stride(1), p.v_ss = v_cache.stride(2);
  p.q = q.data_ptr(), p.k = k_cache.data_ptr(), p.v = v_cache.data_ptr();
  p.seq_lens = lens, p.kv_start = starts;
  p.cos = rotary_dim ? cos->data_ptr<float>() : nullptr;
  p.sin = rotary_dim ? sin->data_ptr<float>() : nullptr;
  p.q_proj = q_proj ? q_proj->data_ptr<float>() : nullptr;
  p.scale = static_cast<float>(scale), p.softcap = static_cast<float>(softcap);
  p.rope_style = static_cast<int>(rope_style), p.rotary_dim = static_cast<int>(rotary_dim);

  at::Tensor out = at::empty({p.B, p.Hq, p.Dv}, q.options());
  p.out = out.data_ptr();
  if (p.B == 0 || p.Hq == 0 || p.Dv == 0) return out;

  // Split the KV range only when (sequence, KV head) pairs are too few to give every thread ~4 items to
  // balance, and never below 256 keys per split so the merge stays negligible next to the KV reads.
  const int64_t threads = at::get_num_threads();
  int64_t max_len = 0;  // the longest valid key range
  for (int64_t b = 0; b < p.B; ++b)
    max_len = std::max<int64_t>(max_len, p.seq_lens[b] - (p.kv_start ? p.kv_start[b] : 0));
  const int64_t pairs = p.B * p.Hkv;
  int64_t splits = std::min((4 * threads + pairs - 1) / pairs, std::max<int64_t>(1, max_len / 256));
  splits = std::max<int64_t>(splits, 1);
  p.split_len = std::max<int64_t>(cpu::kTile, (max_len + splits - 1) / splits);
  p.split_len = (p.split_len + cpu::kTile - 1) / cpu::kTile * cpu::kTile;
  p.splits = std::max<int64_t>(1, (max_len + p.split_len - 1) / p.split_len);
  at::Tensor part_acc, part_ml;
  if (p.splits > 1) {
    part_acc = at::empty({p.B * p.Hq * p.splits * p.Dv}, q.options().dtype(at::kFloat));
    part_ml = at::empty({p.B * p.Hq * p.splits * 2}, q.options().dtype(at::kFloat));
    p.part_acc = part_acc.data_ptr<float>(), p.part_ml = part_ml.data_ptr<float>();
  }

  const cpu::GqaDecodeItemsFn items_fn =
      cpu::pick_isa(&cpu::avx512::gqa_decode_items, &cpu::avx2::gqa_decode_items, &cpu::generic::gqa_decode_items);
  // Items differ in cost (ragged lengths), so threads pull them one at a time instead of static chunks.
  const int64_t n_items = pairs * p.splits, scratch_floats = cpu::gqa_decode_scratch_floats(p);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    const cpu::FlushDenormals ftz;
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) items_fn(p, i, i + 1, scratch.data());
  });
  if (p.splits > 1) combine_splits(p);
  return out;
}

}  // namespace effkern
