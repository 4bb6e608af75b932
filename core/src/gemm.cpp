// gemm(): argument checks, the run-time choice of level and the split into tasks over threads.
#include "qmoe/core/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "gemm_kernels.h"
#include "qmoe/core/cpu_env.h"
#include "qmoe/core/error.h"

namespace qmoe {
namespace {

using core_detail::GemmArgs;
using core_detail::GemmKernel;

// The levels this build has and this CPU runs, lowest first.
std::vector<GemmKernel> runnable() {
  std::vector<GemmKernel> out{core_detail::gemm_kernel_portable()};
#if defined(QMOE_CORE_X86_KERNELS)
  if (cpu_features().avx2) {
    out.push_back(core_detail::gemm_kernel_avx2());
    if (cpu_features().avx512) out.push_back(core_detail::gemm_kernel_avx512());
  }
#endif
  return out;
}

const std::vector<GemmKernel>& kernels() {
  static const std::vector<GemmKernel> k = runnable();
  return k;
}

const GemmKernel* find(std::string_view level) {
  for (const GemmKernel& k : kernels())
    if (level == k.name) return &k;
  return nullptr;
}

// The kernel of the process-wide level (cpu_simd(), looked up at each call: a few compares).
const GemmKernel& active() {
  const auto requested = cpu_simd();
  if (!requested) return kernels().back();
  const std::string_view want = *requested == "scalar" ? "portable" : *requested;
  if (const GemmKernel* f = find(want)) return *f;
  throw InvalidArgument("CPU SIMD level '" + std::string(*requested) +
                        "' (QMOE_CPU_SIMD or set_simd_level()) is not a level this CPU or build "
                        "runs for the GEMM");
}

// 64-byte aligned scratch of one task, kept per thread.
float* task_scratch() {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buf;
  if (!buf) {
    const size_t bytes = sizeof(float) * static_cast<size_t>(core_detail::kTaskScratchFloats);
    buf.reset(static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    if (!buf) throw std::bad_alloc();
  }
  return buf.get();
}

void run(const GemmKernel& kernel, const GemmArgs& g, int threads) {
  if (g.m == 0 || g.n == 0) return;
  const int64_t tr = core_detail::kTaskRows, tc = core_detail::kTaskCols;
  const int64_t row_tasks = (g.m + tr - 1) / tr, col_tasks = (g.n + tc - 1) / tc;
  const int64_t tasks = row_tasks * col_tasks;
  // Products of a few million multiply-adds finish in about the time it takes to wake a thread
  // team: they run in the calling thread.
  constexpr double kParallelWork = 4e6;
  const bool small = static_cast<double>(g.m) * static_cast<double>(g.n) *
                         static_cast<double>(std::max<int64_t>(g.k, 1)) <
                     kParallelWork;
  const int nth = threads == 1 || small || omp_in_parallel()
                      ? 1
                      : static_cast<int>(std::min<int64_t>(
                            threads > 0 ? threads : omp_get_max_threads(), tasks));
  auto one = [&](int64_t t) {
    // Column blocks outside: consecutive tasks share rows of A (read in place) while B differs.
    const int64_t ti = t % row_tasks, tj = t / row_tasks;
    const int64_t i0 = ti * tr, j0 = tj * tc;
    kernel.task(g, i0, std::min(g.m, i0 + tr), j0, std::min(g.n, j0 + tc), task_scratch());
  };
  if (nth <= 1) {
    for (int64_t t = 0; t < tasks; ++t) one(t);
    return;
  }
  // Buffers are allocated on first use in each thread; an allocation failure inside the region
  // is carried out of it.
  std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
  for (int64_t t = 0; t < tasks; ++t) {
    try {
      one(t);
    } catch (...) {
#pragma omp critical(qmoe_gemm_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

GemmArgs make_args(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
                   const float* b, int64_t b_rs, int64_t b_cs, float* c, int64_t c_rs, int64_t c_cs,
                   const GemmOptions& opt) {
  if (m < 0 || n < 0 || k < 0) throw InvalidArgument("gemm: negative size");
  if ((m > 0 && k > 0 && a == nullptr) || (n > 0 && k > 0 && b == nullptr) ||
      (m > 0 && n > 0 && c == nullptr))
    throw InvalidArgument("gemm: null operand");
  if (opt.relu && opt.mode != GemmMode::kSet)
    throw InvalidArgument("gemm: relu goes with GemmMode::kSet only");
  GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = a, g.a_rs = a_rs, g.a_cs = a_cs;
  g.b = b, g.b_rs = b_rs, g.b_cs = b_cs;
  g.c = c, g.c_rs = c_rs, g.c_cs = c_cs;
  g.mode = opt.mode == GemmMode::kSet ? 0 : opt.mode == GemmMode::kAdd ? 1 : -1;
  g.relu = opt.relu;
  if (g.c_cs != 1 && g.c_rs == 1) {
    // C stored by columns: compute C^T = B^T A^T instead, so that the tiles are written along C's
    // contiguous direction. Every entry is the same chain (the products commute exactly).
    GemmArgs t = g;
    t.m = g.n, t.n = g.m;
    t.a = g.b, t.a_rs = g.b_cs, t.a_cs = g.b_rs;
    t.b = g.a, t.b_rs = g.a_cs, t.b_cs = g.a_rs;
    t.c_rs = g.c_cs, t.c_cs = 1;
    return t;
  }
  return g;
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
          const float* b, int64_t b_rs, int64_t b_cs, float* c, int64_t c_rs, int64_t c_cs,
          const GemmOptions& opt) {
  const GemmArgs g = make_args(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, opt);
  run(active(), g, opt.threads);
}

std::string_view gemm_level() {
  return active().name;
}

namespace detail {
bool gemm_at_level(std::string_view level, int64_t m, int64_t n, int64_t k, const float* a,
                   int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs, float* c,
                   int64_t c_rs, int64_t c_cs, const GemmOptions& opt) {
  const GemmKernel* kernel = find(level);
  if (kernel == nullptr) return false;
  run(*kernel, make_args(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, opt), opt.threads);
  return true;
}
}  // namespace detail

}  // namespace qmoe
