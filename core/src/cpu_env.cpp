#include "qmoe/core/cpu_env.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>

#include "qmoe/core/error.h"

namespace qmoe {

namespace {
constexpr std::array<std::string_view, 3> kLevels = {"scalar", "avx2", "avx512"};
std::atomic<int> g_level{-1};  // set_cpu_simd(): an index into kLevels, -1 when unset
}  // namespace

std::optional<std::string_view> requested_cpu_simd() {
  const char* env = std::getenv("QMOE_CPU_SIMD");
  if (env == nullptr || *env == '\0') return std::nullopt;
  for (std::string_view level : kLevels) {
    if (level == env) return level;
  }
  throw InvalidArgument(std::string("QMOE_CPU_SIMD='") + env +
                        "' is not one of scalar, avx2, avx512");
}

std::optional<std::string_view> cpu_simd() {
  const int l = g_level.load(std::memory_order_acquire);
  if (l >= 0) return kLevels[static_cast<size_t>(l)];
  // Read once: the GEMM asks at every call, and the environment does not change under a run.
  static const std::optional<std::string_view> env = requested_cpu_simd();
  return env;
}

void set_cpu_simd(std::optional<std::string_view> level) {
  if (!level) {
    g_level.store(-1, std::memory_order_release);
    return;
  }
  for (size_t i = 0; i < kLevels.size(); ++i) {
    if (kLevels[i] == *level) {
      g_level.store(static_cast<int>(i), std::memory_order_release);
      return;
    }
  }
  throw InvalidArgument("set_cpu_simd: '" + std::string(*level) +
                        "' is not one of scalar, avx2, avx512");
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    c.avx512 = c.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    c.g4_int8 = c.avx512 && __builtin_cpu_supports("avx512vbmi") &&
                __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vnni") &&
                __builtin_cpu_supports("gfni");
#endif
    return c;
  }();
  return f;
}

}  // namespace qmoe
