// Residual add + LayerNorm, CPU host side: checks, outputs, the SIMD level and ATen's thread pool over rows.
// The arithmetic lives in residual_layer_norm_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "host.h"
#include "residual_layer_norm.h"

namespace effkern {
namespace {

// Rows per parallel chunk: enough work (~64 KB of fp32 traffic) to amortise a chunk's dispatch.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

void run_rows(const cpu::ResidualLayerNormParams& p, cpu::ResidualLayerNormRowsFn fn) {
  cpu::parallel_chunks(p.rows, grain(p.d), cpu::residual_layer_norm_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t) { fn(p, begin, end, scratch); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_layer_norm_fwd_cpu(const at::Tensor& u, const at::Tensor& z,
                                                                           double eps) {
  const char* op = "residual_layer_norm_fwd_cpu";
  TORCH_CHECK(u.dim() >= 1 && u.is_contiguous() && z.is_contiguous(), op, ": u and z must be contiguous");
  TORCH_CHECK(z.scalar_type() == u.scalar_type() && z.dim() >= 1 && z.size(-1) == u.size(-1), op,
              ": z must have u's dtype and last dim");
  cpu::ResidualLayerNormParams p{};
  p.d = u.size(-1);
  TORCH_CHECK(p.d > 0, op, ": the last dim must be > 0");
  p.rows = u.numel() / p.d, p.z_rows = z.numel() / p.d;
  p.dtype = cpu::dtype_of(u, op);
  p.eps = static_cast<float>(eps);
  at::Tensor h = at::empty_like(u), x = at::empty_like(u);
  std::vector<int64_t> stat_shape(u.sizes().begin(), u.sizes().end() - 1);
  at::Tensor rstd = at::empty(stat_shape, u.options().dtype(at::kFloat));
  if (p.rows == 0) return {h, x, rstd};
  TORCH_CHECK(p.z_rows > 0 && p.rows % p.z_rows == 0, op, ": u's rows must be a multiple of z's");
  p.u = u.data_ptr(), p.z = z.data_ptr(), p.h = h.data_ptr(), p.x = x.data_ptr(), p.rstd = rstd.data_ptr<float>();
  run_rows(p, cpu::pick_isa(&cpu::avx512::residual_layer_norm_fwd_rows, &cpu::avx2::residual_layer_norm_fwd_rows,
                            &cpu::generic::residual_layer_norm_fwd_rows));
  return {h, x, rstd};
}

at::Tensor residual_layer_norm_bwd_cpu(const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& dh,
                                       const at::Tensor& dx) {
  const char* op = "residual_layer_norm_bwd_cpu";
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && dh.is_contiguous() && dx.is_contiguous(), op,
              ": x, dh and dx must be contiguous");
  TORCH_CHECK(dh.sizes() == x.sizes() && dx.sizes() == x.sizes() && dh.scalar_type() == x.scalar_type() &&
                  dx.scalar_type() == x.scalar_type(),
              op, ": dh and dx must have x's shape and dtype");
  cpu::ResidualLayerNormParams p{};
  p.d = x.size(-1);
  p.rows = p.d > 0 ? x.numel() / p.d : 0;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == p.rows, op,
              ": rstd must be a contiguous float32 tensor with one value per row");
  p.dtype = cpu::dtype_of(x, op);
  at::Tensor du = at::empty_like(x);
  p.x = const_cast<void*>(x.data_ptr()), p.rstd = const_cast<float*>(rstd.data_ptr<float>());
  p.dh = dh.data_ptr(), p.dx = dx.data_ptr(), p.du = du.data_ptr();
  run_rows(p, cpu::pick_isa(&cpu::avx512::residual_layer_norm_bwd_rows, &cpu::avx2::residual_layer_norm_bwd_rows,
                            &cpu::generic::residual_layer_norm_bwd_rows));
  return du;
}

}  // namespace effkern
