// Host-side entry points of the compiled kernels, on normalised arguments (see effkern/ops/<op>.py):
//   q contiguous [B, Hq, D]; caches [B, Hkv, S_max, Dk|Dv] with any strides but a contiguous last dim;
//   seq_lens / slots int32 [B]; kv_start int32 [B] or none; cos, sin fp32 contiguous [B, R/2] or none;
//   q_proj fp32 [Hq, D, Dk] and k_proj fp32 [Hkv, g*D, Dk] contiguous or none; softcap 0 = off;
//   rope_style 0 = half, 1 = interleaved; rotary_dim R (0 = no RoPE). The Python entry points have validated
//   everything already.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace effkern {

// "avx512", "avx2" or "generic": the CPU kernels' runtime-dispatched SIMD level on this machine.
const char* cpu_isa();

at::Tensor gqa_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& seq_lens, const std::optional<at::Tensor>& kv_start,
                          const std::optional<at::Tensor>& cos,
                          const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& q_proj,
                          double scale, double softcap, int64_t rope_style, int64_t rotary_dim);

void kv_append_cpu(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& k_proj,
                   int64_t rope_style, int64_t rotary_dim);

// Low-rank attention core: qkv [K, B, N, 3r] (any strides, contiguous last dim) -> (out [K, B, N, r] in qkv's
// dtype, lse fp32 [K, B, H, N]); the backward returns dqkv [K, B, N, 3r] contiguous.
std::tuple<at::Tensor, at::Tensor> low_rank_attention_fwd_cpu(const at::Tensor& qkv, int64_t heads, double scale);
at::Tensor low_rank_attention_bwd_cpu(const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& dout, int64_t heads, double scale);

// Residual add + LayerNorm (no affine): u contiguous [..., d], z contiguous with u's trailing dims -> (h = u + z,
// x = LayerNorm(h), rstd fp32 [...]); the backward returns du from x, rstd, dh and dx (all contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_layer_norm_fwd_cpu(const at::Tensor& u, const at::Tensor& z,
                                                                           double eps);
at::Tensor residual_layer_norm_bwd_cpu(const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& dh,
                                       const at::Tensor& dx);

// Fused low-rank linear y = act(x u^T + b1) v^T + b2 (act 0 none, 1 relu, 2 gelu): x contiguous [M, d_in],
// u [r, d_in], v [d_out, r], biases [r] / [d_out] or none, y relu'd when out_act is 1. The backward recomputes the
// rank-r hidden layer and returns (dx, du, db1, dv, db2) from g = dL/dy, masked where y (when given) is not > 0.
at::Tensor low_rank_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                   const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                   int64_t out_act);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> low_rank_linear_bwd_cpu(
    const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1, const at::Tensor& v,
    const at::Tensor& g, const std::optional<at::Tensor>& y, int64_t act);

// Compressed embedding lookup with reconstruction: ids int [B, F, L] (< 0 = padding), table [V, k] contiguous,
// offsets int [F], u [F, d, k], mu [F, d] -> out [B, F, d] = u_f (sum or mean of the bag's rows) + c mu_f. The
// backward returns (dtable, du, dmu) from g [B, F, d].
at::Tensor low_rank_embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& offsets,
                                      const at::Tensor& u, const at::Tensor& mu, bool mean);
std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_embedding_bwd_cpu(const at::Tensor& ids,
                                                                          const at::Tensor& table,
                                                                          const at::Tensor& offsets,
                                                                          const at::Tensor& u, const at::Tensor& mu,
                                                                          const at::Tensor& g, bool mean);

#ifdef EFFKERN_WITH_CUDA
// The CUDA kernels check their index arguments without a host sync: a value outside its range is clamped (gqa_decode
// lengths), skipped (kv_append slots, low_rank_embedding ids) and recorded in `err`, an int32 [1] tensor in pinned
// host memory (or on the device) that effkern/ops/_device_errors.py reads and turns into a ValueError.
at::Tensor gqa_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seq_lens, const std::optional<at::Tensor>& kv_start,
                           const std::optional<at::Tensor>& cos,
                           const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& q_proj,
                           double scale, double softcap, int64_t rope_style, int64_t rotary_dim,
                           const at::Tensor& err);

void kv_append_cuda(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slots, const std::optional<at::Tensor>& cos,
                    const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& k_proj,
                    int64_t rope_style, int64_t rotary_dim, const at::Tensor& err);

std::tuple<at::Tensor, at::Tensor> low_rank_attention_fwd_cuda(const at::Tensor& qkv, int64_t heads, double scale);
at::Tensor low_rank_attention_bwd_cuda(const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& dout, int64_t heads, double scale);

// Low-rank linear (rank <= 64): the backward returns (dx, act(t), dt), the weight gradients are GEMMs over them.
at::Tensor low_rank_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                    const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                    int64_t out_act);
std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_linear_bwd_cuda(const at::Tensor& x, const at::Tensor& u,
                                                                        const std::optional<at::Tensor>& b1,
                                                                        const at::Tensor& v, const at::Tensor& g,
                                                                        int64_t act);

// Compressed embedding (k <= 32): the backward kernel returns each bag's gradient de fp32 [B, F, k].
at::Tensor low_rank_embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& offsets,
                                       const at::Tensor& u, const at::Tensor& mu, bool mean, const at::Tensor& err);
at::Tensor low_rank_embedding_de_cuda(const at::Tensor& ids, const at::Tensor& u, const at::Tensor& g, bool mean);
#endif

}  // namespace effkern
