// Host-side helpers of the CPU kernels (ATen allowed here, never in the per-ISA kernel headers).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "common.h"

namespace effkern::cpu {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
}

// The launchers' argument checks. The Python entry points check everything with friendlier messages first, but
// torch.compile / export graphs and `torch.ops.effkern.*` callers reach the launchers directly: whatever a kernel
// relies on (shapes, dtypes, index ranges) is checked here too, before the kernel runs. Value errors raise Python's
// ValueError, like the entry points'.

// t is a contiguous tensor of dtype `type` and exactly `shape`.
inline bool is_dense(const at::Tensor& t, at::ScalarType type, at::IntArrayRef shape) {
  return t.scalar_type() == type && t.is_contiguous() && t.sizes() == shape;
}

// The RoPE arguments of gqa_decode / kv_append: rotary_dim R even in [0, D], style 0 (half) or 1 (interleaved), and
// when R > 0, cos and sin contiguous fp32 [B, R/2].
inline void check_rope(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, int64_t B,
                       int64_t D, int64_t rope_style, int64_t rotary_dim, const char* op) {
  TORCH_CHECK_VALUE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= D, op,
                    ": rotary_dim must be even and within [0, D=", D, "], got ", rotary_dim);
  TORCH_CHECK_VALUE(rope_style == 0 || rope_style == 1, op, ": rope_style must be 0 (half) or 1 (interleaved), got ",
                    rope_style);
  if (rotary_dim == 0) return;
  for (const auto& [name, t] : {std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
    TORCH_CHECK_VALUE(*t && is_dense(**t, at::kFloat, {B, rotary_dim / 2}), op, ": ", name,
                      " must be a contiguous float32 [B=", B, ", R/2=", rotary_dim / 2, "] tensor when rotary_dim > 0");
  }
}

// An int32 index vector [n] (seq_lens, kv_start, slots) and its values: lo[i] <= t[i] <= hi[i] for every i; the
// error names the first value outside, with `range` saying what the bounds are.
template <typename Lo, typename Hi>
inline const int32_t* check_indices(const at::Tensor& t, int64_t n, Lo lo, Hi hi, const char* name, const char* range,
                                    const char* op) {
  TORCH_CHECK_VALUE(is_dense(t, at::kInt, {n}), op, ": ", name, " must be a contiguous int32 [", n, "] tensor, got ",
                    t.scalar_type(), " ", t.sizes());
  const int32_t* v = t.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= lo(i) && v[i] <= hi(i), op, ": ", name, "[", i, "] = ", v[i], " is outside [", lo(i),
                      ", ", hi(i), "] (", range, ")");
  }
  return v;
}

// Flush denormals to zero (MXCSR FTZ + DAZ) on this thread while alive. Softmax probabilities far below their
// row's max reach the denormal range, and on x86 every FMA that reads or produces one takes a microcode assist:
// measured, a LAST training epoch (low_rank_attention backward) ran several times slower as the logits sharpened
// (README "Backends").
// Results change only below FLT_MIN (1.2e-38). Construct one inside each worker thread's lambda.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// fn(begin, end, scratch, thread) over chunks of [0, n) on ATen's thread pool (at least `grain` items a chunk).
// Each chunk gets `scratch_floats` floats of scratch of its own and the index of the thread running it, below
// at::get_num_threads(), for kernels that accumulate into per-thread slices.
template <typename Fn>
void parallel_chunks(int64_t n, int64_t grain, int64_t scratch_floats, Fn&& fn) {
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "parallel_chunks: thread index ", thread, " beyond the pool's ", threads);
    std::vector<float> scratch(scratch_floats);
    fn(begin, end, scratch.data(), thread);
  });
}

// out[b][i][j] (out[b][j][i] when `transpose`) = the sum over threads t of acc[t][b][i][j], for j below out's
// width, in out's dtype: the per-thread fp32 weight-gradient slices ([threads][B][I][ld], padded rows) of a
// backward folded into its output in one pass, in place of ATen's sum + narrow + transpose + to + contiguous
// (five dispatches and three temporaries per gradient).
inline void sum_threads(const float* acc, int64_t threads, int64_t B, int64_t I, int64_t ld, const at::Tensor& out,
                        bool transpose) {
  const int64_t J = transpose ? out.size(-2) : out.size(-1), slice = B * I * ld;
  if (J == 0 || B * I == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum_threads", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * I, std::max<int64_t>(1, 16384 / (J * threads)), [&](int64_t begin, int64_t end) {
      std::vector<float> sum(J);
      for (int64_t bi = begin; bi < end; ++bi) {
        std::copy(acc + bi * ld, acc + bi * ld + J, sum.begin());
        for (int64_t t = 1; t < threads; ++t) {
          const float* a = acc + t * slice + bi * ld;
          for (int64_t j = 0; j < J; ++j) sum[j] += a[j];
        }
        const int64_t b = bi / I, i = bi % I;
        for (int64_t j = 0; j < J; ++j) o[transpose ? (b * J + j) * I + i : bi * J + j] = static_cast<scalar_t>(sum[j]);
      }
    });
  });
}

}  // namespace effkern::cpu
