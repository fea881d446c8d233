// RoPE rotation of one head in fp32, shared by the CPU kernels (included before any ISA pragma, so it is
// compiled for the baseline ISA and inlines into every variant).
#pragma once

#include <cstdint>

namespace effkern::cpu {

// Rotate the first 2 * half dims of x by the row's cos/sin [half]. style 0 ("half", HF rotate_half) pairs
// dims (i, i + half); style 1 ("interleaved", GPT-J) pairs (2i, 2i + 1).
inline void rope_rotate(float* x, const float* cos, const float* sin, int64_t half, int64_t style) {
  for (int64_t i = 0; i < half; ++i) {
    const int64_t i0 = style == 0 ? i : 2 * i, i1 = style == 0 ? i + half : 2 * i + 1;
    const float x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * cos[i] - x1 * sin[i];
    x[i1] = x1 * cos[i] + x0 * sin[i];
  }
}

}  // namespace effkern::cpu
