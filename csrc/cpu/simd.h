// A minimal fp32 SIMD vector for the CPU kernels, one definition per instruction-set level.
//
// A <kernel>_isa.cpp file includes <immintrin.h> and the standard headers first, then, once per ISA level:
// `#pragma GCC push_options` + `#pragma GCC target(...)`, defines EFFKERN_ISA_LEVEL (512, 256 or 0) and
// EFFKERN_ISA (the namespace name), includes this header and the kernel header, and pops the options.
// Everything here lives in that per-ISA namespace, so the copies never collide at link time (an inline
// function compiled for AVX-512 must never be picked by the linker for the generic path).
// No include guard: included once per ISA (see kernels_isa.cpp).

namespace effkern::cpu::EFFKERN_ISA {

// Scalar fp16/bf16 <-> fp32 (bf16 rounds to nearest even, NaN stays NaN).
inline float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  _Float16 x;
  std::memcpy(&x, &h, sizeof x);
  return static_cast<float>(x);
}

inline uint16_t float_to_half_bits(float f, bool bf16) {
  uint16_t h;
  if (bf16) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  _Float16 x = static_cast<_Float16>(f);
  std::memcpy(&h, &x, sizeof h);
  return h;
}

#if EFFKERN_ISA_LEVEL >= 256
// out[i] = sum of the 8 lanes of h[i]: hadd pairs twice (each level halves the vectors), then add the two
// 128-bit halves, which hold the lane 0-3 and lane 4-7 partial sums.
inline void hadd_tree8(const __m256* h, float* out) {
  const __m256 a01 = _mm256_hadd_ps(h[0], h[1]), a23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 a45 = _mm256_hadd_ps(h[4], h[5]), a67 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 b0 = _mm256_hadd_ps(a01, a23), b1 = _mm256_hadd_ps(a45, a67);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31)));
}
#endif

#if EFFKERN_ISA_LEVEL == 512
struct Vec {
  static constexpr int W = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const uint16_t* p, bool bf16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (bf16) return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
    return {_mm512_cvtph_ps(h)};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // Non-temporal store (bypasses the caches, no read-for-ownership); p must be 64-byte aligned.
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  // Round to fp16 / bf16 (nearest even; a NaN stays a quiet NaN) and store 16 values.
  void store(uint16_t* p, bool bf16) const {
    __m256i h;
    if (bf16) {
      const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
      const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
      const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
      const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
      h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet));
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  // F.relu: x <= 0 ? 0 : x (a NaN stays NaN, -0 becomes +0), as a compare and a zero-masking move.
  static Vec relu(Vec x) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NLE_UQ), x.v)};
  }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm512_abs_ps(a.v)}; }
  // x <= 0 ? b : a, lane by lane (a NaN x selects a: torch's threshold_backward keeps the gradient there)
  static Vec select_pos(Vec x, Vec a, Vec b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NLE_UQ), b.v, a.v)};
  }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  // out[i] = sum of v[i] for 8 vectors: fold each to 256 bits, then one shared hadd tree (far fewer shuffles
  // than 8 separate reductions).
  static void sum8(const Vec* v, float* out) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i].v), _mm512_extractf32x8_ps(v[i].v, 1));
    hadd_tree8(h, out);
  }
  static Vec round(Vec a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // 2^n for integral-valued n in [-126, 127]: build the exponent field directly.
  static Vec exp2i(Vec n) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
  }
};
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
#elif EFFKERN_ISA_LEVEL == 256
struct Vec {
  static constexpr int W = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const uint16_t* p, bool bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (bf16) return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
    return {_mm256_cvtph_ps(h)};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  void store(uint16_t* p, bool bf16) const {
    __m128i h;
    if (bf16) {
      const __m256i u = _mm256_castps_si256(v), hi = _mm256_srli_epi32(u, 16);
      const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
      rounded = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      // values are < 2^16, so the unsigned-saturating pack is exact
      h = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec relu(Vec x) { return {_mm256_and_ps(x.v, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_NLE_UQ))}; }
  static Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  static Vec abs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
  static Vec select_pos(Vec x, Vec a, Vec b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_NLE_UQ))};
  }
  static void sum8(const Vec* v, float* out) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i) h[i] = v[i].v;
    hadd_tree8(h, out);
  }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static Vec round(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  static Vec exp2i(Vec n) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23))};
  }
};
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
#else
// Portable fallback for CPUs without AVX2/FMA: one lane, plain C++.
struct Vec {
  static constexpr int W = 1;
  float v;
  static Vec zero() { return {0.f}; }
  static Vec set1(float x) { return {x}; }
  static Vec load(const float* p) { return {*p}; }
  static Vec load(const uint16_t* p, bool bf16) { return {half_bits_to_float(*p, bf16)}; }
  void store(float* p) const { *p = v; }
  void stream(float* p) const { *p = v; }
  void store(uint16_t* p, bool bf16) const { *p = float_to_half_bits(v, bf16); }
  static Vec fma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  static Vec max(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  static Vec relu(Vec x) { return {x.v <= 0.f ? 0.f : x.v}; }
  static Vec min(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
  static Vec abs(Vec a) { return {std::fabs(a.v)}; }
  static Vec select_pos(Vec x, Vec a, Vec b) { return {x.v <= 0.f ? b.v : a.v}; }
  float sum() const { return v; }
  float hmax() const { return v; }
  static void sum8(const Vec* v, float* out) {
    for (int i = 0; i < 8; ++i) out[i] = v[i].v;
  }
  static Vec round(Vec a) { return {std::nearbyint(a.v)}; }
  static Vec exp2i(Vec n) {
    uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return {f};
  }
};
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
#endif

// Calls fn(std::integral_constant<DType, dt>{}) for the run-time dtype: one switch for every kernel's entry point.
template <typename Fn>
inline void with_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f32: fn(std::integral_constant<DType, DType::f32>{}); break;
    case DType::f16: fn(std::integral_constant<DType, DType::f16>{}); break;
    case DType::bf16: fn(std::integral_constant<DType, DType::bf16>{}); break;
  }
}

// Element access for the kernels' storage types (DType, common.h), converting to and from fp32.
constexpr int64_t elem_bytes(DType d) { return d == DType::f32 ? 4 : 2; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <DType DT>
inline Vec load_vec(const void* base, int64_t i) {
  if constexpr (DT == DType::f32) {
    return Vec::load(static_cast<const float*>(base) + i);
  } else {
    return Vec::load(static_cast<const uint16_t*>(base) + i, DT == DType::bf16);
  }
}

template <DType DT>
inline void store_vec(void* base, int64_t i, Vec v) {
  if constexpr (DT == DType::f32) {
    v.store(static_cast<float*>(base) + i);
  } else {
    v.store(static_cast<uint16_t*>(base) + i, DT == DType::bf16);
  }
}

template <DType DT>
inline float load_scalar(const void* base, int64_t i) {
  if constexpr (DT == DType::f32) {
    return static_cast<const float*>(base)[i];
  } else {
    return half_bits_to_float(static_cast<const uint16_t*>(base)[i], DT == DType::bf16);
  }
}

template <DType DT>
inline void store_scalar(void* base, int64_t i, float x) {
  if constexpr (DT == DType::f32) {
    static_cast<float*>(base)[i] = x;
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_half_bits(x, DT == DType::bf16);
  }
}

// exp(x) for x <= 0 (softmax arguments), ~2 ulp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-6 polynomial for e^r (Cephes expf coefficients) and 2^n from the exponent bits. Inputs below
// -87.3 are clamped (the result, ~1e-38, is flushed to 0 by the caller where it matters).
inline Vec exp_nonpositive(Vec x) {
  x = Vec::max(Vec::set1(-87.3f), x);  // in this order a NaN stays NaN (max_ps returns its second operand)
  Vec n = Vec::round(x * Vec::set1(1.44269504088896341f));
  Vec r = Vec::fma(n, Vec::set1(-0.693359375f), x);  // ln2 split in a high part exact in fp32...
  r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);      // ...and the low remainder
  Vec p = Vec::set1(1.9875691500e-4f);
  p = Vec::fma(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fma(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fma(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fma(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fma(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::fma(p, r * r, r + Vec::set1(1.f));
  return p * Vec::exp2i(n);
}

}  // namespace effkern::cpu::EFFKERN_ISA
