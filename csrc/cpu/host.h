// Host-side helpers of the CPU kernels (ATen allowed here, never in the per-ISA kernel headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace effkern::cpu
