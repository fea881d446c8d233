// Compressed embedding lookup + reconstruction, compiled once per ISA (see simd.h for the inclusion protocol).
//
// Per (row, field): gather-sum the bag's k-wide compressed rows in fp32, then the d outputs as k broadcast-FMAs
// over U_f^T rows (vectors along d) plus the scaled mean: one pass, the d-wide embedding is written once.
// Backward: dmu += c g, dU^T += e g^T, de = U_f^T g, and de (divided by the bag size for the mean) scattered to
// each id's table row: all into this thread's accumulators.
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

// Whether `id` of field f names a table row: -1 pads a bag; any other id outside [0, V_f) is skipped and flagged
// for the host, which then raises (the check costs a compare here instead of a pass of its own over the ids).
inline bool lre_real_id(const LowRankEmbeddingParams& p, int64_t f, int64_t id) {
  if (id >= 0 && id < p.sizes[f]) return true;
  if (id != -1) p.bad_ids->store(true, std::memory_order_relaxed);
  return false;
}

// e[0:k] = sum of the bag's rows (fp32); returns the number of ids in the bag.
template <DType DT>
inline int64_t lre_bag(const LowRankEmbeddingParams& p, int64_t b, int64_t f, float* e) {
  for (int64_t c = 0; c < p.k; ++c) e[c] = 0.f;
  int64_t n = 0;
  const int64_t* ids = p.ids + (b * p.F + f) * p.L;
  for (int64_t j = 0; j < p.L; ++j) {
    if (!lre_real_id(p, f, ids[j])) continue;
    const int64_t row = (p.offsets[f] + ids[j]) * p.k;
    for (int64_t c = 0; c < p.k; ++c) e[c] += load_scalar<DT>(p.table, row + c);
    ++n;
  }
  return n;
}

// The bag's scale of mu (c) and of its summed rows (1 or 1 / n).
inline void lre_scales(const LowRankEmbeddingParams& p, int64_t n, float& c, float& s) {
  c = p.mean ? (n > 0 ? 1.f : 0.f) : static_cast<float>(n);
  s = p.mean && n > 0 ? 1.f / static_cast<float>(n) : 1.f;
}

template <DType DT>
void lre_fwd(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch) {
  float* e = scratch;
  float* row = e + p.k;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t f = 0; f < p.F; ++f) {
      float c, s;
      lre_scales(p, lre_bag<DT>(p, b, f, e), c, s);
      const float* ut = p.ut + f * p.k * p.dp;
      const float* mu = p.mu + f * p.dp;
      for (int64_t o = 0; o < p.dp; o += Vec::W) {
        Vec acc = Vec::set1(c) * Vec::load(mu + o);
        for (int64_t kk = 0; kk < p.k; ++kk) acc = Vec::fma(Vec::set1(e[kk] * s), Vec::load(ut + kk * p.dp + o), acc);
        acc.store(row + o);
      }
      const int64_t at = (b * p.F + f) * p.d;
      int64_t o = 0;
      for (; o + Vec::W <= p.d; o += Vec::W) store_vec<DT>(p.out, at + o, Vec::load(row + o));
      for (; o < p.d; ++o) store_scalar<DT>(p.out, at + o, row[o]);
    }
  }
}

template <DType DT>
void lre_bwd(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch, int64_t thread) {
  float* e = scratch;
  float* grow = e + p.k;
  float* de = grow + p.dp;
  float* dtable = p.dtable + thread * p.V * p.k;
  float* dut = p.dut + thread * p.F * p.k * p.dp;
  float* dmu = p.dmu + thread * p.F * p.dp;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t f = 0; f < p.F; ++f) {
      const int64_t n = lre_bag<DT>(p, b, f, e);
      if (n == 0) continue;  // an empty bag's output is 0 whatever the parameters
      float c, s;
      lre_scales(p, n, c, s);
      const int64_t at = (b * p.F + f) * p.d;
      for (int64_t o = 0; o < p.dp; ++o) grow[o] = o < p.d ? load_scalar<DT>(p.g, at + o) : 0.f;
      const float* ut = p.ut + f * p.k * p.dp;
      float* dutf = dut + f * p.k * p.dp;
      float* dmuf = dmu + f * p.dp;
      for (int64_t o = 0; o < p.dp; o += Vec::W) {
        Vec::fma(Vec::set1(c), Vec::load(grow + o), Vec::load(dmuf + o)).store(dmuf + o);
      }
      for (int64_t kk = 0; kk < p.k; ++kk) {
        const Vec ek = Vec::set1(e[kk] * s);
        Vec dot = Vec::zero();
        for (int64_t o = 0; o < p.dp; o += Vec::W) {
          const Vec gv = Vec::load(grow + o);
          float* w = dutf + kk * p.dp + o;
          Vec::fma(ek, gv, Vec::load(w)).store(w);
          dot = Vec::fma(Vec::load(ut + kk * p.dp + o), gv, dot);
        }
        de[kk] = dot.sum() * s;
      }
      const int64_t* ids = p.ids + (b * p.F + f) * p.L;
      for (int64_t j = 0; j < p.L; ++j) {
        if (!lre_real_id(p, f, ids[j])) continue;
        float* dst = dtable + (p.offsets[f] + ids[j]) * p.k;
        for (int64_t kk = 0; kk < p.k; ++kk) dst[kk] += de[kk];
      }
    }
  }
}

void low_rank_embedding_fwd_rows(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch) {
  with_dtype(p.dtype, [&](auto dt) { lre_fwd<dt.value>(p, begin, end, scratch); });
}

void low_rank_embedding_bwd_rows(const LowRankEmbeddingParams& p, int64_t begin, int64_t end, float* scratch,
                                 int64_t thread) {
  with_dtype(p.dtype, [&](auto dt) { lre_bwd<dt.value>(p, begin, end, scratch, thread); });
}

}  // namespace effkern::cpu::EFFKERN_ISA
