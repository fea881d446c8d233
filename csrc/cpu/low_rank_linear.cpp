// Fused low-rank linear, CPU host side: checks, weight packing (fp32, zero-padded to whole vectors), the SIMD
// level, ATen's thread pool over row tiles and the sum of the per-thread weight gradients. The arithmetic lives in
// low_rank_linear_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <utility>

#include "../ops.h"
#include "host.h"
#include "low_rank_linear.h"

namespace effkern {
namespace {

// Copies m ([rows][cols] or [cols], any float dtype and strides) as fp32 to the top left of dst [dst_rows][ld],
// transposed when asked (dst[c][r] = m[r][c]); every other float of dst is zero. Plain loops into one buffer: the
// weights are packed on every call, where ATen's zeros + copy_ per weight cost more than a few rows' products.
// On x86 a transpose moves 4 x 4 blocks through SSE registers (faster than the scalar loop, measured: the packing
// was a large part of a one-row forward's time).
void pack(const at::Tensor& m, bool transpose, int64_t dst_rows, int64_t ld, float* dst) {
  const at::Tensor f = (m.dim() == 1 ? m.unsqueeze(0) : m).to(at::kFloat);
  const float* src = f.const_data_ptr<float>();
  const int64_t rows = f.size(0), cols = f.size(1), s0 = f.stride(0), s1 = f.stride(1);
  std::fill(dst, dst + dst_rows * ld, 0.f);
  int64_t r = 0;
#if defined(__x86_64__) || defined(__i386__)
  if (transpose && s1 == 1) {
    // Column blocks of 64: the 64 destination rows they fill stay in cache while every source row passes (row by
    // row across all columns, a transposed store goes to each of 4096 rows; measured: a 4096 -> 256 -> 4096 forward
    // of 64 rows faster blocked, the CTR layers' the same).
    const int64_t rows4 = rows / 4 * 4;
    for (int64_t c0 = 0; c0 < cols; c0 += 64) {
      const int64_t c1 = std::min(cols, c0 + 64);
      for (r = 0; r < rows4; r += 4) {
        const float* s = src + r * s0;
        int64_t c = c0;
        for (; c + 4 <= c1; c += 4) {
          __m128 a = _mm_loadu_ps(s + c), b = _mm_loadu_ps(s + s0 + c);
          __m128 e = _mm_loadu_ps(s + 2 * s0 + c), h = _mm_loadu_ps(s + 3 * s0 + c);
          _MM_TRANSPOSE4_PS(a, b, e, h);
          float* o = dst + c * ld + r;
          _mm_storeu_ps(o, a), _mm_storeu_ps(o + ld, b), _mm_storeu_ps(o + 2 * ld, e), _mm_storeu_ps(o + 3 * ld, h);
        }
        for (; c < c1; ++c)
          for (int64_t i = 0; i < 4; ++i) dst[c * ld + r + i] = s[i * s0 + c];
      }
    }
    r = rows4;
  }
#endif
  if (!transpose && s1 == 1) {
    for (; r < rows; ++r) std::copy(src + r * s0, src + r * s0 + cols, dst + r * ld);
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[transpose ? c * ld + r : r * ld + c] = src[r * s0 + c * s1];
}

// What make_params packs: the forward's U^T, b1, V^T, b2; a few rows' forward only b1 and b2 (u and v are read in
// place); the backward's U^T, b1, U, V.
enum class Packing { forward, few_rows, backward };

cpu::LowRankLinearParams make_params(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                     const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                     Packing packing, at::Tensor& packed, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [M, d_in] tensor");
  TORCH_CHECK(u.dim() == 2 && v.dim() == 2 && u.size(1) == x.size(1) && v.size(1) == u.size(0), op,
              ": u must be [r, d_in] and v [d_out, r]");
  TORCH_CHECK(u.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(), op,
              ": u and v must have x's dtype");
  TORCH_CHECK(act >= 0 && act <= 2, op, ": act must be 0 (none), 1 (relu) or 2 (gelu)");
  for (const auto& [name, b, n] : {std::tuple{"b1", &b1, u.size(0)}, std::tuple{"b2", &b2, v.size(0)}}) {
    TORCH_CHECK_VALUE(!*b || ((*b)->dim() == 1 && (*b)->size(0) == n && (*b)->scalar_type() == x.scalar_type()), op,
                      ": ", name, " must be a [", n, "] tensor in x's dtype, got ", (*b)->scalar_type(), " ",
                      (*b)->sizes());
  }
  cpu::LowRankLinearParams p{};
  p.M = x.size(0), p.d_in = x.size(1), p.r = u.size(0), p.d_out = v.size(0);
  p.rp = cpu::low_rank_linear_padded(p.r), p.dop = cpu::low_rank_linear_padded(p.d_out);
  p.dinp = cpu::low_rank_linear_padded(p.d_in);
  p.act = static_cast<cpu::LowRankAct>(act);
  p.dtype = cpu::dtype_of(x, op);
  const bool backward = packing == Packing::backward, few = packing == Packing::few_rows;
  const int64_t n_ut = few ? 0 : p.d_in * p.rp, n_second = backward ? p.r * p.dinp : few ? 0 : p.r * p.dop;
  const int64_t n_third = backward ? p.d_out * p.rp : p.dop;
  packed = at::empty({n_ut + p.rp + n_second + n_third}, x.options().dtype(at::kFloat));
  float* cursor = packed.data_ptr<float>();
  auto take = [&](int64_t n) { return std::exchange(cursor, cursor + n); };
  float *ut = take(n_ut), *bias1 = take(p.rp), *second = take(n_second), *third = take(n_third);
  if (!few) pack(u, true, p.d_in, p.rp, ut);
  b1 ? pack(*b1, false, 1, p.rp, bias1) : std::fill(bias1, bias1 + p.rp, 0.f);
  p.ut = ut, p.b1 = bias1;
  if (backward) {
    pack(u, false, p.r, p.dinp, second);
    pack(v, false, p.d_out, p.rp, third);
    p.up = second, p.vp = third;
  } else {
    if (!few) pack(v, true, p.r, p.dop, second);
    b2 ? pack(*b2, false, 1, p.dop, third) : std::fill(third, third + p.dop, 0.f);
    p.vt = second, p.b2 = third;
  }
  p.x = x.data_ptr(), p.u = u.data_ptr(), p.v = v.data_ptr();
  return p;
}

constexpr int64_t kStreamBytes = int64_t{1} << 20;  // outputs from 1 MiB on are written with streaming stores

// An output larger than a core's L2 leaves it anyway: skipping its read-for-ownership saves a third of the kernel's
// memory traffic. The next layer then reads it from memory rather than L3, and still gains: chained 400 -> r -> 400
// layers ran faster with a 1 MiB threshold than with 4 MiB (measured; README "Backends").
bool streamable(const at::Tensor& out, const cpu::LowRankLinearParams& p) {
  return out.numel() * static_cast<int64_t>(sizeof(float)) >= kStreamBytes && p.dtype == cpu::DType::f32 &&
         out.size(1) % 16 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0;
}

// Rows per chunk of the thread pool: whole row tiles for ~5 MFLOP (tens of microseconds of one core). A second
// thread costs about as much (waking it, moving the packed weights to its cache): measured, forwards of a few dozen
// rows ran slower on two threads than on one (README "Backends").
// `products`: the rank-r products a row runs (forward 2, backward 5). The pool splits the rows evenly, not whole tiles
// (a thread's last tile is shorter): 1024 rows as 22 + 21 tiles kept one thread busy half a tile longer.
int64_t grain(const cpu::LowRankLinearParams& p, int64_t products) {
  constexpr int64_t kChunkFlops = 5'000'000, kRows = cpu::kLowRankLinearRows;
  const int64_t tile_flops = std::max<int64_t>(1, kRows * p.r * (p.d_in + p.d_out) * products);
  return (kChunkFlops + tile_flops - 1) / tile_flops * kRows;
}

bool few_rows(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v) {
  const int64_t weight_bytes = (u.numel() + v.numel()) * u.element_size();
  const int64_t few = weight_bytes >= cpu::kLowRankLinearLargeBytes ? cpu::kLowRankLinearFewRowsLarge
                                                                    : cpu::kLowRankLinearFewRows;
  return x.dim() == 2 && x.size(0) <= few && u.is_contiguous() && v.is_contiguous();
}

// The few rows' forward: t = x U^T over chunks of U's rows, then y over chunks of V's rows, each chunk ~256 KB of
// weights (a layer of the CTR models' size runs on the calling thread alone).
void forward_few_rows(const cpu::LowRankLinearParams& p, const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat);  // x itself when fp32
  const int64_t elem = x.element_size();
  auto chunk_rows = [&](int64_t row_elems) { return std::max<int64_t>(1, (int64_t{256} << 10) / (row_elems * elem)); };
  std::vector<float> t(p.M * p.rp, 0.f);  // zero past r
  const auto hidden = cpu::pick_isa(&cpu::avx512::low_rank_linear_few_hidden, &cpu::avx2::low_rank_linear_few_hidden,
                                    &cpu::generic::low_rank_linear_few_hidden);
  cpu::parallel_chunks(p.r, chunk_rows(p.d_in), 0, [&](int64_t j0, int64_t j1, float*, int64_t) {
    hidden(p, xf.const_data_ptr<float>(), j0, j1, t.data());
  });
  const auto out = cpu::pick_isa(&cpu::avx512::low_rank_linear_few_out, &cpu::avx2::low_rank_linear_few_out,
                                 &cpu::generic::low_rank_linear_few_out);
  cpu::parallel_chunks(p.d_out, chunk_rows(p.r), p.M * (p.rp + p.dop), [&](int64_t o0, int64_t o1, float* scratch,
                                                                     int64_t) { out(p, t.data(), o0, o1, scratch); });
}

}  // namespace

at::Tensor low_rank_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1,
                                   const at::Tensor& v, const std::optional<at::Tensor>& b2, int64_t act,
                                   int64_t out_act) {
  TORCH_CHECK(out_act == 0 || out_act == 1, "low_rank_linear_fwd_cpu: out_act must be 0 (none) or 1 (relu)");
  at::Tensor packed;
  const bool few = few_rows(x, u, v);
  cpu::LowRankLinearParams p = make_params(x, u, b1, v, b2, act, few ? Packing::few_rows : Packing::forward, packed,
                                           "low_rank_linear_fwd_cpu");
  at::Tensor y = at::empty({p.M, p.d_out}, x.options());
  p.y = y.data_ptr();
  p.relu_y = out_act == 1;
  if (few) {
    forward_few_rows(p, x);
    return y;
  }
  p.stream = streamable(y, p);
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_linear_fwd_rows, &cpu::avx2::low_rank_linear_fwd_rows,
                                &cpu::generic::low_rank_linear_fwd_rows);
  cpu::parallel_chunks(p.M, grain(p, 2), cpu::low_rank_linear_fwd_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t) { fn(p, begin, end, scratch); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> low_rank_linear_bwd_cpu(
    const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& b1, const at::Tensor& v,
    const at::Tensor& g, const std::optional<at::Tensor>& y, int64_t act) {
  at::Tensor packed;
  cpu::LowRankLinearParams p = make_params(x, u, b1, v, std::nullopt, act, Packing::backward, packed,
                                           "low_rank_linear_bwd_cpu");
  for (const at::Tensor* t : {&g, y ? &*y : nullptr}) {
    TORCH_CHECK(!t || (t->dim() == 2 && t->is_contiguous() && t->size(0) == p.M && t->size(1) == p.d_out &&
                       t->scalar_type() == x.scalar_type()),
                "low_rank_linear_bwd_cpu: g and y must be contiguous [M, d_out] tensors in x's dtype");
  }
  p.g_mask = y ? y->data_ptr() : nullptr;
  const int64_t threads = at::get_num_threads();
  // the per-thread weight-gradient slices, one zeroed buffer: dU^T, dV, db1, db2 (see LowRankLinearParams)
  const int64_t n_dut = threads * p.d_in * p.rp, n_dv = threads * p.d_out * p.rp;
  at::Tensor acc = at::zeros({n_dut + n_dv + threads * (p.rp + p.dop)}, x.options().dtype(at::kFloat));
  p.dut = acc.data_ptr<float>(), p.dv = p.dut + n_dut, p.db1 = p.dv + n_dv, p.db2 = p.db1 + threads * p.rp;
  at::Tensor dx = at::empty({p.M, p.d_in}, x.options());
  p.g = g.data_ptr(), p.dx = dx.data_ptr();
  p.stream = streamable(dx, p);
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_linear_bwd_rows, &cpu::avx2::low_rank_linear_bwd_rows,
                                &cpu::generic::low_rank_linear_bwd_rows);
  cpu::parallel_chunks(p.M, grain(p, 5), cpu::low_rank_linear_bwd_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t thread) {
                         fn(p, begin, end, scratch, thread);
                       });
  at::Tensor du = at::empty({p.r, p.d_in}, x.options()), dv = at::empty({p.d_out, p.r}, x.options());
  at::Tensor db1 = at::empty({p.r}, x.options()), db2 = at::empty({p.d_out}, x.options());
  cpu::sum_threads(p.dut, threads, 1, p.d_in, p.rp, du, true);
  cpu::sum_threads(p.dv, threads, 1, p.d_out, p.rp, dv, false);
  cpu::sum_threads(p.db1, threads, 1, 1, p.rp, db1, false);
  cpu::sum_threads(p.db2, threads, 1, 1, p.dop, db2, false);
  return {dx, du, db1, dv, db2};
}

}  // namespace effkern
