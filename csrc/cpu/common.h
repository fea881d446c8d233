// Shared by the CPU kernels: the element types they read and write, and the run-time SIMD level.
#pragma once

namespace effkern::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The SIMD level the kernels run at: 512 (AVX-512), 256 (AVX2 + FMA + F16C) or 0 (scalar). The best this CPU
// supports, capped by EFFKERN_CPU_ISA=avx512|avx2|generic (tests use it to cover every compiled path on one
// machine; asking for more than the CPU has is an error, not a crash). Defined in isa.cpp.
int isa_level();

}  // namespace effkern::cpu
