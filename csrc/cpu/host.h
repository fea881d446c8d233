// Host-side helpers of the CPU kernels (ATen allowed here, never in the per-ISA kernel headers).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace effkern::cpu
