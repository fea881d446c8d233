// Residual add + LayerNorm rows, compiled once per ISA (see simd.h for the inclusion protocol).
//
// Memory-bound: each row (d values, a few KB) is read once from memory and kept in L1 for its second pass.
// Forward: h = u + z (stored; h - h[0] in fp32 scratch), the mean and two-pass variance of h - h[0] (no
// cancellation), x.
// Backward: du = dh + rstd * (dx - mean(dx) - x * mean(dx * x)), with x the saved normalised row.
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

template <DType DT>
void rln_fwd(const ResidualLayerNormParams& p, int64_t begin, int64_t end, float* hrow) {
  const int64_t d = p.d, W = Vec::W, dv = d / W * W;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = r * d, zat = (r % p.z_rows) * d;
    // Statistics of h - h[0]: a constant row is exactly 0 (as F.layer_norm gives), and a large mean cancels in the
    // shift, not in fp32 sums of the mean's size.
    const float shift = load_scalar<DT>(p.u, at) + load_scalar<DT>(p.z, zat);
    const Vec sv = Vec::set1(shift);
    Vec acc = Vec::zero();
    for (int64_t c = 0; c < dv; c += W) {
      const Vec h = load_vec<DT>(p.u, at + c) + load_vec<DT>(p.z, zat + c);
      store_vec<DT>(p.h, at + c, h);
      const Vec e = h - sv;
      e.store(hrow + c);
      acc = acc + e;
    }
    float sum = acc.sum();
    for (int64_t c = dv; c < d; ++c) {
      const float h = load_scalar<DT>(p.u, at + c) + load_scalar<DT>(p.z, zat + c);
      store_scalar<DT>(p.h, at + c, h);
      hrow[c] = h - shift;
      sum += hrow[c];
    }
    const float mean = sum / static_cast<float>(d);  // of h - shift
    const Vec mv = Vec::set1(mean);
    acc = Vec::zero();
    for (int64_t c = 0; c < dv; c += W) {
      const Vec e = Vec::load(hrow + c) - mv;
      acc = Vec::fma(e, e, acc);
    }
    float sq = acc.sum();
    for (int64_t c = dv; c < d; ++c) sq += (hrow[c] - mean) * (hrow[c] - mean);
    const float rstd = 1.f / std::sqrt(sq / static_cast<float>(d) + p.eps);
    const Vec rv = Vec::set1(rstd);
    for (int64_t c = 0; c < dv; c += W) store_vec<DT>(p.x, at + c, (Vec::load(hrow + c) - mv) * rv);
    for (int64_t c = dv; c < d; ++c) store_scalar<DT>(p.x, at + c, (hrow[c] - mean) * rstd);
    p.rstd[r] = rstd;
  }
}

template <DType DT>
void rln_bwd(const ResidualLayerNormParams& p, int64_t begin, int64_t end, float*) {
  const int64_t d = p.d, W = Vec::W, dv = d / W * W;
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = r * d;
    Vec a = Vec::zero(), b = Vec::zero();
    for (int64_t c = 0; c < dv; c += W) {
      const Vec g = load_vec<DT>(p.dx, at + c);
      a = a + g;
      b = Vec::fma(g, load_vec<DT>(p.x, at + c), b);
    }
    float sa = a.sum(), sb = b.sum();
    for (int64_t c = dv; c < d; ++c) {
      const float g = load_scalar<DT>(p.dx, at + c);
      sa += g;
      sb += g * load_scalar<DT>(p.x, at + c);
    }
    const float rstd = p.rstd[r], mean_g = sa * inv_d, mean_gx = sb * inv_d;
    const Vec rv = Vec::set1(rstd), av = Vec::set1(mean_g), bv = Vec::set1(mean_gx);
    for (int64_t c = 0; c < dv; c += W) {
      const Vec dn = load_vec<DT>(p.dx, at + c) - av - load_vec<DT>(p.x, at + c) * bv;
      store_vec<DT>(p.du, at + c, Vec::fma(rv, dn, load_vec<DT>(p.dh, at + c)));
    }
    for (int64_t c = dv; c < d; ++c) {
      const float dn = load_scalar<DT>(p.dx, at + c) - mean_g - load_scalar<DT>(p.x, at + c) * mean_gx;
      store_scalar<DT>(p.du, at + c, load_scalar<DT>(p.dh, at + c) + rstd * dn);
    }
  }
}

void residual_layer_norm_fwd_rows(const ResidualLayerNormParams& p, int64_t begin, int64_t end, float* s) {
  with_dtype(p.dtype, [&](auto dt) { rln_fwd<dt.value>(p, begin, end, s); });
}

void residual_layer_norm_bwd_rows(const ResidualLayerNormParams& p, int64_t begin, int64_t end, float* s) {
  with_dtype(p.dtype, [&](auto dt) { rln_bwd<dt.value>(p, begin, end, s); });
}

}  // namespace effkern::cpu::EFFKERN_ISA
