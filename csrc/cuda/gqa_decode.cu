// GQA decode attention kernels (split-KV "flash decoding"); interface and semantics in gqa_decode.cuh.
//
// Work decomposition
//   * One CTA per (sequence b, KV head, head chunk, KV split). The CTA serves every query head of the KV
//     head's group (chunks only when G > kMaxHeadsPerCta), so each K/V row is read from global memory once
//     for all of them: decode attention is memory-bound and the group's dot products are nearly free.
//   * Inside a CTA, "row groups" of lanes_per_row lanes (a power of two, 4..32) each own one key row at a
//     time: a lane loads VEC consecutive elements with one 16-byte load (element-wide loads when the row's
//     size or alignment does not allow), so a row group covers the whole head dim and neighbouring row
//     groups read neighbouring rows. Each lane's share of the q'.k dot product is summed with xor shuffles.
//     Each row group keeps its own running (max, sum, acc) per head (online softmax); there is no CTA
//     barrier in the key loop. Row groups merge through shared memory at the end.
//   * Prologue: q' = RoPE(q) (and the q_proj projection, done once per (b, h) by a small kernel before the
//     split kernel rather than once per split) times scale, into shared memory in fp32.
//   * Splits write normalised partial outputs and their log-sum-exps (base 2) to fp32 workspace; a combine
//     kernel merges them. A sequence served by one split is written directly (no workspace, no combine).
// Numerics: fp32 everywhere after the load; logits are kept in base 2 (log2(e) folded into q') so the
// softmax uses exp2f; a split or sequence without keys yields weight 0 and output 0, never NaN.
#include "gqa_decode.cuh"

#include "common.cuh"

#include <cmath>
#include <cstdint>

namespace effkern::gpu {
namespace {

constexpr int kThreads = 128;  // 4 warps per CTA: enough row groups per CTA, small enough to co-reside 3+ per SM
constexpr int kWarpSize = 32;
constexpr int kMaxHeadsPerCta = 8;  // query heads a CTA serves; larger groups are split into chunks (registers)
// Splits aim at this many CTAs per SM: the split kernel's register use allows about 3 resident CTAs of 4
// warps; 2 per SM already keeps >= 8 warps x several 16-byte loads in flight per SM (enough to cover DRAM
// latency), and every extra split adds a partial-output write and read.
constexpr int kTargetCtasPerSm = 2;
constexpr int kFallbackSmCount = 132;  // H100 SXM, used only if the device query fails
constexpr int kProjRows = 8;           // sequences per q_proj CTA: each [D, Dk] matrix is read once per 8 rows
constexpr size_t kDynamicSmemLimit = 48 * 1024;  // default dynamic shared memory limit without an opt-in
constexpr size_t kWorkspaceAlign = 256;
constexpr float kLog2e = 1.4426950408889634f;

// The register type one load of `BYTES` bytes lands in (ld.global.nc.v4.u32 for 16 bytes).
template <int BYTES> struct RawVec;
template <> struct RawVec<16> { using type = uint4; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<2> { using type = unsigned short; };

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const typename RawVec<VEC * sizeof(T)>::type& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
}

// Splits a sequence of `len` keys actually uses: as many as the grid has, but each with >= min_keys keys
// (one split, possibly empty, when len is short). The split kernel and the combine kernel both use it.
__host__ __device__ __forceinline__ int splits_for_len(int len, int grid_splits, int min_keys) {
  const int by_len = len / min_keys;
  return by_len < 1 ? 1 : (by_len < grid_splits ? by_len : grid_splits);
}

__device__ __forceinline__ int clamp_len(int len, int s_max) { return len < 0 ? 0 : (len > s_max ? s_max : len); }

// The valid keys of sequence b: [start, start + count), from kv_start[b] (0 when null) to seq_lens[b], clamped.
struct KeyRange {
  int start, count;
};
__device__ __forceinline__ KeyRange key_range(const int32_t* seq_lens, const int32_t* kv_start, int64_t b, int s_max) {
  const int end = clamp_len(seq_lens[b], s_max);
  const int start = kv_start ? min(clamp_len(kv_start[b], s_max), end) : 0;
  return {start, end - start};
}

// Records which of sequence b's bounds key_range had to clamp (seq_lens outside [0, S_max], kv_start outside
// [0, seq_lens]).
__device__ __forceinline__ void record_range_errors(const int32_t* seq_lens, const int32_t* kv_start, int64_t b,
                                                    int s_max, int* err) {
  const int end = seq_lens[b];
  int code = end < 0 || end > s_max ? kErrSeqLens : 0;
  if (kv_start != nullptr && (kv_start[b] < 0 || kv_start[b] > end)) code |= kErrKvStart;
  if (code != 0) record_error(err, code);
}

struct SplitParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* seq_lens;
  const int32_t* kv_start;  // or null
  const float* cos;
  const float* sin;
  const float* q_ws;  // [B, Hq, Dk] projected, scaled queries, or null (then RoPE(q) * q_mul here)
  void* out;
  int* err;         // error word, or null
  float* part_o;    // [B, Hq, splits, Dv]
  float* part_lse;  // [B, Hq, splits]
  int64_t ksb, ksh, kss, vsb, vsh, vss;
  int B, Hq, Hkv, G, D, Dk, Dv, S_max;
  int chunks, heads_per_chunk, splits, min_keys;
  int lanes_per_row;  // power of two in [4, 32], lanes_per_row * VEC * NV >= max(Dk, Dv)
  float q_mul;     // folded into q': scale * log2(e), or scale / softcap with a softcap
  float cap_log2;  // softcap * log2(e); 0 = no softcap
  int rope_style, rotary_dim;
};

template <typename T, int VEC, int NV, int GMAX>
struct SplitConfig {
  static constexpr int kElems = VEC * NV;  // elements of a key/value row held per lane
  // Lanes per row group (a runtime power of two, lanes_per_row * kElems >= max(Dk, Dv)) lie in
  // [kMinLanesPerRow, kWarpSize]; the lower bound only caps the row-group count (shared-memory arrays).
  static constexpr int kMinLanesPerRow = 4;
  static constexpr int kMaxRowGroups = kThreads / kMinLanesPerRow;
  static constexpr int kMaxTile = kWarpSize * kElems;  // widest head a row group covers
  // Rows in flight per row group per step: about 64 bytes of K (and as many of V) per lane, fewer with 8
  // heads per CTA whose fp32 accumulators already take GMAX * kElems registers.
  static constexpr int kUnrollByBytes = 64 / (kElems * static_cast<int>(sizeof(T)));
  static constexpr int kUnrollCap = GMAX >= 8 ? 2 : 4;
  static constexpr int kUnroll =
      kUnrollByBytes < 1 ? 1 : (kUnrollByBytes < kUnrollCap ? kUnrollByBytes : kUnrollCap);
  using Raw = typename RawVec<VEC * sizeof(T)>::type;
};

// Template over (dtype, load width VEC, vectors per lane NV, heads per CTA bound GMAX); the lanes per row
// group are a runtime power of two (p.lanes_per_row), so one instantiation serves every head dim up to
// 32 * VEC * NV: lane `lane` holds elements (w * lanes_per_row + lane) * VEC + [0, VEC) for w < NV.
template <typename T, int VEC, int NV, int GMAX>
__global__ void __launch_bounds__(kThreads) gqa_decode_split_kernel(const SplitParams p) {
  using Cfg = SplitConfig<T, VEC, NV, GMAX>;
  constexpr int ELEMS = Cfg::kElems, UNROLL = Cfg::kUnroll;
  using Raw = typename Cfg::Raw;
  const int tpr = p.lanes_per_row;
  const int nrg = kThreads / tpr;  // row groups
  const int tile = tpr * ELEMS;    // head elements a row group covers (>= max(Dk, Dv))

  // Block -> (b, KV head, head chunk, split), split fastest.
  int64_t idx = blockIdx.x;
  const int split = static_cast<int>(idx % p.splits);
  idx /= p.splits;
  const int chunk = static_cast<int>(idx % p.chunks);
  idx /= p.chunks;
  const int kvh = static_cast<int>(idx % p.Hkv);
  const int b = static_cast<int>(idx / p.Hkv);

  const KeyRange keys = key_range(p.seq_lens, p.kv_start, b, p.S_max);
  if (threadIdx.x == 0 && kvh == 0 && chunk == 0 && split == 0)  // one report per sequence
    record_range_errors(p.seq_lens, p.kv_start, b, p.S_max, p.err);
  const int len = keys.count;
  const int n_b = splits_for_len(len, p.splits, p.min_keys);
  const int g0 = chunk * p.heads_per_chunk;
  const int gc = min(p.heads_per_chunk, p.G - g0);  // heads this CTA serves (<= GMAX)
  if (split >= n_b || gc <= 0) return;  // CTA-uniform: nothing below is skipped by part of a block
  const int h0 = kvh * p.G + g0;        // first query head: query head h reads KV head h / G
  const int keys_per_split = (len + n_b - 1) / n_b;
  const int t_begin = min(len, split * keys_per_split);  // relative to keys.start (folded into k_head, v_head)
  const int t_end = min(len, t_begin + keys_per_split);

  __shared__ __align__(16) float q_s[GMAX * Cfg::kMaxTile];                // [GMAX][tile]
  __shared__ __align__(16) float acc_s[kThreads * ELEMS * GMAX];           // [nrg][GMAX][tile]: nrg * tile = kThreads * ELEMS
  __shared__ float m_s[Cfg::kMaxRowGroups * GMAX];                          // [nrg][GMAX]
  __shared__ float l_s[Cfg::kMaxRowGroups * GMAX];                          // [nrg][GMAX]

  // Prologue: q' (zero beyond Dk and for unused heads, so padded lanes contribute exact zeros).
  {
    const T* q = static_cast<const T*>(p.q);
    const int half = p.rotary_dim / 2;
    const float* cs = p.rotary_dim ? p.cos + static_cast<int64_t>(b) * half : nullptr;
    const float* sn = p.rotary_dim ? p.sin + static_cast<int64_t>(b) * half : nullptr;
    for (int i = threadIdx.x; i < GMAX * tile; i += kThreads) {
      const int g = i / tile, e = i % tile;
      float val = 0.f;
      if (g < gc && e < p.Dk) {
        const int64_t row = static_cast<int64_t>(b) * p.Hq + h0 + g;
        val = p.q_ws ? p.q_ws[row * p.Dk + e]
                     : rope_at(q + row * p.D, e, cs, sn, p.rope_style, p.rotary_dim) * p.q_mul;
      }
      q_s[i] = val;
    }
  }

  const int rg = threadIdx.x / tpr;    // row group
  const int lane = threadIdx.x % tpr;  // lane within the row group
  const T* k_head = static_cast<const T*>(p.k) + static_cast<int64_t>(b) * p.ksb + static_cast<int64_t>(kvh) * p.ksh +
                   static_cast<int64_t>(keys.start) * p.kss;
  const T* v_head = static_cast<const T*>(p.v) + static_cast<int64_t>(b) * p.vsb + static_cast<int64_t>(kvh) * p.vsh +
                   static_cast<int64_t>(keys.start) * p.vss;
  int offs[NV];  // first element of each of this lane's vectors
#pragma unroll
  for (int w = 0; w < NV; ++w) offs[w] = (w * tpr + lane) * VEC;

  float m[GMAX], l[GMAX], acc[GMAX][ELEMS];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) acc[g][i] = 0.f;
  }
  __syncthreads();  // q_s ready

  // Row group rg takes keys t0 + u * nrg + rg: at each u the CTA's row groups read nrg adjacent rows.
  for (int t0 = t_begin; t0 < t_end; t0 += nrg * UNROLL) {
    Raw kr[UNROLL][NV], vr[UNROLL][NV];
    bool live[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = t0 + u * nrg + rg;
      live[u] = t < t_end;
      const T* krow = k_head + static_cast<int64_t>(t) * p.kss;
      const T* vrow = v_head + static_cast<int64_t>(t) * p.vss;
#pragma unroll
      for (int w = 0; w < NV; ++w) {
        // Vector loads are used only when Dk and Dv are multiples of VEC: a vector is wholly in or out.
        kr[u][w] = (live[u] && offs[w] < p.Dk) ? __ldg(reinterpret_cast<const Raw*>(krow + offs[w])) : Raw{};
        vr[u][w] = (live[u] && offs[w] < p.Dv) ? __ldg(reinterpret_cast<const Raw*>(vrow + offs[w])) : Raw{};
      }
    }

    // Logits of the UNROLL rows for every head of the chunk (this lane's share of the dot products).
    float s[UNROLL][GMAX];
    {
      float kf[UNROLL][ELEMS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int w = 0; w < NV; ++w) unpack<T, VEC>(kr[u][w], &kf[u][w * VEC]);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g < gc) {
          float qv[ELEMS];
#pragma unroll
          for (int w = 0; w < NV; ++w) {
            const float* src = q_s + g * tile + offs[w];
            if constexpr (VEC % 4 == 0) {  // 16-byte aligned: tile and offs[w] are multiples of VEC
#pragma unroll
              for (int i = 0; i < VEC; i += 4) {
                const float4 x4 = *reinterpret_cast<const float4*>(src + i);
                qv[w * VEC + i] = x4.x;
                qv[w * VEC + i + 1] = x4.y;
                qv[w * VEC + i + 2] = x4.z;
                qv[w * VEC + i + 3] = x4.w;
              }
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) qv[w * VEC + i] = src[i];
            }
          }
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < ELEMS; ++i) dot = fmaf(qv[i], kf[u][i], dot);
            s[u][g] = dot;
          }
        } else {
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) s[u][g] = 0.f;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < gc) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          float x = s[u][g];
          // Butterfly within the row group's aligned lane segment: every lane ends with the full dot.
#pragma unroll
          for (int o = kWarpSize / 2; o > 0; o >>= 1)
            if (o < tpr) x += __shfl_xor_sync(0xffffffffu, x, o);
          if (p.cap_log2 != 0.f) x = p.cap_log2 * tanhf(x);
          s[u][g] = live[u] ? x : -INFINITY;  // mask after the softcap: tanh would make -inf finite
        }
      }
    }

    // Online softmax update and P.V for the UNROLL rows.
    float vf[UNROLL][ELEMS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int w = 0; w < NV; ++w) unpack<T, VEC>(vr[u][w], &vf[u][w * VEC]);
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < gc) {
        float chunk_max = s[0][g];
#pragma unroll
        for (int u = 1; u < UNROLL; ++u) chunk_max = fmaxf(chunk_max, s[u][g]);
        const float m_new = fmaxf(m[g], chunk_max);
        // With no live key yet m_new is -inf: subtract 0 instead so exp2f sees -inf, not NaN (inf - inf).
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float corr = exp2f(m[g] - m_use);
        float pr[UNROLL];
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          pr[u] = exp2f(s[u][g] - m_use);
          psum += pr[u];
        }
        l[g] = fmaf(l[g], corr, psum);
        m[g] = m_new;
#pragma unroll
        for (int i = 0; i < ELEMS; ++i) {
          float a = acc[g][i] * corr;
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) a = fmaf(pr[u], vf[u][i], a);
          acc[g][i] = a;
        }
      }
    }
  }

  // Merge the row groups: rescale each to the CTA-wide max, then sum in a fixed order (deterministic).
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) m_s[rg * GMAX + g] = m[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    float mx = -INFINITY;
    for (int r = 0; r < nrg; ++r) mx = fmaxf(mx, m_s[r * GMAX + g]);
    const float f = exp2f(m[g] - (mx == -INFINITY ? 0.f : mx));  // 0 for a row group that saw no key
    if (lane == 0) l_s[rg * GMAX + g] = l[g] * f;
    float* dst = acc_s + (rg * GMAX + g) * tile;
#pragma unroll
    for (int w = 0; w < NV; ++w)
#pragma unroll
      for (int i = 0; i < VEC; ++i) dst[offs[w] + i] = acc[g][w * VEC + i] * f;
  }
  __syncthreads();

  const int64_t row0 = static_cast<int64_t>(b) * p.Hq + h0;
  for (int i = threadIdx.x; i < gc * p.Dv; i += kThreads) {
    const int g = i / p.Dv, e = i % p.Dv;
    float mx = -INFINITY, sum = 0.f, a = 0.f;
    for (int r = 0; r < nrg; ++r) {
      mx = fmaxf(mx, m_s[r * GMAX + g]);
      sum += l_s[r * GMAX + g];
      a += acc_s[(r * GMAX + g) * tile + e];
    }
    const float o = sum == 0.f ? 0.f : a / sum;  // a NaN sum (NaN logits) stays NaN
    const int64_t row = row0 + g;
    if (n_b == 1) {
      static_cast<T*>(p.out)[row * p.Dv + e] = from_float<T>(o);
    } else {
      const int64_t part = row * p.splits + split;
      p.part_o[part * p.Dv + e] = o;
      if (e == 0) p.part_lse[part] = sum == 0.f ? -INFINITY : mx + log2f(sum);
    }
  }
}

struct CombineParams {
  const int32_t* seq_lens;
  const int32_t* kv_start;
  const float* part_o;
  const float* part_lse;
  void* out;
  int64_t rows;  // B * Hq
  int Hq, Dv, S_max, splits, min_keys;
};

// One warp per (b, h) row: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max). Rows whose sequence used
// a single split were written by the split kernel and are skipped.
template <typename T>
__global__ void __launch_bounds__(kThreads) gqa_decode_combine_kernel(const CombineParams p) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ float w_s[kWarps][kGqaDecodeMaxSplits];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= p.rows) return;  // only warp-level synchronisation below
  const int len = key_range(p.seq_lens, p.kv_start, row / p.Hq, p.S_max).count;
  const int n_b = splits_for_len(len, p.splits, p.min_keys);
  if (n_b == 1) return;

  const float* lse = p.part_lse + row * p.splits;
  float mx = -INFINITY;
  for (int s = lane; s < n_b; s += kWarpSize) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (mx == -INFINITY) mx = 0.f;  // every split empty (or NaN, which fmaxf skips): exp2f(-inf) = 0, NaN stays NaN
  float wsum = 0.f;
  for (int s = lane; s < n_b; s += kWarpSize) {
    const float w = exp2f(lse[s] - mx);  // an empty split has lse -inf: weight 0
    w_s[warp][s] = w;
    wsum += w;
  }
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
  __syncwarp();
  const float inv = wsum == 0.f ? 0.f : 1.f / wsum;
  const float* po = p.part_o + row * p.splits * p.Dv;
  for (int e = lane; e < p.Dv; e += kWarpSize) {
    float a = 0.f;
    for (int s = 0; s < n_b; ++s) a = fmaf(w_s[warp][s], po[static_cast<int64_t>(s) * p.Dv + e], a);
    static_cast<T*>(p.out)[row * p.Dv + e] = from_float<T>(a * inv);
  }
}

struct ProjParams {
  const void* q;
  const float* cos;
  const float* sin;
  const float* q_proj;  // [Hq, D, Dk]
  float* q_ws;          // [B, Hq, Dk]
  int B, Hq, D, Dk, rows;
  float q_mul;
  int rope_style, rotary_dim;
};

// q_ws[b, h] = RoPE(q[b, h]) @ q_proj[h] * q_mul. Grid (Hq, ceil(B / rows)): each CTA stages `rows` rotated
// queries of head h in shared memory and streams q_proj[h] once for all of them.
template <typename T>
__global__ void __launch_bounds__(kThreads) gqa_decode_qproj_kernel(const ProjParams p) {
  extern __shared__ float qr_s[];  // [rows][D]
  const int h = blockIdx.x;
  const int b0 = blockIdx.y * p.rows;
  const int nb = min(p.rows, p.B - b0);
  const T* q = static_cast<const T*>(p.q);
  const int half = p.rotary_dim / 2;
  for (int i = threadIdx.x; i < nb * p.D; i += kThreads) {
    const int r = i / p.D, d = i % p.D;
    const int64_t b = b0 + r;
    const float* cs = p.rotary_dim ? p.cos + b * half : nullptr;
    const float* sn = p.rotary_dim ? p.sin + b * half : nullptr;
    qr_s[i] = rope_at(q + (b * p.Hq + h) * p.D, d, cs, sn, p.rope_style, p.rotary_dim);
  }
  __syncthreads();
  const float* w = p.q_proj + static_cast<int64_t>(h) * p.D * p.Dk;
  for (int e = threadIdx.x; e < p.Dk; e += kThreads) {
    float a[kProjRows];
#pragma unroll
    for (int r = 0; r < kProjRows; ++r) a[r] = 0.f;
    for (int d = 0; d < p.D; ++d) {
      const float wde = __ldg(w + static_cast<int64_t>(d) * p.Dk + e);  // coalesced over e
#pragma unroll
      for (int r = 0; r < kProjRows; ++r)
        if (r < nb) a[r] = fmaf(qr_s[r * p.D + d], wde, a[r]);
    }
#pragma unroll
    for (int r = 0; r < kProjRows; ++r)
      if (r < nb) p.q_ws[(static_cast<int64_t>(b0 + r) * p.Hq + h) * p.Dk + e] = a[r] * p.q_mul;
  }
}

// ---- host side ----

size_t align_up(size_t x) { return (x + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

int64_t head_chunks(const GqaDecodeArgs& a) {
  const int64_t g = a.q_heads / a.kv_heads;
  return (g + kMaxHeadsPerCta - 1) / kMaxHeadsPerCta;
}

int device_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // a failed query must not surface as the launch error
    return kFallbackSmCount;
  }
  return sms;
}

int64_t max_head_dim(const GqaDecodeArgs& a) { return a.k_dim > a.v_dim ? a.k_dim : a.v_dim; }

// Smallest power of two in [4, 32] with lanes * elems_per_lane >= max(Dk, Dv).
int lanes_per_row(const GqaDecodeArgs& a, int elems_per_lane) {
  int lanes = 4;
  while (lanes < kWarpSize && static_cast<int64_t>(lanes) * elems_per_lane < max_head_dim(a)) lanes *= 2;
  return lanes;
}

int gmax_for(int heads_per_chunk) {
  return heads_per_chunk <= 1 ? 1 : heads_per_chunk <= 2 ? 2 : heads_per_chunk <= 4 ? 4 : 8;
}

// 16-byte K/V loads need 16-byte aligned bases, rows and strides (strides of size-1 dims never matter).
bool wide_loads_ok(const GqaDecodeArgs& a, size_t elem) {
  auto ok = [](int64_t n_elems, size_t elem_size) { return (n_elems * static_cast<int64_t>(elem_size)) % 16 == 0; };
  const bool bases = reinterpret_cast<uintptr_t>(a.k_cache) % 16 == 0 && reinterpret_cast<uintptr_t>(a.v_cache) % 16 == 0;
  const bool rows = ok(a.k_dim, elem) && ok(a.v_dim, elem);
  const bool kstr = (a.batch <= 1 || ok(a.k_stride_b, elem)) && (a.kv_heads <= 1 || ok(a.k_stride_h, elem)) &&
                    (a.max_seq <= 1 || ok(a.k_stride_s, elem));
  const bool vstr = (a.batch <= 1 || ok(a.v_stride_b, elem)) && (a.kv_heads <= 1 || ok(a.v_stride_h, elem)) &&
                    (a.max_seq <= 1 || ok(a.v_stride_s, elem));
  return bases && rows && kstr && vstr;
}

template <typename T, int VEC, int NV, int GMAX>
void launch_split_kernel(const SplitParams& p, int64_t blocks, cudaStream_t stream) {
  gqa_decode_split_kernel<T, VEC, NV, GMAX><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
}

template <typename T, int VEC, int NV>
void launch_split_by_heads(const SplitParams& p, int64_t blocks, cudaStream_t stream) {
  switch (gmax_for(p.heads_per_chunk)) {
    case 1: launch_split_kernel<T, VEC, NV, 1>(p, blocks, stream); break;
    case 2: launch_split_kernel<T, VEC, NV, 2>(p, blocks, stream); break;
    case 4: launch_split_kernel<T, VEC, NV, 4>(p, blocks, stream); break;
    default: launch_split_kernel<T, VEC, NV, 8>(p, blocks, stream); break;
  }
}

template <typename T>
cudaError_t launch_typed(const GqaDecodeArgs& a, SplitParams sp, int64_t split_blocks, bool wide,
                         const ProjParams* proj, int64_t combine_rows, cudaStream_t stream) {
  if (proj != nullptr) {
    const dim3 grid(static_cast<unsigned>(proj->Hq), static_cast<unsigned>((proj->B + proj->rows - 1) / proj->rows));
    const size_t smem = sizeof(float) * proj->rows * proj->D;
    gqa_decode_qproj_kernel<T><<<grid, kThreads, smem, stream>>>(*proj);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  // One 16-byte vector per lane covers 32 * 8 = 256 elements for fp16/bf16 and 32 * 4 = 128 for fp32.
  constexpr bool kTwoVectorsFit = sizeof(T) == sizeof(float);
  if (wide && max_head_dim(a) <= kWarpSize * kVec) {
    sp.lanes_per_row = lanes_per_row(a, kVec);
    launch_split_by_heads<T, kVec, 1>(sp, split_blocks, stream);
  } else if (wide && kTwoVectorsFit) {
    if constexpr (kTwoVectorsFit) {  // fp32 heads of 129..256: two 16-byte vectors per lane
      sp.lanes_per_row = lanes_per_row(a, 2 * kVec);
      launch_split_by_heads<T, kVec, 2>(sp, split_blocks, stream);
    }
  } else {
    // Rare fallback (odd head dims, misaligned views): element-wide loads, 8 per lane, 8 heads per CTA.
    constexpr int kElems = 8;
    sp.lanes_per_row = lanes_per_row(a, kElems);
    launch_split_kernel<T, 1, kElems, kMaxHeadsPerCta>(sp, split_blocks, stream);
  }
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (sp.splits > 1) {
    CombineParams cp{sp.seq_lens, sp.kv_start, sp.part_o, sp.part_lse, sp.out, combine_rows, sp.Hq, sp.Dv, sp.S_max,
                     sp.splits, sp.min_keys};
    constexpr int64_t kRowsPerCta = kThreads / kWarpSize;
    const int64_t blocks = (combine_rows + kRowsPerCta - 1) / kRowsPerCta;
    gqa_decode_combine_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(cp);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int proj_rows(int64_t head_dim) {
  const int64_t by_smem = static_cast<int64_t>(kDynamicSmemLimit / sizeof(float)) / head_dim;
  return static_cast<int>(by_smem < kProjRows ? by_smem : kProjRows);
}

}  // namespace

// Split rule: splits = clamp(min(ceil(kTargetCtasPerSm * SMs / (B * Hkv * chunks)),
//                                floor(S_max / kGqaDecodeMinKeysPerSplit)), 1, kGqaDecodeMaxSplits).
// The first term fills the GPU (B * Hkv * chunks CTAs exist without splitting); the second keeps >= 256 keys
// per split at full cache length. seq_lens live on the device, so the host sizes the grid by S_max and each
// sequence then uses only splits_for_len(seq_lens[b]) of them (the rest exit at once): short or ragged
// sequences never get splits of fewer than 256 keys, and one that fits one split skips the combine.
int gqa_decode_num_splits(const GqaDecodeArgs& a) {
  if (a.batch <= 0 || a.q_heads <= 0 || a.kv_heads <= 0) return 1;
  int64_t n;
  if (a.num_splits > 0) {
    n = a.num_splits;
  } else {
    const int64_t base = a.batch * a.kv_heads * head_chunks(a);
    const int64_t sms = a.num_sms > 0 ? a.num_sms : device_sm_count();
    const int64_t by_fill = (kTargetCtasPerSm * sms + base - 1) / base;
    const int64_t by_len = a.max_seq / kGqaDecodeMinKeysPerSplit;
    n = by_fill < by_len ? by_fill : by_len;
  }
  return static_cast<int>(n < 1 ? 1 : (n > kGqaDecodeMaxSplits ? kGqaDecodeMaxSplits : n));
}

size_t gqa_decode_workspace_bytes(const GqaDecodeArgs& a) {
  if (a.batch <= 0 || a.q_heads <= 0) return 0;
  const size_t rows = static_cast<size_t>(a.batch) * static_cast<size_t>(a.q_heads);
  const size_t splits = static_cast<size_t>(gqa_decode_num_splits(a));
  size_t bytes = 0;
  if (splits > 1) bytes += align_up(sizeof(float) * rows * splits * a.v_dim) + align_up(sizeof(float) * rows * splits);
  if (a.q_proj != nullptr) bytes += align_up(sizeof(float) * rows * a.k_dim);
  return bytes;
}

cudaError_t gqa_decode_launch(const GqaDecodeArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                              const char** why) {
  auto fail = [why](const char* msg) { return invalid_argument(why, msg); };
  const size_t elem = dtype_bytes(a.dtype);
  if (elem == 0) return fail(kDtypeError);
  if (a.batch < 0 || a.batch > kIntMax) return fail("batch must be in [0, 2^31)");
  if (a.q_heads < 1 || a.kv_heads < 1 || a.q_heads > kIntMax) return fail("q_heads and kv_heads must be >= 1");
  if (a.q_heads % a.kv_heads != 0) return fail("q_heads must be a multiple of kv_heads");
  if (a.head_dim < 1 || a.head_dim > kIntMax) return fail("head_dim must be >= 1");
  if (a.k_dim < 1 || a.k_dim > kGqaDecodeMaxHeadDim || a.v_dim < 1 || a.v_dim > kGqaDecodeMaxHeadDim)
    return fail("k_dim and v_dim must be in [1, 256] (larger heads go to the Triton kernel)");
  if (a.q_proj == nullptr && a.k_dim != a.head_dim) return fail("without q_proj, k_dim must equal head_dim");
  // Key indices are int in the kernels, and a row group may step up to kThreads keys past the end.
  if (a.max_seq < 0 || a.max_seq > (int64_t{1} << 30)) return fail("max_seq must be in [0, 2^30]");
  if (a.rotary_dim < 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim)
    return fail("rotary_dim must be even and in [0, head_dim]");
  if (a.rotary_dim > 0 && (a.cos == nullptr || a.sin == nullptr)) return fail("rotary_dim > 0 needs cos and sin");
  if (a.rope_style != 0 && a.rope_style != 1) return fail("rope_style must be 0 (half) or 1 (interleaved)");
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap)) return fail("softcap must be finite and >= 0 (0 = off)");
  if (!std::isfinite(a.scale)) return fail("scale must be finite");
  if (a.k_stride_b < 0 || a.k_stride_h < 0 || a.k_stride_s < 0 || a.v_stride_b < 0 || a.v_stride_h < 0 ||
      a.v_stride_s < 0)
    return fail("cache strides must be non-negative");
  if (a.batch == 0) return cudaSuccess;
  if (a.q == nullptr || a.out == nullptr || a.seq_lens == nullptr) return fail("q, out and seq_lens must be non-null");
  if (a.max_seq > 0 && (a.k_cache == nullptr || a.v_cache == nullptr)) return fail("k_cache and v_cache must be non-null");

  const int64_t g = a.q_heads / a.kv_heads;
  const int64_t chunks = head_chunks(a);
  const int64_t heads_per_chunk = (g + chunks - 1) / chunks;  // balanced chunks, each <= kMaxHeadsPerCta
  const int splits = gqa_decode_num_splits(a);
  const int64_t split_blocks = a.batch * a.kv_heads * chunks * splits;
  if (split_blocks > kIntMax) return fail("too many CTAs: B * Hkv * head chunks * splits must be < 2^31");
  const int64_t rows = a.batch * a.q_heads;

  const size_t need = gqa_decode_workspace_bytes(a);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need))
    return fail("workspace is smaller than gqa_decode_workspace_bytes(args)");
  if (need > 0 && reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return fail("workspace must be 16-byte aligned");
  char* ws = static_cast<char*>(workspace);
  float* part_o = nullptr;
  float* part_lse = nullptr;
  float* q_ws = nullptr;
  if (splits > 1) {
    part_o = reinterpret_cast<float*>(ws);
    ws += align_up(sizeof(float) * rows * splits * a.v_dim);
    part_lse = reinterpret_cast<float*>(ws);
    ws += align_up(sizeof(float) * rows * splits);
  }

  // Fold scale (and log2(e) for the exp2 softmax, or 1 / softcap for tanh) into q'.
  const bool capped = a.softcap > 0.f;
  const float q_mul = capped ? a.scale / a.softcap : a.scale * kLog2e;
  const float cap_log2 = capped ? a.softcap * kLog2e : 0.f;

  ProjParams proj{};
  if (a.q_proj != nullptr) {
    const int r = proj_rows(a.head_dim);
    if (r < 1) return fail("head_dim too large for the q_proj kernel's shared memory (needs 4 * D <= 48 KiB)");
    if ((a.batch + r - 1) / r > 65535) return fail("batch too large for the q_proj grid");
    q_ws = reinterpret_cast<float*>(ws);
    proj = ProjParams{a.q, a.cos, a.sin, a.q_proj, q_ws, static_cast<int>(a.batch), static_cast<int>(a.q_heads),
                      static_cast<int>(a.head_dim), static_cast<int>(a.k_dim), r, q_mul, a.rope_style, a.rotary_dim};
  }

  SplitParams sp{};
  sp.q = a.q;
  sp.k = a.k_cache;
  sp.v = a.v_cache;
  sp.seq_lens = a.seq_lens;
  sp.kv_start = a.kv_start;
  sp.cos = a.cos;
  sp.sin = a.sin;
  sp.q_ws = q_ws;
  sp.out = a.out;
  sp.err = a.err;
  sp.part_o = part_o;
  sp.part_lse = part_lse;
  sp.ksb = a.k_stride_b;
  sp.ksh = a.k_stride_h;
  sp.kss = a.k_stride_s;
  sp.vsb = a.v_stride_b;
  sp.vsh = a.v_stride_h;
  sp.vss = a.v_stride_s;
  sp.B = static_cast<int>(a.batch);
  sp.Hq = static_cast<int>(a.q_heads);
  sp.Hkv = static_cast<int>(a.kv_heads);
  sp.G = static_cast<int>(g);
  sp.D = static_cast<int>(a.head_dim);
  sp.Dk = static_cast<int>(a.k_dim);
  sp.Dv = static_cast<int>(a.v_dim);
  sp.S_max = static_cast<int>(a.max_seq);
  sp.chunks = static_cast<int>(chunks);
  sp.heads_per_chunk = static_cast<int>(heads_per_chunk);
  sp.splits = splits;
  // A forced split count (tests) may cut short contexts finely; the automatic rule keeps >= 256 keys.
  sp.min_keys = a.num_splits > 0 ? 1 : kGqaDecodeMinKeysPerSplit;
  sp.q_mul = q_mul;
  sp.cap_log2 = cap_log2;
  sp.rope_style = a.rope_style;
  sp.rotary_dim = a.rotary_dim;

  const bool wide = wide_loads_ok(a, elem);
  const ProjParams* pp = a.q_proj != nullptr ? &proj : nullptr;
  switch (a.dtype) {
    case CUDA_R_32F: return launch_typed<float>(a, sp, split_blocks, wide, pp, rows, stream);
    case CUDA_R_16F: return launch_typed<__half>(a, sp, split_blocks, wide, pp, rows, stream);
    default: return launch_typed<__nv_bfloat16>(a, sp, split_blocks, wide, pp, rows, stream);
  }
}

}  // namespace effkern::gpu
