#include "qmoe/core/cpu_env.h"

#include <cstdlib>
#include <string>

#include "qmoe/core/error.h"

namespace qmoe {

std::optional<std::string_view> requested_cpu_simd() {
  const char* env = std::getenv("QMOE_CPU_SIMD");
  if (env == nullptr || *env == '\0') return std::nullopt;
  for (std::string_view level : {"scalar", "avx2", "avx512"}) {
    if (level == env) return level;
  }
  throw InvalidArgument(std::string("QMOE_CPU_SIMD='") + env +
                        "' is not one of scalar, avx2, avx512");
}

}  // namespace qmoe
