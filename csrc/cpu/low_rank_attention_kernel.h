// Low-rank attention core work items, compiled once per ISA (see simd.h for the inclusion protocol).
//
// One item = one (side network, image, head): N tokens attending to each other with a small head dim dh
// (r / H, often 4..32). Its q (pre-scaled), k and v are copied to fp32 scratch, keys and values TRANSPOSED
// ([dh][Np], zero columns past N), so every inner loop runs over keys in whole vectors: logits are dh
// broadcast-FMAs per key vector, P.V and dQ are dot products along the key axis, and the backward's dK / dV
// accumulate as axpys along it. The whole item (~4 dh Np floats) stays in L1/L2; the N x N probabilities are
// never stored (the backward recomputes them from the saved log-sum-exp).
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

// Query rows per pass over the keys in the forward: RB accumulators plus a key vector and a broadcast.
constexpr int kLraRows = 4;

template <DType DT>
void lra_load_item(const LowRankAttnParams& p, int64_t k, int64_t b, int64_t h, float* Q, float* Kt, float* Vt) {
  const int64_t N = p.N, dh = p.dh, r = p.H * p.dh, Np = low_rank_attn_padded(N);
  const int64_t base = k * p.s_k + b * p.s_b + h * dh;
  for (int64_t j = 0; j < N; ++j) {
    const int64_t row = base + j * p.s_n;
    for (int64_t c = 0; c < dh; ++c) {
      Q[j * dh + c] = load_scalar<DT>(p.qkv, row + c) * p.scale;
      Kt[c * Np + j] = load_scalar<DT>(p.qkv, row + r + c);
      Vt[c * Np + j] = load_scalar<DT>(p.qkv, row + 2 * r + c);
    }
  }
  for (int64_t c = 0; c < dh; ++c)
    for (int64_t j = N; j < Np; ++j) Kt[c * Np + j] = Vt[c * Np + j] = 0.f;
}

// The start of an item's scratch: Q [N][dh], Kt [dh][Np], Vt [dh][Np]; returns the first float after them.
inline float* lra_item_buffers(float* scratch, int64_t N, int64_t dh, int64_t Np, float*& Q, float*& Kt,
                               float*& Vt) {
  Q = scratch;
  Kt = Q + N * dh;
  Vt = Kt + dh * Np;
  return Vt + dh * Np;
}

// s[rr * Np + j] = Q[i0 + rr] . K[j] for RB query rows and every (padded) key.
template <int RB>
inline void lra_scores(const float* Q, const float* Kt, int64_t i0, int64_t dh, int64_t Np, float* s) {
  for (int64_t jv = 0; jv < Np; jv += Vec::W) {
    Vec acc[RB];
    for (int rr = 0; rr < RB; ++rr) acc[rr] = Vec::zero();
    for (int64_t c = 0; c < dh; ++c) {
      const Vec kt = Vec::load(Kt + c * Np + jv);
      for (int rr = 0; rr < RB; ++rr) acc[rr] = Vec::fma(Vec::set1(Q[(i0 + rr) * dh + c]), kt, acc[rr]);
    }
    for (int rr = 0; rr < RB; ++rr) acc[rr].store(s + rr * Np + jv);
  }
}

// s[0:Np] <- exp(s - shift) over the N valid keys, zeros past them; returns their sum.
inline float lra_exp_row(float* s, float shift, int64_t N, int64_t Np) {
  Vec sum = Vec::zero();
  for (int64_t jv = 0; jv < Np; jv += Vec::W) exp_nonpositive(Vec::load(s + jv) - Vec::set1(shift)).store(s + jv);
  for (int64_t j = N; j < Np; ++j) s[j] = 0.f;  // padded keys (their logits are 0, not -inf)
  for (int64_t jv = 0; jv < Np; jv += Vec::W) sum = sum + Vec::load(s + jv);
  return sum.sum();
}

// out[c] = sum_j w[j] * Mt[c * Np + j] for c < dh (a row times a transposed [dh][Np] matrix).
inline void lra_row_times_t(const float* w, const float* Mt, int64_t dh, int64_t Np, float* out) {
  int64_t c = 0;
  for (; c + 4 <= dh; c += 4) {
    Vec a[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
    for (int64_t jv = 0; jv < Np; jv += Vec::W) {
      const Vec wv = Vec::load(w + jv);
      for (int u = 0; u < 4; ++u) a[u] = Vec::fma(wv, Vec::load(Mt + (c + u) * Np + jv), a[u]);
    }
    for (int u = 0; u < 4; ++u) out[c + u] = a[u].sum();
  }
  for (; c < dh; ++c) {
    Vec a = Vec::zero();
    for (int64_t jv = 0; jv < Np; jv += Vec::W) a = Vec::fma(Vec::load(w + jv), Vec::load(Mt + c * Np + jv), a);
    out[c] = a.sum();
  }
}

// y[0:Np] += a * x[0:Np]
inline void lra_axpy(float* y, float a, const float* x, int64_t Np) {
  const Vec av = Vec::set1(a);
  for (int64_t jv = 0; jv < Np; jv += Vec::W) Vec::fma(av, Vec::load(x + jv), Vec::load(y + jv)).store(y + jv);
}

template <DType DT>
void lra_fwd(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t N = p.N, dh = p.dh, r = p.H * dh, Np = low_rank_attn_padded(N);
  float *Q, *Kt, *Vt;
  float* S = lra_item_buffers(scratch, N, dh, Np, Q, Kt, Vt);  // kLraRows rows of logits / probabilities
  float* o = S + kLraRows * Np;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % p.H, kb = item / p.H, b = kb % p.B, k = kb / p.B;
    lra_load_item<DT>(p, k, b, h, Q, Kt, Vt);
    for (int64_t i0 = 0; i0 < N; i0 += kLraRows) {
      const int64_t nr = min64(kLraRows, N - i0);
      if (nr == kLraRows) {
        lra_scores<kLraRows>(Q, Kt, i0, dh, Np, S);
      } else {
        for (int64_t rr = 0; rr < nr; ++rr) lra_scores<1>(Q, Kt, i0 + rr, dh, Np, S + rr * Np);
      }
      for (int64_t rr = 0; rr < nr; ++rr) {
        float* s = S + rr * Np;
        float m = s[0];
        for (int64_t j = 1; j < N; ++j) m = s[j] > m ? s[j] : m;
        const float l = lra_exp_row(s, m, N, Np);
        lra_row_times_t(s, Vt, dh, Np, o);
        const int64_t row = kb * N + i0 + rr;
        const float inv = 1.f / l;
        for (int64_t c = 0; c < dh; ++c) store_scalar<DT>(const_cast<void*>(p.out), row * r + h * dh + c, o[c] * inv);
        p.lse[(kb * p.H + h) * N + i0 + rr] = m + std::log(l);
      }
    }
  }
}

// dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, one query row
// at a time with P recomputed from the saved log-sum-exp.
template <DType DT>
void lra_bwd(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t N = p.N, dh = p.dh, r = p.H * dh, Np = low_rank_attn_padded(N);
  float *Q, *Kt, *Vt;
  float* dKt = lra_item_buffers(scratch, N, dh, Np, Q, Kt, Vt);
  float* dVt = dKt + dh * Np;
  float* s = dVt + dh * Np;
  float* dO = s + Np;
  float* dq = dO + dh;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % p.H, kb = item / p.H, b = kb % p.B, k = kb / p.B;
    lra_load_item<DT>(p, k, b, h, Q, Kt, Vt);
    for (int64_t i = 0; i < 2 * dh * Np; ++i) dKt[i] = 0.f;  // dKt and dVt are adjacent
    for (int64_t i = 0; i < N; ++i) {
      const int64_t row = kb * N + i;
      float delta = 0.f;
      for (int64_t c = 0; c < dh; ++c) {
        dO[c] = load_scalar<DT>(p.dout, row * r + h * dh + c);
        delta += dO[c] * load_scalar<DT>(p.out, row * r + h * dh + c);
      }
      lra_scores<1>(Q, Kt, i, dh, Np, s);
      lra_exp_row(s, p.lse[(kb * p.H + h) * N + i], N, Np);  // s = P[i, :]
      for (int64_t c = 0; c < dh; ++c) lra_axpy(dVt + c * Np, dO[c], s, Np);
      for (int64_t jv = 0; jv < Np; jv += Vec::W) {  // s <- dS[i, :]
        Vec dp = Vec::zero();
        for (int64_t c = 0; c < dh; ++c) dp = Vec::fma(Vec::set1(dO[c]), Vec::load(Vt + c * Np + jv), dp);
        (Vec::load(s + jv) * (dp - Vec::set1(delta))).store(s + jv);
      }
      for (int64_t c = 0; c < dh; ++c) lra_axpy(dKt + c * Np, Q[i * dh + c], s, Np);
      lra_row_times_t(s, Kt, dh, Np, dq);
      for (int64_t c = 0; c < dh; ++c) store_scalar<DT>(p.dqkv, row * 3 * r + h * dh + c, dq[c] * p.scale);
    }
    for (int64_t j = 0; j < N; ++j) {
      const int64_t at = (kb * N + j) * 3 * r + h * dh;
      for (int64_t c = 0; c < dh; ++c) {
        store_scalar<DT>(p.dqkv, at + r + c, dKt[c * Np + j]);
        store_scalar<DT>(p.dqkv, at + 2 * r + c, dVt[c * Np + j]);
      }
    }
  }
}

void low_rank_attn_fwd_items(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  switch (p.dtype) {
    case DType::f32: lra_fwd<DType::f32>(p, begin, end, scratch); break;
    case DType::f16: lra_fwd<DType::f16>(p, begin, end, scratch); break;
    case DType::bf16: lra_fwd<DType::bf16>(p, begin, end, scratch); break;
  }
}

void low_rank_attn_bwd_items(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  switch (p.dtype) {
    case DType::f32: lra_bwd<DType::f32>(p, begin, end, scratch); break;
    case DType::f16: lra_bwd<DType::f16>(p, begin, end, scratch); break;
    case DType::bf16: lra_bwd<DType::bf16>(p, begin, end, scratch); break;
  }
}

}  // namespace effkern::cpu::EFFKERN_ISA
