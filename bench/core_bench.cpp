// core's gemm() (qmoe/core/gemm.h) against OpenBLAS's cblas_sgemm and Eigen, at the shapes qmoe
// multiplies: Y = X W^T of a linear layer (X tokens x in, W out x in, both row-major) for
// switch-base and switch-c-2048 expert and attention shapes, and the 256 x 256 x 512 block
// products of the Hessian sums. Reports GFLOP/s (2 m n k per call).
//
//   bench_core --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// Thread counts 1 and 2 (gemm's own OpenMP tasks; openblas_set_num_threads for OpenBLAS; Eigen
// runs single-threaded, as qmoe builds it). qmoe's benchmarks run first: OpenBLAS's worker threads
// spin for a while after each call and would take a core from anything timed after them.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "qmoe/core/gemm.h"

#if defined(QMOE_BENCH_OPENBLAS)
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);
#endif

namespace {

struct Shape {
  const char* name;
  int64_t rows, out, in;
};

// Tokens x out x in.
const Shape kShapes[] = {
    {"base_wi_2048tok", 2048, 3072, 768},    // switch-base expert wi over 2048 routed tokens
    {"base_wo_2048tok", 2048, 768, 3072},    // its wo
    {"base_attn_4096tok", 4096, 768, 768},   // a q/k/v/o projection
    {"c2048_wi_2048tok", 2048, 6144, 2080},  // switch-c-2048 expert wi
    {"c2048_wo_2048tok", 2048, 2080, 6144},  // its wo
    {"hessian_tile", 256, 256, 512},         // one block product of the Hessian sums (x^T x)
    {"small_wi_160tok", 160, 2048, 512},     // an expert of a batch of 8 pairs
};

struct Operands {
  std::vector<float> x, w, y;
};

const Operands& operands(const Shape& s) {
  static std::vector<Operands> cache(std::size(kShapes));
  Operands& o = cache[static_cast<size_t>(&s - kShapes)];
  if (o.x.empty()) {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    o.x.resize(static_cast<size_t>(s.rows * s.in));
    o.w.resize(static_cast<size_t>(s.out * s.in));
    o.y.resize(static_cast<size_t>(s.rows * s.out));
    for (float& v : o.x) v = nd(rng);
    for (float& v : o.w) v = nd(rng);
  }
  return o;
}

void report(benchmark::State& st, const Shape& s) {
  const double flops = 2.0 * static_cast<double>(s.rows * s.out * s.in);
  st.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(s.name);
}

void BM_Qmoe(benchmark::State& st) {
  const Shape& s = kShapes[st.range(0)];
  auto& o = const_cast<Operands&>(operands(s));
  const int threads = static_cast<int>(st.range(1));
  for (auto _ : st) {
    qmoe::matmul_xwt(s.rows, s.out, s.in, o.x.data(), s.in, o.w.data(), o.y.data(), s.out,
                     {.threads = threads});
    benchmark::DoNotOptimize(o.y.data());
  }
  report(st, s);
  st.counters["level"] = qmoe::gemm_level() == "avx512" ? 512
                         : qmoe::gemm_level() == "avx2" ? 2
                                                        : 0;
}

void BM_Eigen(benchmark::State& st) {
  const Shape& s = kShapes[st.range(0)];
  auto& o = const_cast<Operands&>(operands(s));
  using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (auto _ : st) {
    Eigen::Map<RM> y(o.y.data(), s.rows, s.out);
    y.noalias() = Eigen::Map<const RM>(o.x.data(), s.rows, s.in) *
                  Eigen::Map<const RM>(o.w.data(), s.out, s.in).transpose();
    benchmark::DoNotOptimize(o.y.data());
  }
  report(st, s);
}

#if defined(QMOE_BENCH_OPENBLAS)
void BM_OpenBlas(benchmark::State& st) {
  const Shape& s = kShapes[st.range(0)];
  auto& o = const_cast<Operands&>(operands(s));
  openblas_set_num_threads(static_cast<int>(st.range(1)));
  for (auto _ : st) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(s.rows),
                static_cast<int>(s.out), static_cast<int>(s.in), 1.0f, o.x.data(),
                static_cast<int>(s.in), o.w.data(), static_cast<int>(s.in), 0.0f, o.y.data(),
                static_cast<int>(s.out));
    benchmark::DoNotOptimize(o.y.data());
  }
  report(st, s);
}
#endif

void args(benchmark::internal::Benchmark* b, bool threads) {
  const int all = omp_get_max_threads();
  for (int64_t i = 0; i < static_cast<int64_t>(std::size(kShapes)); ++i) {
    b->Args({i, 1});
    if (threads && all > 1) b->Args({i, all});
  }
  b->ArgNames({"shape", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Qmoe)->Apply([](auto* b) { args(b, true); });
BENCHMARK(BM_Eigen)->Apply([](auto* b) { args(b, false); });
#if defined(QMOE_BENCH_OPENBLAS)
BENCHMARK(BM_OpenBlas)->Apply([](auto* b) { args(b, true); });
#endif

}  // namespace

BENCHMARK_MAIN();
