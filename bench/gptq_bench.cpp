// GPTQ and Hessian accumulation on a Switch-base expert pair: wi 3072x768 (H 768x768) and
// wo 768x3072 (H 3072x3072), Hessians from 4096 calibration tokens (the structured synthetic
// generator for the expert input, relu(x wi^T) for the hidden activations). Every benchmark
// reports the floating-point operations it executes (FLOPs), its rate (GFLOP/s), and the dense
// float GEMM rate measured by this binary in the same run with the same thread count
// (gemm_GFLOP/s, frac_of_gemm: core's gemm, the products the rest of qmoe runs on). GPTQ benchmarks
// also report the relative output error
// ||(W-Q) X^T||^2 / ||W X^T||^2 of GPTQ and of round-to-nearest, and the fraction of zeros.
//
//   bench_gptq --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// The last benchmarks repeat Hessians and GPTQ at switch-c-2048's expert shapes (d_model 2080,
// d_ff 6144), one thread, for extrapolating to that model.
//
// Thread counts: 1 and all (omp_get_max_threads(), or OMP_NUM_THREADS). Single-thread benchmarks
// time CPU time, the others wall time; on a shared machine compare medians of repetitions.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <map>
#include <memory>
#include <vector>

#include <Eigen/Core>

#include "qmoe/core/gemm.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/gptq/synthetic.h"

namespace qmoe {
namespace {

constexpr int64_t kDModel = 768, kDFF = 3072, kTokens = 4096;
// switch-c-2048's expert shape, for the extrapolation to that model.
constexpr int64_t kCDModel = 2080, kCDFF = 6144;

struct ExpertPair {
  int64_t d_model = 0, d_ff = 0;
  std::vector<float> wi, wo;  // d_ff x d_model, d_model x d_ff
  std::vector<float> x, hid;  // kTokens x d_model inputs, kTokens x d_ff hidden activations
  std::vector<float> hi, ho;  // Hessians d_model^2, d_ff^2
};

std::unique_ptr<ExpertPair> make_pair(int64_t d_model, int64_t d_ff) {
  auto e = std::make_unique<ExpertPair>();
  e->d_model = d_model;
  e->d_ff = d_ff;
  e->wi = synthetic::weights(d_ff, d_model, 1);
  e->wo = synthetic::weights(d_model, d_ff, 2);
  e->x = synthetic::activations(kTokens, d_model, 3);
  using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RM> x(e->x.data(), kTokens, d_model), wi(e->wi.data(), d_ff, d_model);
  RM hid = (x * wi.transpose()).cwiseMax(0.0f);
  e->hid.assign(hid.data(), hid.data() + hid.size());
  HessianAccumulator ai(d_model), ao(d_ff);
  ai.add(e->x.data(), kTokens);
  ao.add(e->hid.data(), kTokens);
  e->hi = ai.hessian();
  e->ho = ao.hessian();
  return e;
}

const ExpertPair& pair() {
  static const std::unique_ptr<ExpertPair> p = make_pair(kDModel, kDFF);
  return *p;
}

const ExpertPair& pair_c2048() {
  static const std::unique_ptr<ExpertPair> p = make_pair(kCDModel, kCDFF);
  return *p;
}

int all_threads() {
  return omp_get_max_threads();
}

double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The dense float GEMM rate of core's gemm() (the products every dense layer of qmoe runs on),
// C(m x n) = A(m x k) B(k x n), at `threads`. Returns GFLOP/s, best of 5, measured once per thread
// count. With one thread the time is the thread's CPU time, as for the single-thread benchmarks
// (the machine may be shared); with more, wall time.
double gemm_gflops(int threads) {
  static std::map<int, double> cache;
  if (auto it = cache.find(threads); it != cache.end()) return it->second;
  const int64_t m = 1024, k = 1024, n = 2048;
  const Eigen::MatrixXf a = Eigen::MatrixXf::Random(m, k), b = Eigen::MatrixXf::Random(k, n);
  Eigen::MatrixXf c(m, n);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = thread_cpu_seconds();
    gemm(m, n, k, a.data(), 1, m, b.data(), 1, k, c.data(), 1, m, {.threads = threads});
    const double s =
        threads == 1 ? thread_cpu_seconds() - c0
                     : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(c.data());
    best = std::max(best, 2.0 * m * k * n / s * 1e-9);
  }
  cache[threads] = best;
  return best;
}

double rel_output_error(const std::vector<float>& w, const std::vector<float>& q,
                        const std::vector<float>& x, int64_t rows, int64_t cols) {
  using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RM> wm(w.data(), rows, cols), qm(q.data(), rows, cols),
      xm(x.data(), kTokens, cols);
  const RM d = wm - qm;
  return static_cast<double>((xm * d.transpose()).squaredNorm()) /
         static_cast<double>((xm * wm.transpose()).squaredNorm());
}

void set_rate(benchmark::State& state, double flops, int threads) {
  state.counters["FLOPs"] = flops;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["gemm_GFLOP/s"] = gemm_gflops(threads);
  state.counters["threads"] = threads;
}

void BM_DenseGemm(benchmark::State& state) {
  const int threads = state.range(0) == 0 ? all_threads() : static_cast<int>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(gemm_gflops(threads));
  state.counters["gemm_GFLOP/s"] = gemm_gflops(threads);
  state.counters["threads"] = threads;
}

// range(0): 0 = wi (H 768^2 from the inputs), 1 = wo (H 3072^2 from the hidden activations).
// range(1): threads (0 = all); range(2): 0 = Switch-base, 1 = switch-c-2048 shapes.
void BM_Hessian(benchmark::State& state) {
  const ExpertPair& e = state.range(2) == 1 ? pair_c2048() : pair();
  const bool wo = state.range(0) == 1;
  const int threads = state.range(1) == 0 ? all_threads() : static_cast<int>(state.range(1));
  const int64_t d = wo ? e.d_ff : e.d_model;
  for (auto _ : state) {
    HessianAccumulator acc(d);
    acc.add(wo ? e.hid.data() : e.x.data(), kTokens, 0, threads);
    benchmark::DoNotOptimize(acc.sum().data());
  }
  const double f = hessian_flops(d, kTokens);
  set_rate(state, f, threads);
  state.counters["frac_of_gemm"] = benchmark::Counter(
      f * 1e-9 / gemm_gflops(threads), benchmark::Counter::kIsIterationInvariantRate);
}

// range(0): 0 = wi, 1 = wo; range(1): threads (0 = all); range(2): 0 = Switch-base shapes,
// 1 = switch-c-2048 shapes (wi 6144x2080 with H 2080^2, wo 2080x6144 with H 6144^2).
void BM_Gptq(benchmark::State& state) {
  const ExpertPair& e = state.range(2) == 1 ? pair_c2048() : pair();
  const bool wo = state.range(0) == 1;
  const int threads = state.range(1) == 0 ? all_threads() : static_cast<int>(state.range(1));
  const int64_t rows = wo ? e.d_model : e.d_ff, cols = wo ? e.d_ff : e.d_model;
  const std::vector<float>& w = wo ? e.wo : e.wi;
  const std::vector<float>& h = wo ? e.ho : e.hi;
  GptqOptions opt;
  opt.threads = threads;
  GptqResult r;
  for (auto _ : state) {
    r = gptq_quantize(w.data(), rows, cols, h.data(), opt);
    benchmark::DoNotOptimize(r.ternary.symbols.data());
  }
  const double f = gptq_flops(rows, cols, opt.blocksize);
  set_rate(state, f, threads);
  state.counters["frac_of_gemm"] = benchmark::Counter(
      f * 1e-9 / gemm_gflops(threads), benchmark::Counter::kIsIterationInvariantRate);
  const GptqResult rtn = rtn_quantize(w.data(), rows, cols, opt);
  const std::vector<float>& x = wo ? e.hid : e.x;
  state.counters["relerr_gptq"] = rel_output_error(w, r.ternary.to_dense(), x, rows, cols);
  state.counters["relerr_rtn"] = rel_output_error(w, rtn.ternary.to_dense(), x, rows, cols);
  state.counters["zeros_gptq"] = r.ternary.zero_fraction();
  state.counters["zeros_rtn"] = rtn.ternary.zero_fraction();
}

// Several expert pairs (wi and wo of `experts` experts, sharing data) through
// gptq_quantize_batch: range(1) = threads per matrix (1: parallel across experts; 0: all
// threads inside each matrix, one matrix at a time).
void BM_Batch(benchmark::State& state) {
  const ExpertPair& e = pair();
  const int64_t experts = state.range(0);
  const int threads = all_threads();
  const int per = state.range(1) == 0 ? threads : static_cast<int>(state.range(1));
  std::vector<GptqProblem> probs;
  for (int64_t i = 0; i < experts; ++i) {
    probs.push_back({e.wi.data(), kDFF, kDModel, e.hi.data()});
    probs.push_back({e.wo.data(), kDModel, kDFF, e.ho.data()});
  }
  GptqBatchOptions bo;
  bo.threads = threads;
  bo.threads_per_matrix = per;
  for (auto _ : state) {
    auto res = gptq_quantize_batch(probs, {}, bo);
    benchmark::DoNotOptimize(res.data());
  }
  const double f = static_cast<double>(experts) *
                   (gptq_flops(kDFF, kDModel, 128) + gptq_flops(kDModel, kDFF, 128));
  set_rate(state, f, threads);
  state.counters["threads_per_matrix"] = per;
  state.counters["frac_of_gemm"] = benchmark::Counter(
      f * 1e-9 / gemm_gflops(threads), benchmark::Counter::kIsIterationInvariantRate);
}

// One thread: rates from CPU time (robust on a shared machine). All threads: wall time.
BENCHMARK(BM_DenseGemm)->Arg(1)->Arg(0)->Iterations(1);
BENCHMARK(BM_Hessian)->ArgsProduct({{0, 1}, {1}, {0}})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Hessian)
    ->ArgsProduct({{0, 1}, {0}, {0}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_Gptq)->ArgsProduct({{0, 1}, {1}, {0}})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Gptq)->ArgsProduct({{0, 1}, {0}, {0}})->Unit(benchmark::kMillisecond)->UseRealTime();
// Batch: wall time; the CPU column is the process's CPU time (all threads).
BENCHMARK(BM_Batch)
    ->ArgsProduct({{4}, {1, 0}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Iterations(1);
// switch-c-2048 shapes, one thread (for the extrapolation; the setup takes a while).
BENCHMARK(BM_Hessian)
    ->ArgsProduct({{0, 1}, {1}, {1}})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);
BENCHMARK(BM_Gptq)->ArgsProduct({{0, 1}, {1}, {1}})->Unit(benchmark::kMillisecond)->Iterations(1);

}  // namespace
}  // namespace qmoe

BENCHMARK_MAIN();
