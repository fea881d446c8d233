// Compressed embedding lookup + reconstruction, CPU host side: checks, packing U^T and mu (fp32, padded), the SIMD
// level, ATen's thread pool over batch rows and the sum of the per-thread gradients. The arithmetic lives in
// low_rank_embedding_kernel.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../ops.h"
#include "host.h"
#include "low_rank_embedding.h"

namespace effkern {
namespace {

struct Packed {
  at::Tensor ids, offsets, ut, mu;
  std::vector<int64_t> sizes;
  std::atomic<bool> bad_ids{false};
};

// Field f owns table rows [offsets[f], offsets[f + 1]) (the last field runs to the table's end): offsets must not
// decrease within [0, V]. Returns each field's size V_f.
std::vector<int64_t> field_sizes(const int64_t* offsets, int64_t F, int64_t V, const char* op) {
  std::vector<int64_t> sizes(F);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t end = f + 1 < F ? offsets[f + 1] : V;
    TORCH_CHECK_VALUE(offsets[f] >= 0 && offsets[f] <= end && end <= V, op, ": offsets must not decrease within [0, V=",
                      V, "], got offsets[", f, "] = ", offsets[f], " before ", end);
    sizes[f] = end - offsets[f];
  }
  return sizes;
}

// Raises for the first id outside its field's [0, V_f) that is not -1: called when a kernel flagged one.
void raise_bad_id(const cpu::LowRankEmbeddingParams& p, const char* op) {
  for (int64_t i = 0; i < p.B * p.F * p.L; ++i) {
    const int64_t id = p.ids[i], f = i / p.L % p.F;
    TORCH_CHECK_VALUE(id >= -1 && id < p.sizes[f], op, ": ids[", i / (p.F * p.L), ", ", f, ", ", i % p.L, "] = ", id,
                      " is outside field ", f, "'s ids [0, ", p.sizes[f], ") (-1 pads a bag)");
  }
  TORCH_CHECK(false, op, ": a kernel flagged an id that the host finds in range");
}

cpu::LowRankEmbeddingParams make_params(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& offsets,
                                        const at::Tensor& u, const at::Tensor& mu, bool mean, Packed& keep,
                                        const char* op) {
  TORCH_CHECK_VALUE(ids.dim() == 3 && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt), op,
                    ": ids must be an int64 or int32 [B, F, L] tensor, got ", ids.scalar_type(), " ", ids.sizes());
  const int64_t F = ids.size(1);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.is_contiguous(), op, ": table must be a contiguous [V, k] tensor");
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == F && u.size(2) == table.size(1), op, ": u must be [F=", F,
                    ", d, k=", table.size(1), "], got ", u.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2 && mu.size(0) == F && mu.size(1) == u.size(1), op, ": mu must be [F, d] = [", F,
                    ", ", u.size(1), "], got ", mu.sizes());
  TORCH_CHECK_VALUE(u.scalar_type() == table.scalar_type() && mu.scalar_type() == table.scalar_type(), op,
                    ": u and mu must have the table's dtype");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == F &&
                        (offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt),
                    op, ": offsets must be an int64 or int32 [F=", F, "] tensor, got ", offsets.scalar_type(), " ",
                    offsets.sizes());
  cpu::LowRankEmbeddingParams p{};
  p.B = ids.size(0), p.F = ids.size(1), p.L = ids.size(2), p.V = table.size(0), p.k = table.size(1);
  p.d = u.size(1), p.dp = (p.d + 15) / 16 * 16;
  p.mean = mean;
  p.dtype = cpu::dtype_of(table, op);
  keep.ids = ids.to(at::kLong).contiguous();
  keep.offsets = offsets.to(at::kLong).contiguous();
  const auto f32 = table.options().dtype(at::kFloat);
  keep.ut = at::zeros({p.F, p.k, p.dp}, f32);
  keep.ut.narrow(2, 0, p.d).copy_(u.transpose(1, 2));
  keep.mu = at::zeros({p.F, p.dp}, f32);
  keep.mu.narrow(1, 0, p.d).copy_(mu);
  p.ids = keep.ids.data_ptr<int64_t>(), p.offsets = keep.offsets.data_ptr<int64_t>();
  keep.sizes = field_sizes(p.offsets, p.F, p.V, op);
  p.sizes = keep.sizes.data(), p.bad_ids = &keep.bad_ids;
  p.ut = keep.ut.data_ptr<float>(), p.mu = keep.mu.data_ptr<float>();
  p.table = table.data_ptr();
  return p;
}

// Rows per parallel chunk: a few thousand (field, row) pairs.
int64_t grain(const cpu::LowRankEmbeddingParams& p) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(p.F, 1)); }

}  // namespace

at::Tensor low_rank_embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& table, const at::Tensor& offsets,
                                      const at::Tensor& u, const at::Tensor& mu, bool mean) {
  Packed keep;
  cpu::LowRankEmbeddingParams p = make_params(ids, table, offsets, u, mu, mean, keep, "low_rank_embedding_fwd_cpu");
  at::Tensor out = at::empty({p.B, p.F, p.d}, table.options());
  p.out = out.data_ptr();
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_embedding_fwd_rows, &cpu::avx2::low_rank_embedding_fwd_rows,
                                &cpu::generic::low_rank_embedding_fwd_rows);
  cpu::parallel_chunks(p.B, grain(p), cpu::low_rank_embedding_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t) { fn(p, begin, end, scratch); });
  if (keep.bad_ids.load()) raise_bad_id(p, "low_rank_embedding_fwd_cpu");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> low_rank_embedding_bwd_cpu(const at::Tensor& ids,
                                                                          const at::Tensor& table,
                                                                          const at::Tensor& offsets,
                                                                          const at::Tensor& u, const at::Tensor& mu,
                                                                          const at::Tensor& g, bool mean) {
  Packed keep;
  cpu::LowRankEmbeddingParams p = make_params(ids, table, offsets, u, mu, mean, keep, "low_rank_embedding_bwd_cpu");
  TORCH_CHECK(g.is_contiguous() && g.dim() == 3 && g.size(0) == p.B && g.size(1) == p.F && g.size(2) == p.d &&
                  g.scalar_type() == table.scalar_type(),
              "low_rank_embedding_bwd_cpu: g must be a contiguous [B, F, d] tensor in the table's dtype");
  const int64_t threads = at::get_num_threads();
  // the per-thread gradient slices, one zeroed buffer: dtable, dU^T, dmu (see LowRankEmbeddingParams)
  const int64_t n_dtable = threads * p.V * p.k, n_dut = threads * p.F * p.k * p.dp;
  at::Tensor acc = at::zeros({n_dtable + n_dut + threads * p.F * p.dp}, table.options().dtype(at::kFloat));
  p.dtable = acc.data_ptr<float>(), p.dut = p.dtable + n_dtable, p.dmu = p.dut + n_dut;
  p.g = g.data_ptr();
  const auto fn = cpu::pick_isa(&cpu::avx512::low_rank_embedding_bwd_rows, &cpu::avx2::low_rank_embedding_bwd_rows,
                                &cpu::generic::low_rank_embedding_bwd_rows);
  cpu::parallel_chunks(p.B, grain(p), cpu::low_rank_embedding_scratch(p),
                       [&](int64_t begin, int64_t end, float* scratch, int64_t thread) {
                         fn(p, begin, end, scratch, thread);
                       });
  if (keep.bad_ids.load()) raise_bad_id(p, "low_rank_embedding_bwd_cpu");
  at::Tensor dtable = at::empty({p.V, p.k}, table.options()), du = at::empty({p.F, p.d, p.k}, table.options());
  at::Tensor dmu = at::empty({p.F, p.d}, table.options());
  cpu::sum_threads(p.dtable, threads, 1, p.V, p.k, dtable, false);
  cpu::sum_threads(p.dut, threads, p.F, p.k, p.dp, du, true);
  cpu::sum_threads(p.dmu, threads, 1, p.F, p.dp, dmu, false);
  return {dtable, du, dmu};
}

}  // namespace effkern
