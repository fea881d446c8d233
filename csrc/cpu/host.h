// Host-side helpers of the CPU kernels (ATen allowed here, never in the per-ISA kernel headers).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

// Flush denormals to zero (MXCSR FTZ + DAZ) on this thread while alive. Softmax probabilities far below their
// row's max reach the denormal range, and on x86 every FMA that reads or produces one takes a microcode assist:
// measured, a LAST training epoch (low_rank_attention backward) grew 1.5 -> 9.4 s as the logits sharpened.
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
