// Fused low-rank linear, CPU host side: checks, weight packing (fp32, zero-padded to whole vectors), the SIMD
// level, ATen's thread pool over row tiles and the sum of the per-thread weight gradients. The arithmetic lives in
// low_rank_linear_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../ops.h"
#include "host.h"
#include "low_rank_linear.h"

namespace effkern {
namespace {

// fp32 [rows_p][cols_p] holding m (rows x cols) at the top left, zeros elsewhere.
at::Tensor padded(const at::Tensor& m, int64_t rows_p, int64_t cols_p) {
  at::Tensor out = at::zeros({rows_p, cols_p}, m.options().dtype(at::kFloat));
  out.narrow(0, 0, m.size(0)).narrow(1, 0, m.size(1)).copy_(m);
  return out;
}

struct Packed {
  at::Tensor ut, b1, vt, b2, up, vp;
};

cpu::LowRankLinearParams make_params(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                     const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                     bool backward, Packed& keep, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [M, d_in] tensor");
  TORCH_CHECK(u.dim() == 2 && v.dim() == 2 && u.size(1) == x.size(1) && v.size(1) == u.size(0), op,
              ": u must be [r, d_in] and v [d_out, r]");
  TORCH_CHECK(u.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(), op,
              ": u and v must have x's dtype");
  TORCH_CHECK(act >= 0 && act <= 2, op, ": act must be 0 (none), 1 (relu) or 2 (gelu)");
  cpu::LowRankLinearParams p{};
  p.M = x.size(0), p.d_in = x.size(1), p.r = u.size(0), p.d_out = v.size(0);
  p.rp = cpu::low_rank_linear_padded(p.r), p.dop = cpu::low_rank_linear_padded(p.d_out);
  p.dinp = cpu::low_rank_linear_padded(p.d_in);
  p.act = static_cast<cpu::LowRankAct>(act);
  p.dtype = cpu::dtype_of(x, op);
  keep.ut = padded(u.t(), p.d_in, p.rp);
  keep.b1 = b1 ? padded(b1->reshape({1, p.r}), 1, p.rp) : at::zeros({1, p.rp}, x.options().dtype(at::kFloat));
  p.ut = keep.ut.data_ptr<float>(), p.b1 = keep.b1.data_ptr<float>();
  if (backward) {
    keep.up = padded(u, p.r, p.dinp);
    keep.vp = padded(v, p.d_out, p.rp);
    p.up = keep.up.data_ptr<float>(), p.vp = keep.vp.data_ptr<float>();
  } else {
    keep.vt = padded(v.t(), p.r, p.dop);
    keep.b2 = b2 ? padded(b2->reshape({1, p.d_out}), 1, p.dop) : at::zeros({1, p.dop}, x.options().dtype(at::kFloat));
    p.vt = keep.vt.data_ptr<float>(), p.b2 = keep.b2.data_ptr<float>();
  }
  p.x = x.data_ptr();
  return p;
}

constexpr int64_t kStreamBytes = int64_t{4} << 20;  // outputs from 4 MiB on are written with streaming stores

int64_t tiles(int64_t rows) { return (rows + cpu::kLowRankLinearRows - 1) / cpu::kLowRankLinearRows; }

}  // namespace

at::Tensor low_rank_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                   const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act) {
  Packed keep;
  cpu::LowRankLinearParams p = make_params(x, u, b1, v, b2, act, false, keep, "low_rank_linear_fwd_cpu");
  at::Tensor y = at::empty({p.M, p.d_out}, x.options());
  p.y = y.data_ptr();
  // An output far larger than the L2s leaves the caches anyway: skipping its read-for-ownership saves a third of
  // the kernel's memory traffic (measured: 400 -> 32 -> 400 at batch 4096 went from 0.9x to 1.16x the torch pair).
  p.stream_y = p.M * p.d_out * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_linear_fwd_tiles, &cpu::avx2::low_rank_linear_fwd_tiles,
                                &cpu::generic::low_rank_linear_fwd_tiles);
  cpu::parallel_chunks(tiles(p.M), 1, cpu::low_rank_linear_fwd_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t) { fn(p, begin, end, scratch); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> low_rank_linear_bwd_cpu(
    const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1, const at::Tensor& v,
    const at::Tensor& g, int64_t act) {
  Packed keep;
  cpu::LowRankLinearParams p = make_params(x, u, b1, v, std::nullopt, act, true, keep, "low_rank_linear_bwd_cpu");
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous() && g.size(0) == p.M && g.size(1) == p.d_out &&
                  g.scalar_type() == x.scalar_type(),
              "low_rank_linear_bwd_cpu: g must be a contiguous [M, d_out] tensor in x's dtype");
  const int64_t threads = at::get_num_threads();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dut = at::zeros({threads, p.d_in, p.rp}, f32), dv = at::zeros({threads, p.d_out, p.rp}, f32);
  at::Tensor db1 = at::zeros({threads, p.rp}, f32), db2 = at::zeros({threads, p.dop}, f32);
  at::Tensor dx = at::empty({p.M, p.d_in}, x.options());
  p.g = g.data_ptr(), p.dx = dx.data_ptr();
  p.dut = dut.data_ptr<float>(), p.dv = dv.data_ptr<float>(), p.db1 = db1.data_ptr<float>();
  p.db2 = db2.data_ptr<float>();
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_linear_bwd_tiles, &cpu::avx2::low_rank_linear_bwd_tiles,
                                &cpu::generic::low_rank_linear_bwd_tiles);
  cpu::parallel_chunks(tiles(p.M), 1, cpu::low_rank_linear_bwd_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t thread) {
                         fn(p, begin, end, scratch, thread);
                       });
  const auto dtype = x.scalar_type();
  return {dx,
          dut.sum(0).narrow(1, 0, p.r).t().to(dtype).contiguous(),
          db1.sum(0).narrow(0, 0, p.r).to(dtype),
          dv.sum(0).narrow(1, 0, p.r).to(dtype).contiguous(),
          db2.sum(0).narrow(0, 0, p.d_out).to(dtype)};
}

}  // namespace effkern
