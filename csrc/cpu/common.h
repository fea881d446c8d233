// Shared by the CPU kernels: the element types they read and write, and the run-time SIMD level.
#pragma once

// Fully unrolls the next loop over a register tile's rows or vectors. GCC peels at most 16 iterations by itself; a
// 24-row tile left rolled kept its accumulators on the stack (a load + FMA + store per FMA: measured much slower than
// the unrolled tile; README "Backends").
#define EFFKERN_UNROLL _Pragma("GCC unroll 32")

namespace effkern::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The SIMD level the kernels run at: 512 (AVX-512), 256 (AVX2 + FMA + F16C) or 0 (scalar). The best this CPU
// supports, capped by EFFKERN_CPU_ISA=avx512|avx2|generic (tests use it to cover every compiled path on one
// machine; asking for more than the CPU has is an error, not a crash). Defined in isa.cpp.
int isa_level();

// Declares the same functions in each per-ISA namespace (their definitions: kernels_isa.cpp).
#define EFFKERN_PER_ISA(...)       \
  namespace avx512 {               \
  __VA_ARGS__                      \
  }                                \
  namespace avx2 {                 \
  __VA_ARGS__                      \
  }                                \
  namespace generic {              \
  __VA_ARGS__                      \
  }

// The variant of a per-ISA function for the level the kernels run at (isa_level()).
template <typename Fn>
Fn pick_isa(Fn avx512, Fn avx2, Fn generic) {
  const int level = isa_level();
  return level == 512 ? avx512 : level == 256 ? avx2 : generic;
}

}  // namespace effkern::cpu
