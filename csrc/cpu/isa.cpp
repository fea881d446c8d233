// Run-time SIMD level of the CPU kernels and the host-side dtype mapping (common.h, host.h).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "../ops.h"
#include "common.h"

namespace effkern {

int cpu::isa_level() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const int best = avx512 ? 512 : avx2 ? 256 : 0;
  const char* want = std::getenv("EFFKERN_CPU_ISA");
  if (want == nullptr || *want == '\0') return best;
  const int asked = std::strcmp(want, "avx512") == 0 ? 512 : std::strcmp(want, "avx2") == 0 ? 256
                    : std::strcmp(want, "generic") == 0 ? 0 : -1;
  TORCH_CHECK(asked >= 0, "EFFKERN_CPU_ISA must be avx512, avx2 or generic, got '", want, "'");
  TORCH_CHECK(asked <= best, "EFFKERN_CPU_ISA=", want, " is not supported by this CPU");
  return asked;
}

const char* cpu_isa() {
  const int level = cpu::isa_level();
  return level == 512 ? "avx512" : level == 256 ? "avx2" : "generic";
}

}  // namespace effkern
