// Run-time choice of the matrix product kernels of qmoe_gptq (gemm_kernels.h).
#include <algorithm>
#include <string>
#include <vector>

#include "gemm.h"
#include "gemm_kernels.h"
#include "qmoe/format/cpu_env.h"
#include "qmoe/format/error.h"

namespace qmoe::gptq_detail {
namespace {

// The kernels this build has and this CPU runs, lowest first.
std::vector<GemmKernel> runnable() {
  std::vector<GemmKernel> out;
#if defined(QMOE_GPTQ_X86_KERNELS)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    out.push_back(gemm_kernel_avx2());
    if (__builtin_cpu_supports("avx512f")) out.push_back(gemm_kernel_avx512());
  }
#endif
  return out;
}

const std::vector<GemmKernel>& kernels() {
  static const std::vector<GemmKernel> k = runnable();
  return k;
}

}  // namespace

const GemmKernel* find_gemm_kernel(const char* level) {
  for (const GemmKernel& k : kernels()) {
    if (std::string(level) == k.name) return &k;
  }
  return nullptr;
}

const GemmKernel* active_gemm_kernel() {
  static const GemmKernel* const active = []() -> const GemmKernel* {
    const auto requested = requested_cpu_simd();
    if (!requested) return kernels().empty() ? nullptr : &kernels().back();
    if (*requested == "scalar") return nullptr;
    if (const GemmKernel* k = find_gemm_kernel(std::string(*requested).c_str())) return k;
    throw InvalidArgument("QMOE_CPU_SIMD='" + std::string(*requested) +
                          "' is not a level this CPU or build runs");
  }();
  return active;
}

int64_t gemm_scratch_floats(const GemmKernel& kernel, int64_t m, int64_t n, int64_t k) {
  auto up = [](int64_t x, int64_t b) { return (x + b - 1) / b * b; };
  // Either orientation (gemm may compute the transposed product).
  return std::max(up(m, kernel.rows) + up(n, kernel.cols),
                  up(n, kernel.rows) + up(m, kernel.cols)) *
         k;
}

void run_gemm(const GemmKernel& kernel, int mode, int64_t m, int64_t n, int64_t k, const float* a,
              int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs, float* c,
              int64_t c_rs, int64_t c_cs, std::vector<float>& scratch) {
  const auto need = static_cast<size_t>(gemm_scratch_floats(kernel, m, n, k));
  if (scratch.size() < need) scratch.resize(need);
  Gemm g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.a_rs = a_rs;
  g.a_cs = a_cs;
  g.b = b;
  g.b_rs = b_rs;
  g.b_cs = b_cs;
  g.c = c;
  g.c_rs = c_rs;
  g.c_cs = c_cs;
  g.mode = mode;
  g.scratch = scratch.data();
  kernel.fn(g);
}

}  // namespace qmoe::gptq_detail
