// Low-rank attention core, CPU host side: checks, output allocation, the SIMD level and ATen's thread pool over
// (side network, image, head) items. The arithmetic lives in low_rank_attention_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../ops.h"
#include "host.h"
#include "low_rank_attention.h"

namespace effkern {
namespace {

cpu::LowRankAttnParams make_params(const at::Tensor& qkv, int64_t heads, double scale, const char* op) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1, op, ": qkv must be [K, B, N, 3r] with a contiguous last dim");
  TORCH_CHECK(heads > 0 && qkv.size(3) % (3 * heads) == 0, op, ": qkv's last dim must be 3 * heads * head_dim");
  cpu::LowRankAttnParams p{};
  p.qkv = qkv.data_ptr();
  p.s_k = qkv.stride(0), p.s_b = qkv.stride(1), p.s_n = qkv.stride(2);
  p.K = qkv.size(0), p.B = qkv.size(1), p.N = qkv.size(2), p.H = heads, p.dh = qkv.size(3) / (3 * heads);
  p.dtype = cpu::dtype_of(qkv, op);
  p.scale = static_cast<float>(scale);
  return p;
}

void run_items(const cpu::LowRankAttnParams& p, bool backward) {
  const cpu::LowRankAttnItemsFn fn =
      backward ? cpu::pick_isa(&cpu::avx512::low_rank_attn_bwd_items, &cpu::avx2::low_rank_attn_bwd_items,
                               &cpu::generic::low_rank_attn_bwd_items)
               : cpu::pick_isa(&cpu::avx512::low_rank_attn_fwd_items, &cpu::avx2::low_rank_attn_fwd_items,
                               &cpu::generic::low_rank_attn_fwd_items);
  const int64_t scratch = backward ? cpu::low_rank_attn_bwd_scratch(p) : cpu::low_rank_attn_fwd_scratch(p);
  cpu::parallel_chunks(p.K * p.B * p.H, 1, scratch, [&](int64_t begin, int64_t end, float* buf, int64_t) {
    const cpu::FlushDenormals ftz;
    fn(p, begin, end, buf);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> low_rank_attention_fwd_cpu(const at::Tensor& qkv, int64_t heads, double scale) {
  cpu::LowRankAttnParams p = make_params(qkv, heads, scale, "low_rank_attention_fwd_cpu");
  at::Tensor out = at::empty({p.K, p.B, p.N, p.H * p.dh}, qkv.options());
  at::Tensor lse = at::empty({p.K, p.B, p.H, p.N}, qkv.options().dtype(at::kFloat));
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  if (p.N > 0 && p.dh > 0) run_items(p, false);
  return {out, lse};
}

at::Tensor low_rank_attention_bwd_cpu(const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& dout, int64_t heads, double scale) {
  cpu::LowRankAttnParams p = make_params(qkv, heads, scale, "low_rank_attention_bwd_cpu");
  const std::vector<int64_t> out_shape{p.K, p.B, p.N, p.H * p.dh};
  TORCH_CHECK(out.sizes() == out_shape && dout.sizes() == out_shape && out.is_contiguous() && dout.is_contiguous() &&
                  out.scalar_type() == qkv.scalar_type() && dout.scalar_type() == qkv.scalar_type(),
              "low_rank_attention_bwd_cpu: out and dout must be contiguous [K, B, N, r] in qkv's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == p.K * p.B * p.H * p.N,
              "low_rank_attention_bwd_cpu: lse must be a contiguous float32 [K, B, H, N]");
  at::Tensor dqkv = at::empty({p.K, p.B, p.N, 3 * p.H * p.dh}, qkv.options());
  p.out = out.data_ptr(), p.dout = dout.data_ptr(), p.dqkv = dqkv.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  if (p.N > 0 && p.dh > 0) {
    run_items(p, true);
  } else {
    dqkv.zero_();
  }
  return dqkv;
}

}  // namespace effkern
