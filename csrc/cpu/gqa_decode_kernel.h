// GQA decode attention work items, compiled once per ISA (see simd.h for the inclusion protocol).
//
// One item = one (sequence, KV head, KV split). The item's query group (G = Hq / Hkv heads) is rotated,
// projected and scaled once, then the KV range is walked in tiles of kTile keys: scores for the whole group
// (each K row is loaded from memory once and reused from L1 for every head), an online-softmax update per
// head, and the P.V accumulation (each V row likewise). Everything accumulates in fp32.
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

// No std:: templates are instantiated here: under `#pragma GCC target` their weak copies could be compiled
// for AVX-512 and then chosen by the linker for the other ISAs. Scratch memory comes from the caller.

static_assert(kTile % Vec::W == 0, "the tile must be a whole number of vectors");

// Query heads per pass over a tile: 4 accumulators plus a load and broadcasts fit AVX2's 16 registers.
constexpr int kHeadBlock = 4;

// y[0:n] += a * x[0:n]
inline void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t c = 0;
  for (; c + Vec::W <= n; c += Vec::W) Vec::fma(Vec::set1(a), Vec::load(x + c), Vec::load(y + c)).store(y + c);
  for (; c < n; ++c) y[c] += a * x[c];
}

// qbuf[g, 0:Dk] = scale * (RoPE(q[b, h]) @ q_proj[h]) for the G heads h of KV head `kvh`.
template <DType DT>
void prepare_queries(const GqaDecodeParams& p, int64_t b, int64_t kvh, int64_t G, float* qbuf, float* tmp) {
  const int64_t D = p.D, Dk = p.Dk, half = p.rotary_dim / 2;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kvh * G + g;
    for (int64_t d = 0; d < D; ++d) tmp[d] = load_scalar<DT>(p.q, (b * p.Hq + h) * D + d);
    if (half > 0) rope_rotate(tmp, p.cos + b * half, p.sin + b * half, half, p.rope_style);
    float* qg = qbuf + g * Dk;
    if (p.q_proj != nullptr) {
      const float* P = p.q_proj + h * D * Dk;
      for (int64_t e = 0; e < Dk; ++e) qg[e] = 0.f;
      for (int64_t d = 0; d < D; ++d) axpy(qg, tmp[d], P + d * Dk, Dk);
      for (int64_t e = 0; e < Dk; ++e) qg[e] *= p.scale;
    } else {
      for (int64_t e = 0; e < Dk; ++e) qg[e] = tmp[e] * p.scale;
    }
  }
}

// FMA latency is 4 cycles and two issue per cycle, so each inner loop below keeps 8 independent
// accumulator chains in flight: NH heads x RT rows for the scores, NH heads x CH vector chunks for P.V.
template <int NH>
constexpr int kRowsPerPass = NH >= 3 ? 2 : 8 / NH;
template <int NH>
constexpr int kChunksPerPass = NH >= 3 ? 2 : 8 / NH;

// Software prefetch: hardware prefetchers alone leave the K/V loads latency-bound (they restart at every 4 KB page
// of the two streams); prefetching each K and V row kPrefetchRows rows ahead into L2, spread over the score loop,
// comes close to the memory bandwidth. Prefetching a whole tile at once stalls on full fill buffers instead, and an
// L1 (T0) hint was slower than L2 (T1). Measured on the project's 2-vCPU VMs: README "Backends".
constexpr int64_t kPrefetchRows = 16;

inline void prefetch_row(const void* base, int64_t byte_off, int64_t row_bytes) {
  const char* ptr = static_cast<const char*>(base) + byte_off;
  for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ptr + off, 0, 2);  // 64 B lines, T1
}

// s[j, t] = q_j . k_t for NH heads and RT consecutive keys starting at cache row `row`; also prefetches the
// K and V rows kPrefetchRows ahead that lie before `pf_end` (0 for all but the group's first head block).
template <DType DT, int NH, int RT>
inline void score_rows(const GqaDecodeParams& p, const void* kbase, const void* vbase, int64_t row, int64_t pf_end,
                       const float* q, float* s) {
  const int64_t Dk = p.Dk;
  for (int r = 0; r < RT; ++r)
    if (row + r + kPrefetchRows < pf_end) {
      prefetch_row(kbase, (row + r + kPrefetchRows) * p.k_ss * elem_bytes(DT), p.Dk * elem_bytes(DT));
      prefetch_row(vbase, (row + r + kPrefetchRows) * p.v_ss * elem_bytes(DT), p.Dv * elem_bytes(DT));
    }
  Vec acc[NH][RT];
  for (int j = 0; j < NH; ++j)
    for (int r = 0; r < RT; ++r) acc[j][r] = Vec::zero();
  int64_t c = 0;
  for (; c + Vec::W <= Dk; c += Vec::W) {
    Vec qc[NH];
    for (int j = 0; j < NH; ++j) qc[j] = Vec::load(q + j * Dk + c);
    for (int r = 0; r < RT; ++r) {
      const Vec kv = load_vec<DT>(kbase, (row + r) * p.k_ss + c);
      for (int j = 0; j < NH; ++j) acc[j][r] = Vec::fma(qc[j], kv, acc[j][r]);
    }
  }
  float sums[NH * RT];
  if constexpr (NH * RT == 8) {
    Vec::sum8(&acc[0][0], sums);
  } else {
    for (int i = 0; i < NH * RT; ++i) sums[i] = (&acc[0][0])[i].sum();
  }
  for (int j = 0; j < NH; ++j)
    for (int r = 0; r < RT; ++r) {
      float sj = sums[j * RT + r];
      for (int64_t e = c; e < Dk; ++e) sj += q[j * Dk + e] * load_scalar<DT>(kbase, (row + r) * p.k_ss + e);
      s[j * kTile + r] = sj;
    }
}

// Scores of NH heads for the n keys of the tile starting at cache row `row0`.
template <DType DT, int NH>
inline void tile_scores(const GqaDecodeParams& p, const void* kbase, const void* vbase, int64_t row0, int n,
                        int64_t pf_end, const float* q, float* s) {
  constexpr int RT = kRowsPerPass<NH>;
  int t = 0;
  for (; t + RT <= n; t += RT) score_rows<DT, NH, RT>(p, kbase, vbase, row0 + t, pf_end, q, s + t);
  for (; t < n; ++t) score_rows<DT, NH, 1>(p, kbase, vbase, row0 + t, pf_end, q, s + t);
}

// o_j[c : c + CH*W] += sum_t w[j, t] v_t[c : c + CH*W] for NH heads over the n values of a tile.
template <DType DT, int NH, int CH>
inline void accumulate_chunks(const GqaDecodeParams& p, const void* vbase, int64_t row0, int n, const float* w,
                              float* o, int64_t c) {
  const int64_t Dv = p.Dv;
  Vec acc[NH][CH];
  for (int j = 0; j < NH; ++j)
    for (int u = 0; u < CH; ++u) acc[j][u] = Vec::load(o + j * Dv + c + u * Vec::W);
  for (int t = 0; t < n; ++t) {
    const int64_t off = (row0 + t) * p.v_ss + c;
    for (int u = 0; u < CH; ++u) {
      const Vec vv = load_vec<DT>(vbase, off + u * Vec::W);
      for (int j = 0; j < NH; ++j) acc[j][u] = Vec::fma(Vec::set1(w[j * kTile + t]), vv, acc[j][u]);
    }
  }
  for (int j = 0; j < NH; ++j)
    for (int u = 0; u < CH; ++u) acc[j][u].store(o + j * Dv + c + u * Vec::W);
}

// o_j[0:Dv] += sum_t w[j, t] v_t for NH heads and the n values of a tile.
template <DType DT, int NH>
inline void tile_accumulate(const GqaDecodeParams& p, const void* vbase, int64_t row0, int n, const float* w,
                            float* o) {
  constexpr int CH = kChunksPerPass<NH>;
  const int64_t Dv = p.Dv;
  int64_t c = 0;
  for (; c + CH * Vec::W <= Dv; c += CH * Vec::W) accumulate_chunks<DT, NH, CH>(p, vbase, row0, n, w, o, c);
  for (; c + Vec::W <= Dv; c += Vec::W) accumulate_chunks<DT, NH, 1>(p, vbase, row0, n, w, o, c);
  for (; c < Dv; ++c)
    for (int t = 0; t < n; ++t) {
      const float vv = load_scalar<DT>(vbase, (row0 + t) * p.v_ss + c);
      for (int j = 0; j < NH; ++j) o[j * Dv + c] += w[j * kTile + t] * vv;
    }
}

// Apply fn<NH>(g0) to the group's heads in blocks of at most kHeadBlock.
template <typename Fn>
inline void for_head_blocks(int64_t G, Fn&& fn) {
  int64_t g0 = 0;
  for (; g0 + kHeadBlock <= G; g0 += kHeadBlock) fn(std::integral_constant<int, kHeadBlock>{}, g0);
  switch (G - g0) {
    case 3: fn(std::integral_constant<int, 3>{}, g0); break;
    case 2: fn(std::integral_constant<int, 2>{}, g0); break;
    case 1: fn(std::integral_constant<int, 1>{}, g0); break;
    default: break;
  }
}

// Online-softmax update of one head for one tile: turns s[0:kTile] into weights (zero past n) and rescales
// the head's accumulator; m and l are the running max and sum.
inline void softmax_update(float* s, int n, float& m, float& l, float* acc, int64_t Dv, float softcap) {
  if (softcap > 0.f)
    for (int t = 0; t < n; ++t) s[t] = softcap * std::tanh(s[t] / softcap);
  float mt = s[0];
  for (int t = 1; t < n; ++t) mt = s[t] > mt ? s[t] : mt;
  const float m_new = mt > m ? mt : m;
  const float alpha = std::exp(m - m_new);  // 0 on the first tile (m = -inf)
  Vec sum = Vec::zero();
  for (int t = 0; t < kTile; t += Vec::W) {
    const Vec e = exp_nonpositive(Vec::load(s + t) - Vec::set1(m_new));
    e.store(s + t);
  }
  for (int t = n; t < kTile; ++t) s[t] = 0.f;  // tail lanes of a partial tile held stale scores
  for (int t = 0; t < kTile; t += Vec::W) sum = sum + Vec::load(s + t);
  l = l * alpha + sum.sum();
  if (alpha != 1.f)
    for (int64_t c = 0; c < Dv; ++c) acc[c] *= alpha;
  m = m_new;
}

template <DType DT>
void run_items(const GqaDecodeParams& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t G = p.Hq / p.Hkv, Dk = p.Dk, Dv = p.Dv;
  // Scratch layout (gqa_decode_scratch_floats): queries, one raw query, tile scores, accumulators, max, sum.
  float* qbuf = scratch;
  float* tmp = qbuf + G * Dk;
  float* s = tmp + p.D;
  float* acc = s + G * kTile;
  float* m = acc + G * Dv;
  float* l = m + G;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t split = item % p.splits, bh = item / p.splits, b = bh / p.Hkv, kvh = bh % p.Hkv;
    const int64_t lo = (p.kv_start ? p.kv_start[b] : 0) + split * p.split_len;
    const int64_t hi = min64(p.seq_lens[b], lo + p.split_len);
    for (int64_t i = 0; i < G * Dv; ++i) acc[i] = 0.f;
    for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.f;
    if (lo < hi) prepare_queries<DT>(p, b, kvh, G, qbuf, tmp);
    const char* kbase = static_cast<const char*>(p.k) + (b * p.k_sb + kvh * p.k_sh) * elem_bytes(DT);
    const char* vbase = static_cast<const char*>(p.v) + (b * p.v_sb + kvh * p.v_sh) * elem_bytes(DT);
    for (int64_t row0 = lo; row0 < hi; row0 += kTile) {
      const int n = static_cast<int>(min64(kTile, hi - row0));
      for_head_blocks(G, [&](auto nh, int64_t g0) {
        tile_scores<DT, decltype(nh)::value>(p, kbase, vbase, row0, n, g0 == 0 ? hi : 0, qbuf + g0 * Dk,
                                             s + g0 * kTile);
      });
      for (int64_t g = 0; g < G; ++g) softmax_update(s + g * kTile, n, m[g], l[g], acc + g * Dv, Dv, p.softcap);
      for_head_blocks(G, [&](auto nh, int64_t g0) {
        tile_accumulate<DT, decltype(nh)::value>(p, vbase, row0, n, s + g0 * kTile, acc + g0 * Dv);
      });
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = b * p.Hq + kvh * G + g;
      const float* a = acc + g * Dv;
      if (p.splits == 1) {
        const float inv = l[g] == 0.f ? 0.f : 1.f / l[g];  // empty context -> zeros; a NaN l stays NaN
        for (int64_t c = 0; c < Dv; ++c) store_scalar<DT>(p.out, row * Dv + c, a[c] * inv);
      } else {
        float* dst = p.part_acc + (row * p.splits + split) * Dv;
        for (int64_t c = 0; c < Dv; ++c) dst[c] = a[c];
        p.part_ml[(row * p.splits + split) * 2] = m[g];
        p.part_ml[(row * p.splits + split) * 2 + 1] = l[g];
      }
    }
  }
}

void gqa_decode_items(const GqaDecodeParams& p, int64_t begin, int64_t end, float* scratch) {
  with_dtype(p.dtype, [&](auto dt) { run_items<dt.value>(p, begin, end, scratch); });
}

}  // namespace effkern::cpu::EFFKERN_ISA
