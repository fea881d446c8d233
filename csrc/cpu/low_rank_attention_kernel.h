// Low-rank attention core work items, compiled once per ISA (see simd.h for the inclusion protocol).
//
// One item = one (side network, image, head): N tokens attending to each other with a small head dim dh
// (r / H, often 4..32). Its q (pre-scaled), k and v are copied to fp32 scratch, keys and values TRANSPOSED
// ([dh][Np], zero columns past N), so every inner loop runs over keys in whole vectors: logits are dh
// broadcast-FMAs per key vector, P.V and dQ are dot products along the key axis, and the backward's dK / dV
// accumulate as axpys along it. Query rows go kLraRows at a time, sharing every key, value and gradient load.
// The whole item (~4 dh Np floats) stays in L1/L2; the N x N probabilities are never stored (the backward
// recomputes them from the saved log-sum-exp).
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

constexpr int kLraRows = kLowRankAttnRows;

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

// The largest of s[0:N) (padded keys excluded: their logits are 0, which may exceed every real one).
inline float lra_row_max(const float* s, int64_t N) {
  const int64_t nv = N / Vec::W * Vec::W;
  float m = s[0];
  if (nv > 0) {
    Vec mv = Vec::load(s);
    for (int64_t j = Vec::W; j < nv; j += Vec::W) mv = Vec::max(mv, Vec::load(s + j));
    m = mv.hmax();
  }
  for (int64_t j = nv; j < N; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[0:Np] <- exp(s - shift) over the N valid keys, zeros past them; returns their sum.
inline float lra_exp_row(float* s, float shift, int64_t N, int64_t Np) {
  const int64_t nv = N / Vec::W * Vec::W;
  const Vec sh = Vec::set1(shift);
  Vec acc = Vec::zero();
  for (int64_t jv = 0; jv < nv; jv += Vec::W) {
    const Vec e = exp_nonpositive(Vec::load(s + jv) - sh);
    e.store(s + jv);
    acc = acc + e;
  }
  float sum = acc.sum();
  if (nv < N) {  // the last, partly valid vector
    exp_nonpositive(Vec::load(s + nv) - sh).store(s + nv);
    for (int64_t j = nv; j < N; ++j) sum += s[j];
  }
  for (int64_t j = N; j < Np; ++j) s[j] = 0.f;
  return sum;
}

// out[rr * dh + c] = sum_j P[rr * Np + j] * Mt[c * Np + j] for RB rows of P and c < dh (rows times a transposed
// [dh][Np] matrix). 8 / RB columns at a time, so the RB x 8 / RB dot products share one 8-way reduction tree.
template <int RB>
inline void lra_rows_times_t(const float* P, const float* Mt, int64_t dh, int64_t Np, float* out) {
  static_assert(8 % RB == 0, "RB must divide 8");
  constexpr int CB = 8 / RB;
  int64_t c = 0;
  for (; c + CB <= dh; c += CB) {
    Vec acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = Vec::zero();
    for (int64_t jv = 0; jv < Np; jv += Vec::W) {
      Vec pv[RB];
      for (int rr = 0; rr < RB; ++rr) pv[rr] = Vec::load(P + rr * Np + jv);
      for (int cc = 0; cc < CB; ++cc) {
        const Vec m = Vec::load(Mt + (c + cc) * Np + jv);
        for (int rr = 0; rr < RB; ++rr) acc[rr * CB + cc] = Vec::fma(pv[rr], m, acc[rr * CB + cc]);
      }
    }
    float red[8];
    Vec::sum8(acc, red);
    for (int rr = 0; rr < RB; ++rr)
      for (int cc = 0; cc < CB; ++cc) out[rr * dh + c + cc] = red[rr * CB + cc];
  }
  for (; c < dh; ++c) {
    for (int rr = 0; rr < RB; ++rr) {
      Vec a = Vec::zero();
      for (int64_t jv = 0; jv < Np; jv += Vec::W) a = Vec::fma(Vec::load(P + rr * Np + jv), Vec::load(Mt + c * Np + jv), a);
      out[rr * dh + c] = a.sum();
    }
  }
}

// Yt[c][0:Np] += sum_rr A[rr * lda + c] * P[rr][0:Np] for c < dh: the RB rows' contribution to a transposed
// gradient (dV += P^T dO, dK += dS^T Q), each Yt vector loaded and stored once for all RB rows.
template <int RB>
inline void lra_rows_axpy_t(float* Yt, const float* A, int64_t lda, const float* P, int64_t dh, int64_t Np) {
  for (int64_t jv = 0; jv < Np; jv += Vec::W) {
    Vec pv[RB];
    for (int rr = 0; rr < RB; ++rr) pv[rr] = Vec::load(P + rr * Np + jv);
    for (int64_t c = 0; c < dh; ++c) {
      Vec y = Vec::load(Yt + c * Np + jv);
      for (int rr = 0; rr < RB; ++rr) y = Vec::fma(Vec::set1(A[rr * lda + c]), pv[rr], y);
      y.store(Yt + c * Np + jv);
    }
  }
}

// RB query rows [i0, i0 + RB) of one item: softmax(Q K^T) V -> out, and each row's log-sum-exp.
template <DType DT, int RB>
inline void lra_fwd_rows(const LowRankAttnParams& p, int64_t kb, int64_t h, int64_t i0, const float* Q,
                         const float* Kt, const float* Vt, float* S, float* o) {
  const int64_t N = p.N, dh = p.dh, r = p.H * dh, Np = low_rank_attn_padded(N);
  lra_scores<RB>(Q, Kt, i0, dh, Np, S);
  float inv[RB];
  for (int rr = 0; rr < RB; ++rr) {
    float* s = S + rr * Np;
    const float m = lra_row_max(s, N);
    const float l = lra_exp_row(s, m, N, Np);
    inv[rr] = 1.f / l;
    p.lse[(kb * p.H + h) * N + i0 + rr] = m + std::log(l);
  }
  lra_rows_times_t<RB>(S, Vt, dh, Np, o);
  for (int rr = 0; rr < RB; ++rr) {
    const int64_t at = (kb * N + i0 + rr) * r + h * dh;
    for (int64_t c = 0; c < dh; ++c) store_scalar<DT>(const_cast<void*>(p.out), at + c, o[rr * dh + c] * inv[rr]);
  }
}

template <DType DT>
void lra_fwd(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t N = p.N, dh = p.dh, Np = low_rank_attn_padded(N);
  float *Q, *Kt, *Vt;
  float* S = lra_item_buffers(scratch, N, dh, Np, Q, Kt, Vt);  // kLraRows rows of logits / probabilities
  float* o = S + kLraRows * Np;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % p.H, kb = item / p.H, b = kb % p.B, k = kb / p.B;
    lra_load_item<DT>(p, k, b, h, Q, Kt, Vt);
    int64_t i0 = 0;
    for (; i0 + kLraRows <= N; i0 += kLraRows) lra_fwd_rows<DT, kLraRows>(p, kb, h, i0, Q, Kt, Vt, S, o);
    for (; i0 < N; ++i0) lra_fwd_rows<DT, 1>(p, kb, h, i0, Q, Kt, Vt, S, o);
  }
}

// RB query rows of one item's backward, P recomputed from the saved log-sum-exp: dP = dO V^T,
// dS = P * (dP - rowsum(dO * O)), dQ = scale dS K (written), and dV += P^T dO, dK += dS^T Q (accumulated in
// dVt / dKt; Q is pre-scaled, so dK needs no further scale).
template <DType DT, int RB>
inline void lra_bwd_rows(const LowRankAttnParams& p, int64_t kb, int64_t h, int64_t i0, const float* Q,
                         const float* Kt, const float* Vt, float* dKt, float* dVt, float* S, float* dO, float* dq) {
  const int64_t N = p.N, dh = p.dh, r = p.H * dh, Np = low_rank_attn_padded(N);
  float delta[RB];
  for (int rr = 0; rr < RB; ++rr) {
    const int64_t at = (kb * N + i0 + rr) * r + h * dh;
    delta[rr] = 0.f;
    for (int64_t c = 0; c < dh; ++c) {
      dO[rr * dh + c] = load_scalar<DT>(p.dout, at + c);
      delta[rr] += dO[rr * dh + c] * load_scalar<DT>(p.out, at + c);
    }
  }
  lra_scores<RB>(Q, Kt, i0, dh, Np, S);
  for (int rr = 0; rr < RB; ++rr) lra_exp_row(S + rr * Np, p.lse[(kb * p.H + h) * N + i0 + rr], N, Np);
  lra_rows_axpy_t<RB>(dVt, dO, dh, S, dh, Np);
  for (int64_t jv = 0; jv < Np; jv += Vec::W) {  // S <- dS
    Vec dp[RB];
    for (int rr = 0; rr < RB; ++rr) dp[rr] = Vec::zero();
    for (int64_t c = 0; c < dh; ++c) {
      const Vec v = Vec::load(Vt + c * Np + jv);
      for (int rr = 0; rr < RB; ++rr) dp[rr] = Vec::fma(Vec::set1(dO[rr * dh + c]), v, dp[rr]);
    }
    for (int rr = 0; rr < RB; ++rr) {
      float* s = S + rr * Np + jv;
      (Vec::load(s) * (dp[rr] - Vec::set1(delta[rr]))).store(s);
    }
  }
  lra_rows_axpy_t<RB>(dKt, Q + i0 * dh, dh, S, dh, Np);
  lra_rows_times_t<RB>(S, Kt, dh, Np, dq);
  for (int rr = 0; rr < RB; ++rr) {
    const int64_t at = (kb * N + i0 + rr) * 3 * r + h * dh;
    for (int64_t c = 0; c < dh; ++c) store_scalar<DT>(p.dqkv, at + c, dq[rr * dh + c] * p.scale);
  }
}

template <DType DT>
void lra_bwd(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t N = p.N, dh = p.dh, r = p.H * dh, Np = low_rank_attn_padded(N);
  float *Q, *Kt, *Vt;
  float* dKt = lra_item_buffers(scratch, N, dh, Np, Q, Kt, Vt);
  float* dVt = dKt + dh * Np;
  float* S = dVt + dh * Np;
  float* dO = S + kLraRows * Np;
  float* dq = dO + kLraRows * dh;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % p.H, kb = item / p.H, b = kb % p.B, k = kb / p.B;
    lra_load_item<DT>(p, k, b, h, Q, Kt, Vt);
    for (int64_t i = 0; i < 2 * dh * Np; ++i) dKt[i] = 0.f;  // dKt and dVt are adjacent
    int64_t i0 = 0;
    for (; i0 + kLraRows <= N; i0 += kLraRows) lra_bwd_rows<DT, kLraRows>(p, kb, h, i0, Q, Kt, Vt, dKt, dVt, S, dO, dq);
    for (; i0 < N; ++i0) lra_bwd_rows<DT, 1>(p, kb, h, i0, Q, Kt, Vt, dKt, dVt, S, dO, dq);
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
  with_dtype(p.dtype, [&](auto dt) { lra_fwd<dt.value>(p, begin, end, scratch); });
}

void low_rank_attn_bwd_items(const LowRankAttnParams& p, int64_t begin, int64_t end, float* scratch) {
  with_dtype(p.dtype, [&](auto dt) { lra_bwd<dt.value>(p, begin, end, scratch); });
}

}  // namespace effkern::cpu::EFFKERN_ISA
