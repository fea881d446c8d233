// The CPU kernels' work items compiled three times: AVX-512 (16 fp32 lanes), AVX2 + FMA + F16C (8 lanes) and
// the build's baseline (scalar, for CPUs without AVX2). The host files (gqa_decode.cpp, ...) pick one at run
// time (common.h: isa_level), so one binary is both portable and fast.
// Only headers without std:: template instantiations may follow the first pragma.
#include <immintrin.h>  // GCC 12 warns falsely (-Wmaybe-uninitialized) inside its AVX-512 reductions:
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gqa_decode.h"
#include "low_rank_attention.h"
#include "low_rank_embedding.h"
#include "low_rank_linear.h"
#include "residual_layer_norm.h"
#include "rope.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define EFFKERN_ISA avx512
#define EFFKERN_ISA_LEVEL 512
#include "simd.h"
#include "gqa_decode_kernel.h"
#include "low_rank_attention_kernel.h"
#include "low_rank_embedding_kernel.h"
#include "low_rank_linear_kernel.h"
#include "residual_layer_norm_kernel.h"
#undef EFFKERN_ISA
#undef EFFKERN_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define EFFKERN_ISA avx2
#define EFFKERN_ISA_LEVEL 256
#include "simd.h"
#include "gqa_decode_kernel.h"
#include "low_rank_attention_kernel.h"
#include "low_rank_embedding_kernel.h"
#include "low_rank_linear_kernel.h"
#include "residual_layer_norm_kernel.h"
#undef EFFKERN_ISA
#undef EFFKERN_ISA_LEVEL
#pragma GCC pop_options

#define EFFKERN_ISA generic
#define EFFKERN_ISA_LEVEL 0
#include "simd.h"
#include "gqa_decode_kernel.h"
#include "low_rank_attention_kernel.h"
#include "low_rank_embedding_kernel.h"
#include "low_rank_linear_kernel.h"
#include "residual_layer_norm_kernel.h"
