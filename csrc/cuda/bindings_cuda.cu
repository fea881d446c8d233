// Thin torch glue for the torch-free CUDA launchers (gqa_decode, kv_append, low_rank_attention, low_rank_linear,
// low_rank_embedding .cuh): argument checks, device
// guard, current stream, caching-allocator output and workspace, launch error reporting. Only light ATen/c10
// headers on purpose: torch/extension.h would make this nvcc compile take ~110 s and ~3 GB.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../ops.h"
#include "gqa_decode.cuh"
#include "kv_append.cuh"
#include "low_rank_attention.cuh"
#include "low_rank_embedding.cuh"
#include "low_rank_linear.cuh"

namespace effkern {
namespace {

cudaDataType_t cuda_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK_VALUE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
}

void check_cache(const at::Tensor& c, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda(c, ref, op, name);
  TORCH_CHECK_VALUE(c.dim() == 4, op, ": ", name, " must be 4-D [B, Hkv, S_max, D], got ", c.sizes());
  TORCH_CHECK_VALUE(c.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ", ref.scalar_type(),
                    ", got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.size(3) <= 1 || c.stride(3) == 1, op, ": ", name,
                    " must have a contiguous last dim, got strides ", c.strides());
}

void check_index(const at::Tensor& t, const at::Tensor& ref, int64_t b, const char* op, const char* name) {
  check_cuda(t, ref, op, name);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == b, op, ": ", name,
                    " must be an int32 [B=", b, "] tensor, got ", t.scalar_type(), " ", t.sizes());
}

// Returns the cos/sin data pointers (null when rotary_dim == 0) after checking them against [B, R/2].
std::pair<const float*, const float*> rope_tables(const std::optional<at::Tensor>& cos,
                                                  const std::optional<at::Tensor>& sin, const at::Tensor& ref,
                                                  int64_t b, int64_t rotary_dim, const char* op) {
  if (rotary_dim == 0) return {nullptr, nullptr};
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0, op, ": rotary_dim must be even and >= 0, got ", rotary_dim);
  TORCH_CHECK_VALUE(cos.has_value() && sin.has_value(), op, ": rotary_dim=", rotary_dim, " needs cos and sin");
  for (const auto* t : {&*cos, &*sin}) {
    check_cuda(*t, ref, op, "cos/sin");
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == b &&
                          t->size(1) == rotary_dim / 2 && t->is_contiguous(),
                      op, ": cos and sin must be contiguous float32 [B=", b, ", R/2=", rotary_dim / 2, "], got ",
                      t->scalar_type(), " ", t->sizes());
  }
  return {cos->data_ptr<float>(), sin->data_ptr<float>()};
}

// The int32 [1] error word the kernels record index errors into (effkern/ops/_device_errors.py): pinned host memory,
// whose host pointer is valid on every device under unified virtual addressing (the host reads it without a
// sync), or memory on `ref`'s device.
int* error_word(const at::Tensor& err, const at::Tensor& ref, const char* op) {
  TORCH_CHECK_VALUE(err.scalar_type() == at::kInt && err.numel() == 1, op, ": err must be an int32 [1] tensor, got ",
                    err.scalar_type(), " ", err.sizes());
  TORCH_CHECK_VALUE(err.is_cpu() ? err.is_pinned() : err.device() == ref.device(), op,
                    ": err must be in pinned host memory or on ", ref.device(), ", got ", err.device());
  return err.data_ptr<int>();
}

// Turns a launcher status into a torch error: argument errors carry the launcher's message.
void check_launch(cudaError_t err, const char* why, const char* op) {
  if (err == cudaErrorInvalidValue && why != nullptr) TORCH_CHECK_VALUE(false, op, ": ", why);
  C10_CUDA_CHECK(err);
}

// The cache pointers, layout and RoPE fields both launchers' argument structs share.
template <typename Args>
void set_cache_args(Args& a, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t rope_style,
                    int64_t rotary_dim) {
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.max_seq = k_cache.size(2);
  a.k_stride_b = k_cache.stride(0);
  a.k_stride_h = k_cache.stride(1);
  a.k_stride_s = k_cache.stride(2);
  a.v_stride_b = v_cache.stride(0);
  a.v_stride_h = v_cache.stride(1);
  a.v_stride_s = v_cache.stride(2);
  a.rope_style = static_cast<int>(rope_style);
  a.rotary_dim = static_cast<int>(rotary_dim);
}

}  // namespace

at::Tensor gqa_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seq_lens, const std::optional<at::Tensor>& kv_start,
                           const std::optional<at::Tensor>& cos,
                           const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& q_proj,
                           double scale, double softcap, int64_t rope_style, int64_t rotary_dim,
                           const at::Tensor& err) {
  constexpr const char* op = "gqa_decode_cuda";
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 3 && q.is_contiguous(), op, ": q must be a contiguous [B, Hq, D] tensor, got ",
                    q.sizes());
  const cudaDataType_t dtype = cuda_dtype(q, op, "q");
  check_cache(k_cache, q, op, "k_cache");
  check_cache(v_cache, q, op, "v_cache");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(1), s_max = k_cache.size(2), dk = k_cache.size(3), dv = v_cache.size(3);
  TORCH_CHECK_VALUE(k_cache.size(0) == b, op, ": k_cache must have B=", b, " rows, got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.size(0) == b && v_cache.size(1) == hkv && v_cache.size(2) == s_max, op,
                    ": v_cache must be [B, Hkv, S_max] = [", b, ", ", hkv, ", ", s_max, "] like k_cache, got ",
                    v_cache.sizes());
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, op, ": Hq=", hq, " must be a multiple of Hkv=", hkv);
  const at::Tensor lens = seq_lens.contiguous();  // a no-op for the op's normalised int32 tensor
  check_index(lens, q, b, op, "seq_lens");
  at::Tensor starts;
  if (kv_start.has_value()) {
    starts = kv_start->contiguous();
    check_index(starts, q, b, op, "kv_start");
  }
  const float* q_proj_ptr = nullptr;
  if (q_proj.has_value()) {
    check_cuda(*q_proj, q, op, "q_proj");
    TORCH_CHECK_VALUE(q_proj->scalar_type() == at::kFloat && q_proj->is_contiguous() && q_proj->dim() == 3 &&
                          q_proj->size(0) == hq && q_proj->size(1) == d && q_proj->size(2) == dk,
                      op, ": q_proj must be a contiguous float32 [Hq, D, Dk] = [", hq, ", ", d, ", ", dk, "], got ",
                      q_proj->scalar_type(), " ", q_proj->sizes());
    q_proj_ptr = q_proj->data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(dk == d, op, ": k_cache's head dim Dk=", dk, " must equal q's D=", d, " without q_proj");
  }
  TORCH_CHECK_VALUE(std::max(dk, dv) <= gpu::kGqaDecodeMaxHeadDim, op, ": head dims up to ", gpu::kGqaDecodeMaxHeadDim,
                    " (got Dk=", dk, ", Dv=", dv, "); larger heads use the Triton kernel");
  const auto [cos_ptr, sin_ptr] = rope_tables(cos, sin, q, b, rotary_dim, op);
  int* err_ptr = error_word(err, q, op);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({b, hq, dv}, q.options());
  if (out.numel() == 0) return out;

  gpu::GqaDecodeArgs args;
  args.dtype = dtype;
  set_cache_args(args, k_cache, v_cache, rope_style, rotary_dim);
  args.q = q.data_ptr();
  args.seq_lens = lens.data_ptr<int32_t>();
  args.kv_start = kv_start.has_value() ? starts.data_ptr<int32_t>() : nullptr;
  args.cos = cos_ptr;
  args.sin = sin_ptr;
  args.q_proj = q_proj_ptr;
  args.out = out.data_ptr();
  args.err = err_ptr;
  args.batch = b;
  args.q_heads = hq;
  args.kv_heads = hkv;
  args.head_dim = d;
  args.k_dim = dk;
  args.v_dim = dv;
  args.scale = static_cast<float>(scale);
  args.softcap = static_cast<float>(softcap);
  args.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  const size_t ws_bytes = gpu::gqa_decode_workspace_bytes(args);
  at::Tensor workspace;  // from the caching allocator: freed here, reused only after this stream's work
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const char* why = nullptr;
  const cudaError_t status = gpu::gqa_decode_launch(args, ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
                                                    at::cuda::getCurrentCUDAStream(), &why);
  check_launch(status, why, op);
  return out;
}

void kv_append_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slots, const std::optional<at::Tensor>& cos,
                    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& k_proj,
                    int64_t rope_style, int64_t rotary_dim, const at::Tensor& err) {
  constexpr const char* op = "kv_append_cuda";
  TORCH_CHECK_VALUE(k_cache.is_cuda(), op, ": k_cache must be a CUDA tensor, got ", k_cache.device());
  const cudaDataType_t dtype = cuda_dtype(k_cache, op, "k_cache");
  check_cache(k_cache, k_cache, op, "k_cache");
  check_cache(v_cache, k_cache, op, "v_cache");
  const int64_t b = k_cache.size(0), hkv = k_cache.size(1), s_max = k_cache.size(2), dk = k_cache.size(3);
  const int64_t dv = v_cache.size(3);
  TORCH_CHECK_VALUE(v_cache.size(0) == b && v_cache.size(1) == hkv && v_cache.size(2) == s_max, op,
                    ": v_cache must be [B, Hkv, S_max] = [", b, ", ", hkv, ", ", s_max, "] like k_cache, got ",
                    v_cache.sizes());
  check_cuda(k, k_cache, op, "k");
  check_cuda(v, k_cache, op, "v");
  TORCH_CHECK_VALUE(k.dim() == 3 && k.is_contiguous() && k.size(0) == b && k.scalar_type() == k_cache.scalar_type(), op,
                    ": k must be a contiguous [B=", b, ", Hk, D] tensor of the cache dtype, got ", k.scalar_type(), " ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3 && v.is_contiguous() && v.size(0) == b && v.size(1) == hkv && v.size(2) == dv &&
                        v.scalar_type() == k_cache.scalar_type(),
                    op, ": v must be a contiguous [B, Hkv, Dv] = [", b, ", ", hkv, ", ", dv,
                    "] tensor of the cache dtype, got ", v.scalar_type(), " ", v.sizes());
  const int64_t hk = k.size(1), d = k.size(2);
  const at::Tensor slot_idx = slots.contiguous();
  check_index(slot_idx, k_cache, b, op, "slots");
  const float* k_proj_ptr = nullptr;
  if (k_proj.has_value()) {
    TORCH_CHECK_VALUE(hkv > 0 && hk % hkv == 0, op, ": k's Hk=", hk, " must be a multiple of Hkv=", hkv);
    check_cuda(*k_proj, k_cache, op, "k_proj");
    TORCH_CHECK_VALUE(k_proj->scalar_type() == at::kFloat && k_proj->is_contiguous() && k_proj->dim() == 3 &&
                          k_proj->size(0) == hkv && k_proj->size(1) == hk / hkv * d && k_proj->size(2) == dk,
                      op, ": k_proj must be a contiguous float32 [Hkv, g*D, Dk] = [", hkv, ", ", hk / hkv * d, ", ", dk,
                      "], got ", k_proj->scalar_type(), " ", k_proj->sizes());
    k_proj_ptr = k_proj->data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(hk == hkv && d == dk, op, ": without k_proj, k [B, Hk, D] must match the cache's (Hkv=", hkv,
                      ", Dk=", dk, "), got ", k.sizes());
  }
  const auto [cos_ptr, sin_ptr] = rope_tables(cos, sin, k_cache, b, rotary_dim, op);
  int* err_ptr = error_word(err, k_cache, op);
  if (b == 0 || hkv == 0) return;

  const c10::cuda::CUDAGuard guard(k_cache.device());
  gpu::KvAppendArgs args;
  args.dtype = dtype;
  set_cache_args(args, k_cache, v_cache, rope_style, rotary_dim);
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.slots = slot_idx.data_ptr<int32_t>();
  args.cos = cos_ptr;
  args.sin = sin_ptr;
  args.k_proj = k_proj_ptr;
  args.err = err_ptr;
  args.batch = b;
  args.k_heads = hk;
  args.kv_heads = hkv;
  args.head_dim = d;
  args.k_dim = dk;
  args.v_dim = dv;
  const char* why = nullptr;
  check_launch(gpu::kv_append_launch(args, at::cuda::getCurrentCUDAStream(), &why), why, op);
}

namespace {

// The launcher arguments of the low-rank attention core from qkv [K, B, N, 3r] (contiguous last dim).
gpu::LowRankAttnArgs low_rank_args(const at::Tensor& qkv, int64_t heads, double scale, const char* op) {
  TORCH_CHECK_VALUE(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK_VALUE(qkv.dim() == 4 && (qkv.size(3) <= 1 || qkv.stride(3) == 1), op,
                    ": qkv must be [K, B, N, 3r] with a contiguous last dim, got ", qkv.sizes(), " strides ",
                    qkv.strides());
  TORCH_CHECK_VALUE(heads > 0 && qkv.size(3) % (3 * heads) == 0, op, ": qkv's last dim must be 3 * heads * head_dim");
  gpu::LowRankAttnArgs a;
  a.dtype = cuda_dtype(qkv, op, "qkv");
  a.qkv = qkv.data_ptr();
  a.s_k = qkv.stride(0), a.s_b = qkv.stride(1), a.s_n = qkv.stride(2);
  a.K = qkv.size(0), a.B = qkv.size(1), a.N = qkv.size(2), a.H = heads, a.dh = qkv.size(3) / (3 * heads);
  a.scale = static_cast<float>(scale);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> low_rank_attention_fwd_cuda(const at::Tensor& qkv, int64_t heads, double scale) {
  constexpr const char* op = "low_rank_attention_fwd_cuda";
  gpu::LowRankAttnArgs a = low_rank_args(qkv, heads, scale, op);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out = at::empty({a.K, a.B, a.N, a.H * a.dh}, qkv.options());
  at::Tensor lse = at::empty({a.K, a.B, a.H, a.N}, qkv.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  const char* why = nullptr;
  check_launch(gpu::low_rank_attention_fwd_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return {out, lse};
}

at::Tensor low_rank_attention_bwd_cuda(const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& dout, int64_t heads, double scale) {
  constexpr const char* op = "low_rank_attention_bwd_cuda";
  gpu::LowRankAttnArgs a = low_rank_args(qkv, heads, scale, op);
  const std::vector<int64_t> out_shape{a.K, a.B, a.N, a.H * a.dh};
  for (const auto* t : {&out, &dout}) {
    check_cuda(*t, qkv, op, "out/dout");
    TORCH_CHECK_VALUE(t->sizes() == out_shape && t->is_contiguous() && t->scalar_type() == qkv.scalar_type(), op,
                      ": out and dout must be contiguous [K, B, N, r] in qkv's dtype");
  }
  check_cuda(lse, qkv, op, "lse");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                        lse.sizes() == at::IntArrayRef({a.K, a.B, a.H, a.N}),
                    op, ": lse must be a contiguous float32 [K, B, H, N]");
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor dqkv = at::empty({a.K, a.B, a.N, 3 * a.H * a.dh}, qkv.options());
  at::Tensor delta = at::empty({a.K, a.B, a.H, a.N}, qkv.options().dtype(at::kFloat));
  a.out = const_cast<void*>(out.data_ptr());
  a.lse = const_cast<float*>(lse.data_ptr<float>());
  a.dout = dout.data_ptr();
  a.dqkv = dqkv.data_ptr();
  a.delta = delta.data_ptr<float>();
  const char* why = nullptr;
  check_launch(gpu::low_rank_attention_bwd_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return dqkv;
}

namespace {

void check_operand(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda(t, ref, op, name);
  TORCH_CHECK_VALUE(t.is_contiguous() && t.scalar_type() == ref.scalar_type(), op, ": ", name,
                    " must be contiguous with dtype ", ref.scalar_type());
}

// A bias: none, or a contiguous [n] vector in ref's dtype.
const void* optional_ptr(const std::optional<at::Tensor>& t, int64_t n, const at::Tensor& ref, const char* op,
                         const char* name) {
  if (!t) return nullptr;
  check_operand(*t, ref, op, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must be [", n, "], got ", t->sizes());
  return t->data_ptr();
}

gpu::LowRankLinearArgs low_rank_linear_args(const at::Tensor& x, const at::Tensor& u,
                                            const std::optional<at::Tensor>& b1, const at::Tensor& v, int64_t act,
                                            const char* op) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op,
                    ": x must be a contiguous CUDA [M, d_in] tensor");
  check_operand(u, x, op, "u");
  check_operand(v, x, op, "v");
  TORCH_CHECK_VALUE(u.dim() == 2 && v.dim() == 2 && u.size(1) == x.size(1) && v.size(1) == u.size(0), op,
                    ": u must be [r, d_in] and v [d_out, r]");
  gpu::LowRankLinearArgs a;
  a.dtype = cuda_dtype(x, op, "x");
  a.x = x.data_ptr(), a.u = u.data_ptr(), a.v = v.data_ptr(), a.b1 = optional_ptr(b1, u.size(0), x, op, "b1");
  a.M = x.size(0), a.d_in = x.size(1), a.r = u.size(0), a.d_out = v.size(0), a.act = static_cast<int>(act);
  return a;
}

}  // namespace

at::Tensor low_rank_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                    const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                    int64_t out_act) {
  constexpr const char* op = "low_rank_linear_fwd_cuda";
  TORCH_CHECK_VALUE(out_act == 0 || out_act == 1, op, ": out_act must be 0 (none) or 1 (relu)");
  gpu::LowRankLinearArgs a = low_rank_linear_args(x, u, b1, v, act, op);
  a.relu_out = out_act == 1;
  a.b2 = optional_ptr(b2, a.d_out, x, op, "b2");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({a.M, a.d_out}, x.options());
  a.y = y.data_ptr();
  const char* why = nullptr;
  check_launch(gpu::low_rank_linear_fwd_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_linear_bwd_cuda(const at::Tensor& x, const at::Tensor& u,
                                                                        const std::optional<at::Tensor>& b1,
                                                                        const at::Tensor& v, const at::Tensor& g,
                                                                        int64_t act) {
  constexpr const char* op = "low_rank_linear_bwd_cuda";
  gpu::LowRankLinearArgs a = low_rank_linear_args(x, u, b1, v, act, op);
  check_operand(g, x, op, "g");
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == a.M && g.size(1) == a.d_out, op, ": g must be [M, d_out]");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), hidden = at::empty({a.M, a.r}, x.options()), dt = at::empty_like(hidden);
  a.g = g.data_ptr(), a.dx = dx.data_ptr(), a.hidden = hidden.data_ptr(), a.dt = dt.data_ptr();
  const char* why = nullptr;
  check_launch(gpu::low_rank_linear_bwd_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return {dx, hidden, dt};
}

namespace {

gpu::LowRankEmbeddingArgs low_rank_embedding_args(const at::Tensor& ids, const at::Tensor& u, bool mean,
                                                  const char* op) {
  TORCH_CHECK_VALUE(ids.is_cuda() && ids.dim() == 3 && ids.is_contiguous() && ids.scalar_type() == at::kLong, op,
                    ": ids must be a contiguous int64 CUDA [B, F, L] tensor");
  check_cuda(u, ids, op, "u");
  TORCH_CHECK_VALUE(u.dim() == 3 && u.is_contiguous() && u.size(0) == ids.size(1), op,
                    ": u must be a contiguous [F, d, k]");
  gpu::LowRankEmbeddingArgs a;
  a.dtype = cuda_dtype(u, op, "u");
  a.ids = ids.data_ptr<int64_t>(), a.u = u.data_ptr();
  a.B = ids.size(0), a.F = ids.size(1), a.L = ids.size(2), a.d = u.size(1), a.k = u.size(2), a.mean = mean;
  return a;
}

}  // namespace

at::Tensor low_rank_embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& offsets,
                                       const at::Tensor& u, const at::Tensor& mu, bool mean, const at::Tensor& err) {
  constexpr const char* op = "low_rank_embedding_fwd_cuda";
  gpu::LowRankEmbeddingArgs a = low_rank_embedding_args(ids, u, mean, op);
  check_operand(table, u, op, "table");
  check_operand(mu, u, op, "mu");
  check_cuda(offsets, ids, op, "offsets");
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == a.k && mu.dim() == 2 && mu.size(0) == a.F &&
                        mu.size(1) == a.d && offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                        offsets.dim() == 1 && offsets.size(0) == a.F,
                    op, ": table must be [V, k], mu [F, d] and offsets a contiguous int64 [F]");
  a.err = error_word(err, ids, op);
  const c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor out = at::empty({a.B, a.F, a.d}, table.options());
  a.table = table.data_ptr(), a.offsets = offsets.data_ptr<int64_t>(), a.mu = mu.data_ptr(), a.out = out.data_ptr();
  a.V = table.size(0);
  const char* why = nullptr;
  check_launch(gpu::low_rank_embedding_fwd_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return out;
}

at::Tensor low_rank_embedding_de_cuda(const at::Tensor& ids, const at::Tensor& u, const at::Tensor& g, bool mean) {
  constexpr const char* op = "low_rank_embedding_de_cuda";
  gpu::LowRankEmbeddingArgs a = low_rank_embedding_args(ids, u, mean, op);
  check_operand(g, u, op, "g");
  TORCH_CHECK_VALUE(g.dim() == 3 && g.size(0) == a.B && g.size(1) == a.F && g.size(2) == a.d, op,
                    ": g must be [B, F, d]");
  const c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor de = at::empty({a.B, a.F, a.k}, g.options().dtype(at::kFloat));
  a.g = g.data_ptr(), a.de = de.data_ptr<float>();
  const char* why = nullptr;
  check_launch(gpu::low_rank_embedding_de_launch(a, at::cuda::getCurrentCUDAStream(), &why), why, op);
  return de;
}

}  // namespace effkern
