// Fused low-rank linear, compiled once per ISA (see simd.h for the inclusion protocol).
//
// A thread's rows of x run in tiles of kLrlRows rows (the last one shorter). Forward: t = x U^T + b1, bias and
// activation in registers, act(t) kept in L1 scratch (never in memory), then y = act(t) V^T + b2, relu'd in
// registers when asked. Every product is one register-tiled micro-kernel: per k, NV vector loads of a packed weight
// row, one broadcast per tile row, MR * NV FMAs into up to kLrlAcc accumulators; the tile's height MR = kLrlAcc / NV
// grows as its width shrinks (AVX-512: 6 x 4, 8 x 3, 12 x 2 vectors, every tile loop fully unrolled), up to 12 rows:
// a taller tile needs more row pointers than x86 has registers (24 x 1 reloaded half of them from the stack on every
// k and ran slower than 12 x 1, measured). An output larger than a core's L2 is written with streaming stores
// (no read-for-ownership; the host decides, `stream`); so is the backward's dx.
// Backward, per tile: stage g (zeroed where a relu'd y is <= 0: the out_act's backward in the same pass),
// recompute t (cheaper than writing it), da = g V, dt = da * act'(t), dx = dt U (written), and accumulate this
// thread's dV += g^T act(t), dU^T += x^T dt, db1, db2 with a tile of act(t) / dt held in registers while the
// weight-gradient rows stream through. Meanwhile the next tile's g, y and x are prefetched into L2, a line per k
// step of three products (staging g and y from L3 / memory was a visible part of a large backward; measured: the
// prefetch speeds up the batch-4096 backward, not the forward; README "Backends").
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

constexpr int kLrlRows = kLowRankLinearRows;
constexpr int kLrlAcc = Vec::W >= 16 ? 24 : 12;  // accumulator registers of a micro-tile (of 32 / 16)
constexpr int kLrlVecs = Vec::W >= 16 ? 4 : 2;   // the widest micro-tile, in vectors

template <int NV>
constexpr int lrl_rows() {
  constexpr int rows = kLrlAcc / NV < 12 ? kLrlAcc / NV : 12;
  static_assert(kLrlAcc % NV == 0 && kLrlRows % rows == 0, "micro-tiles must tile the row tile");
  return rows;
}

// Cache lines [next, end) to prefetch into L2, one per step of a product's k loop: the next tile's rows, spread over
// this tile's work (a burst of them at once stalls on full fill buffers).
struct LrlPrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  void step() {
    if (next < end) {
      __builtin_prefetch(next, 0, 2);
      next += 64;
    }
  }
};

// acc[i][j] = sum_k A[i lda + k] * B[k ldb + j W] for MR rows and NV vectors of columns.
template <int MR, int NV>
inline void lrl_gemm(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, Vec (&acc)[MR][NV],
                     LrlPrefetch& pf) {
  EFFKERN_UNROLL
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::zero();
  for (int64_t k = 0; k < K; ++k) {
    pf.step();
    Vec b[NV];
    for (int j = 0; j < NV; ++j) b[j] = Vec::load(B + k * ldb + j * Vec::W);
    EFFKERN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const Vec a = Vec::set1(A[i * lda + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = Vec::fma(a, b[j], acc[i][j]);
    }
  }
}

// For every column chunk of the padded width n (a multiple of 16) and every micro-tile of the first `rows` rows:
// acc = A[i0:i0+MR] . B[:, c0:c0+NV W] over K, then epi(i0, c0, acc).
template <typename Epi>
inline void lrl_product(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, int64_t n,
                        int64_t rows, Epi&& epi, LrlPrefetch pf = {}) {
  auto chunk = [&](int64_t c0, auto nv) {
    constexpr int NV = decltype(nv)::value, MR = lrl_rows<NV>();
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      Vec acc[MR][NV];
      lrl_gemm<MR, NV>(A + i0 * lda, lda, B + c0, ldb, K, acc, pf);
      epi(i0, c0, acc);
    }
  };
  constexpr int64_t widest = kLrlVecs * Vec::W;
  int64_t c0 = 0;
  for (; c0 + widest <= n; c0 += widest) chunk(c0, std::integral_constant<int, kLrlVecs>{});
  const int64_t nv = (n - c0) / Vec::W;  // the last, narrower chunk
  if constexpr (kLrlVecs == 4) {
    if (nv == 3) chunk(c0, std::integral_constant<int, 3>{});
    if (nv == 2) chunk(c0, std::integral_constant<int, 2>{});
  }
  if (nv == 1) chunk(c0, std::integral_constant<int, 1>{});
}

// Rows [r0, r0 + rows) of a [M][n] matrix as fp32 dst [kLrlRows][ld]; columns n..ld and rows past `rows` are 0.
// With a `mask` (a [M][n] matrix in the same dtype), the elements where it is <= 0 become 0 (torch's relu backward:
// a NaN keeps its gradient).
template <DType DT>
inline void lrl_stage(const void* src, int64_t r0, int64_t rows, int64_t n, int64_t ld, float* dst,
                      const void* mask = nullptr) {
  for (int i = 0; i < kLrlRows; ++i) {
    float* row = dst + i * ld;
    int64_t c = 0;
    if (i < rows) {
      const int64_t at = (r0 + i) * n;
      if (mask) {
        for (; c + Vec::W <= n; c += Vec::W)
          Vec::select_pos(load_vec<DT>(mask, at + c), load_vec<DT>(src, at + c), Vec::zero()).store(row + c);
        for (; c < n; ++c) row[c] = load_scalar<DT>(mask, at + c) <= 0.f ? 0.f : load_scalar<DT>(src, at + c);
      } else {
        for (; c + Vec::W <= n; c += Vec::W) load_vec<DT>(src, at + c).store(row + c);
        for (; c < n; ++c) row[c] = load_scalar<DT>(src, at + c);
      }
    }
    for (; c < ld; ++c) row[c] = 0.f;
  }
}

// x's rows [r0, r0 + kLrlRows) as fp32 rows of stride d_in: read in place when they are fp32 and all exist,
// else staged (converted, zero rows past the end).
template <DType DT>
inline const float* lrl_rows_of_x(const LowRankLinearParams& p, int64_t r0, int64_t rows, float* staging) {
  if (DT == DType::f32 && rows == kLrlRows) return static_cast<const float*>(p.x) + r0 * p.d_in;
  lrl_stage<DT>(p.x, r0, rows, p.d_in, p.d_in, staging);
  return staging;
}

// Stores acc (+ bias, then relu when asked) as rows [r0 + i0, ...) of dst [M][n], columns [c0, c0 + NV W) clipped
// to n; only rows below `rows` of the tile. `stream` (fp32, n a multiple of 16, dst 64-byte aligned: the host
// checks) writes a whole micro-tile with streaming stores.
template <DType DT, int MR, int NV>
inline void lrl_store(const Vec (&acc)[MR][NV], const float* bias, void* dst, int64_t r0, int64_t i0, int64_t rows,
                      int64_t c0, int64_t n, bool relu, bool stream) {
  Vec add[NV];
  for (int j = 0; j < NV; ++j) add[j] = bias ? Vec::load(bias + c0 + j * Vec::W) : Vec::zero();
  if (i0 + MR <= rows && c0 + NV * Vec::W <= n) {  // a whole micro-tile: no tails
    EFFKERN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (r0 + i0 + i) * n + c0;
      for (int j = 0; j < NV; ++j) {
        const Vec v = relu ? Vec::relu(acc[i][j] + add[j]) : acc[i][j] + add[j];
        if (DT == DType::f32 && stream) {
          v.stream(static_cast<float*>(dst) + at + j * Vec::W);
        } else {
          store_vec<DT>(dst, at + j * Vec::W, v);
        }
      }
    }
    return;
  }
  EFFKERN_UNROLL  // rolled, this loop's runtime index into acc would keep all of acc on the stack
  for (int i = 0; i < MR; ++i) {
    const int64_t at = (r0 + i0 + i) * n;
    for (int j = 0; j < NV; ++j) {
      const int64_t c = c0 + j * Vec::W;
      const Vec v = relu ? Vec::relu(acc[i][j] + add[j]) : acc[i][j] + add[j];
      if (i0 + i >= rows) {
        break;
      } else if (c + Vec::W <= n) {
        store_vec<DT>(dst, at + c, v);
      } else if (c < n) {
        float tail[Vec::W];
        v.store(tail);
        for (int64_t cc = c; cc < n; ++cc) store_scalar<DT>(dst, at + cc, tail[cc - c]);
      }
    }
  }
}

// 0.5 erfc(z) for z >= 0: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7 in erf).
inline Vec lrl_half_erfc(Vec z) {
  const Vec s = Vec::set1(1.f) / Vec::fma(Vec::set1(0.3275911f), z, Vec::set1(1.f));
  Vec poly = Vec::set1(1.061405429f);
  poly = Vec::fma(poly, s, Vec::set1(-1.453152027f));
  poly = Vec::fma(poly, s, Vec::set1(1.421413741f));
  poly = Vec::fma(poly, s, Vec::set1(-0.284496736f));
  poly = Vec::fma(poly, s, Vec::set1(0.254829592f));
  return poly * s * exp_nonpositive(Vec::zero() - z * z) * Vec::set1(0.5f);
}

// Phi(t), the standard normal CDF (exact GELU is t Phi(t), as torch's default F.gelu).
inline Vec lrl_phi_cdf(Vec t) {
  const Vec q = lrl_half_erfc(Vec::abs(t) * Vec::set1(0.70710678118654752f));  // Phi(-|t|)
  return Vec::select_pos(t, Vec::set1(1.f) - q, q);
}

inline Vec lrl_act(Vec t, LowRankAct act) {
  switch (act) {
    case LowRankAct::relu: return Vec::relu(t);
    case LowRankAct::gelu: return t * lrl_phi_cdf(t);
    default: return t;
  }
}

// d act / dt: relu 0 where t <= 0, else 1 (0 at 0 and 1 at NaN, as torch); gelu Phi(t) + t phi(t).
inline Vec lrl_act_grad(Vec t, LowRankAct act) {
  switch (act) {
    case LowRankAct::relu: return Vec::select_pos(t, Vec::set1(1.f), Vec::zero());
    case LowRankAct::gelu: {
      const Vec pdf = exp_nonpositive(Vec::zero() - t * t * Vec::set1(0.5f)) * Vec::set1(0.3989422804014327f);
      return Vec::fma(t, pdf, lrl_phi_cdf(t));
    }
    default: return Vec::set1(1.f);
  }
}

// A[i][c] = act(t) and, when T is given, T[i][c] = t = x U^T + b1 for the tile's rows X (stride d_in): its first
// `rows` rows rounded up to the micro-tile's height. Every later product of width rp has that height and reads no
// further; a wider product reads the rows after them as they are (zero, or finite values of an earlier tile) into
// outputs it never stores (a one-row tile computes 6-12 rows, not 24).
inline void lrl_hidden(const LowRankLinearParams& p, const float* X, int64_t rows, float* T, float* A,
                       LrlPrefetch pf = {}) {
  lrl_product(X, p.d_in, p.ut, p.rp, p.d_in, p.rp, rows, [&](int64_t i0, int64_t c0, auto& acc) {
    constexpr int MR = std::extent_v<std::remove_reference_t<decltype(acc)>, 0>;
    constexpr int NV = std::extent_v<std::remove_reference_t<decltype(acc)>, 1>;
    EFFKERN_UNROLL
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NV; ++j) {
        const int64_t c = (i0 + i) * p.rp + c0 + j * Vec::W;
        const Vec t = acc[i][j] + Vec::load(p.b1 + c0 + j * Vec::W);
        if (T) t.store(T + c);
        lrl_act(t, p.act).store(A + c);
      }
    }
  }, pf);
}

// The rows after the tile at r0 of a [M][n] matrix in dtype DT (up to kLrlRows, none past `end`), to prefetch.
template <DType DT>
inline LrlPrefetch lrl_next_rows(const void* m, int64_t r0, int64_t end, int64_t n) {
  if (!m || r0 + kLrlRows >= end) return {};
  const char* base = static_cast<const char*>(m);
  const int64_t row_bytes = n * elem_bytes(DT);
  return {base + (r0 + kLrlRows) * row_bytes, base + min64(r0 + 2 * kLrlRows, end) * row_bytes};
}

template <DType DT>
void lrl_fwd(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch) {
  float* staging = scratch;
  float* A = staging + kLrlRows * p.d_in;
  for (int64_t r0 = begin; r0 < end; r0 += kLrlRows) {
    const int64_t rows = min64(kLrlRows, end - r0);
    lrl_hidden(p, lrl_rows_of_x<DT>(p, r0, rows, staging), rows, nullptr, A);
    lrl_product(A, p.rp, p.vt, p.dop, p.r, p.dop, rows, [&](int64_t i0, int64_t o0, auto& acc) {
      lrl_store<DT>(acc, p.b2, p.y, r0, i0, rows, o0, p.d_out, p.relu_y, p.stream);
    });
  }
  if (p.stream) _mm_sfence();  // streamed stores are weakly ordered: complete them before y is read
}

// W[k][c0 + j W] += sum_i S[i ls + k] * R[i][j] for k < K: a rank-MR update of K rows of a weight gradient, with
// the tile R (MR x NV vectors) in registers.
template <int MR, int NV>
inline void lrl_accumulate(float* W, int64_t ldw, int64_t c0, const float* S, int64_t ls, int64_t K,
                           const Vec (&R)[MR][NV]) {
  for (int64_t k = 0; k < K; ++k) {
    float* w = W + k * ldw + c0;
    Vec acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = Vec::load(w + j * Vec::W);
    EFFKERN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const Vec s = Vec::set1(S[i * ls + k]);
      for (int j = 0; j < NV; ++j) acc[j] = Vec::fma(s, R[i][j], acc[j]);
    }
    for (int j = 0; j < NV; ++j) acc[j].store(w + j * Vec::W);
  }
}

// For every micro-tile (rows i0.., columns c0..) of M [kLrlRows][ld] (the first `rows` rows, padded width n):
// W[k][c0..] += sum_i S[(i0 + i) ls + k] M[i0 + i][c0..] for k < K.
inline void lrl_rank_update(float* W, int64_t ldw, const float* S, int64_t ls, int64_t K, const float* M,
                            int64_t ld, int64_t n, int64_t rows) {
  auto chunk = [&](int64_t c0, auto nv) {
    constexpr int NV = decltype(nv)::value, MR = lrl_rows<NV>();
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      Vec R[MR][NV];
      EFFKERN_UNROLL
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) R[i][j] = Vec::load(M + (i0 + i) * ld + c0 + j * Vec::W);
      lrl_accumulate<MR, NV>(W, ldw, c0, S + i0 * ls, ls, K, R);
    }
  };
  constexpr int64_t widest = kLrlVecs * Vec::W;
  int64_t c0 = 0;
  for (; c0 + widest <= n; c0 += widest) chunk(c0, std::integral_constant<int, kLrlVecs>{});
  const int64_t nv = (n - c0) / Vec::W;
  if constexpr (kLrlVecs == 4) {
    if (nv == 3) chunk(c0, std::integral_constant<int, 3>{});
    if (nv == 2) chunk(c0, std::integral_constant<int, 2>{});
  }
  if (nv == 1) chunk(c0, std::integral_constant<int, 1>{});
}

template <DType DT>
void lrl_bwd(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch, int64_t thread) {
  float* staging = scratch;
  float* G = staging + kLrlRows * p.d_in;
  float* T = G + kLrlRows * p.dop;
  float* A = T + kLrlRows * p.rp;
  float* D = A + kLrlRows * p.rp;  // dt
  float* dut = p.dut + thread * p.d_in * p.rp;
  float* dv = p.dv + thread * p.d_out * p.rp;
  float* db1 = p.db1 + thread * p.rp;
  float* db2 = p.db2 + thread * p.dop;
  for (int64_t r0 = begin; r0 < end; r0 += kLrlRows) {
    const int64_t rows = min64(kLrlRows, end - r0);
    const float* X = lrl_rows_of_x<DT>(p, r0, rows, staging);
    lrl_stage<DT>(p.g, r0, rows, p.d_out, p.dop, G, p.g_mask);  // rows past `rows` are 0: they add nothing
    lrl_hidden(p, X, rows, T, A, lrl_next_rows<DT>(p.g, r0, end, p.d_out));
    lrl_product(G, p.dop, p.vp, p.rp, p.d_out, p.rp, rows, [&](int64_t i0, int64_t c0, auto& acc) {
      constexpr int MR = std::extent_v<std::remove_reference_t<decltype(acc)>, 0>;
      constexpr int NV = std::extent_v<std::remove_reference_t<decltype(acc)>, 1>;
      EFFKERN_UNROLL
      for (int i = 0; i < MR; ++i) {  // dt = (g V) * act'(t)
        for (int j = 0; j < NV; ++j) {
          const int64_t c = (i0 + i) * p.rp + c0 + j * Vec::W;
          (acc[i][j] * lrl_act_grad(Vec::load(T + c), p.act)).store(D + c);
        }
      }
    }, lrl_next_rows<DT>(p.g_mask, r0, end, p.d_out));
    lrl_product(D, p.rp, p.up, p.dinp, p.r, p.dinp, rows, [&](int64_t i0, int64_t k0, auto& acc) {  // dx = dt U
      lrl_store<DT>(acc, nullptr, p.dx, r0, i0, rows, k0, p.d_in, false, p.stream);
    }, lrl_next_rows<DT>(p.x, r0, end, p.d_in));
    lrl_rank_update(dv, p.rp, G, p.dop, p.d_out, A, p.rp, p.rp, rows);   // dV += g^T act(t)
    lrl_rank_update(dut, p.rp, X, p.d_in, p.d_in, D, p.rp, p.rp, rows);  // dU^T += x^T dt
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < p.rp; c += Vec::W) (Vec::load(db1 + c) + Vec::load(D + i * p.rp + c)).store(db1 + c);
      for (int64_t c = 0; c < p.dop; c += Vec::W) (Vec::load(db2 + c) + Vec::load(G + i * p.dop + c)).store(db2 + c);
    }
  }
  if (p.stream) _mm_sfence();  // as in lrl_fwd: complete the streamed dx before it is read
}

// out[i][n] = A[i] . B[n] over K for MR rows of A (fp32, stride lda) and the rows [n0, n1) of B ([N][K] in DT,
// read in place), as dot products along K: eight rows of B at a time, their eight sums reduced together (sum8).
template <DType DT, int MR>
inline void lrl_dots(const float* A, int64_t lda, const void* B, int64_t K, int64_t n0, int64_t n1, float* out,
                     int64_t ldo) {
  auto rows_of_b = [&](int64_t n, auto nb) {
    constexpr int NB = decltype(nb)::value;
    Vec acc[MR][NB];
    EFFKERN_UNROLL
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = Vec::zero();
    int64_t k = 0;
    for (; k + Vec::W <= K; k += Vec::W) {
      Vec a[MR];
      for (int i = 0; i < MR; ++i) a[i] = Vec::load(A + i * lda + k);
      EFFKERN_UNROLL
      for (int j = 0; j < NB; ++j) {
        const Vec b = load_vec<DT>(B, (n + j) * K + k);
        for (int i = 0; i < MR; ++i) acc[i][j] = Vec::fma(a[i], b, acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      float sum[NB];
      if constexpr (NB == 8) {
        Vec::sum8(acc[i], sum);
      } else {
        sum[0] = acc[i][0].sum();
      }
      for (int j = 0; j < NB; ++j) {
        for (int64_t kk = k; kk < K; ++kk) sum[j] += A[i * lda + kk] * load_scalar<DT>(B, (n + j) * K + kk);
        out[i * ldo + n + j] = sum[j];
      }
    }
  };
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) rows_of_b(n, std::integral_constant<int, 8>{});
  for (; n < n1; ++n) rows_of_b(n, std::integral_constant<int, 1>{});
}

// lrl_dots for M rows of A, in groups as tall as the registers hold (AVX-512: 2 rows x 8 accumulators; else 1).
template <DType DT>
inline void lrl_dots_rows(const float* A, int64_t lda, int64_t M, const void* B, int64_t K, int64_t n0, int64_t n1,
                          float* out, int64_t ldo) {
  int64_t i = 0;
  if constexpr (Vec::W >= 16) {
    for (; i + 2 <= M; i += 2) lrl_dots<DT, 2>(A + i * lda, lda, B, K, n0, n1, out + i * ldo, ldo);
  }
  for (; i < M; ++i) lrl_dots<DT, 1>(A + i * lda, lda, B, K, n0, n1, out + i * ldo, ldo);
}

// The forward of a few rows (the host picks it: see low_rank_linear.h) in two steps, each over a range of outputs
// (the host splits them over threads), as dot products straight from u and v: no packed weights.
// Step 1: t[i][j] = x_i . u_j for j in [j0, j1) (t: [M][rp]; xf: x in fp32, from the host).
template <DType DT>
void lrl_few_hidden(const LowRankLinearParams& p, const float* xf, int64_t j0, int64_t j1, float* t) {
  lrl_dots_rows<DT>(xf, p.d_in, p.M, p.u, p.d_in, j0, j1, t, p.rp);
}

// Step 2: y[i][o] = out_act(act(t_i + b1) . v_o + b2[o]) for o in [o0, o1) (t zero past r; scratch [M][rp + dop]).
template <DType DT>
void lrl_few_out(const LowRankLinearParams& p, const float* t, int64_t o0, int64_t o1, float* scratch) {
  float* A = scratch;              // act(t + b1), zero past r (act(0) = 0 for every act)
  float* Y = A + p.M * p.rp;       // [M][dop]
  for (int64_t c = 0; c < p.M * p.rp; c += Vec::W) {
    lrl_act(Vec::load(t + c) + Vec::load(p.b1 + c % p.rp), p.act).store(A + c);
  }
  lrl_dots_rows<DT>(A, p.rp, p.M, p.v, p.r, o0, o1, Y, p.dop);
  for (int64_t i = 0; i < p.M; ++i) {
    for (int64_t o = o0; o < o1; ++o) {
      const float y = Y[i * p.dop + o] + p.b2[o];
      store_scalar<DT>(p.y, i * p.d_out + o, p.relu_y && y <= 0.f ? 0.f : y);
    }
  }
}

void low_rank_linear_few_hidden(const LowRankLinearParams& p, const float* xf, int64_t j0, int64_t j1, float* t) {
  with_dtype(p.dtype, [&](auto dt) { lrl_few_hidden<dt.value>(p, xf, j0, j1, t); });
}

void low_rank_linear_few_out(const LowRankLinearParams& p, const float* t, int64_t o0, int64_t o1, float* scratch) {
  with_dtype(p.dtype, [&](auto dt) { lrl_few_out<dt.value>(p, t, o0, o1, scratch); });
}

void low_rank_linear_fwd_rows(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch) {
  with_dtype(p.dtype, [&](auto dt) { lrl_fwd<dt.value>(p, begin, end, scratch); });
}

void low_rank_linear_bwd_rows(const LowRankLinearParams& p, int64_t begin, int64_t end, float* scratch,
                              int64_t thread) {
  with_dtype(p.dtype, [&](auto dt) { lrl_bwd<dt.value>(p, begin, end, scratch, thread); });
}

}  // namespace effkern::cpu::EFFKERN_ISA
