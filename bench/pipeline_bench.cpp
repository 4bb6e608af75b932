// `qmoe compress` end to end on a generated switch-base-8-shaped checkpoint (8 experts x 6 sparse
// blocks in encoder and decoder, d_model 768, d_ff 3072, fp32: 192 expert matrices, 453 M expert
// weights, 2.5 GB): experts per second (an expert = its wi and wo), expert weights per second and
// bits per expert weight, for round to nearest (1 thread and all threads) and for GPTQ (all
// threads; Hessians from an in-memory provider, see below).
//
//   bench_pipeline [--benchmark_filter=Rtn]    (QMOE_BENCH_DIR=... to keep the checkpoint)
//
// The checkpoint is generated once per process under QMOE_BENCH_DIR (default: the temp folder)
// and reused when it is already there. The time includes reading the checkpoint (page cache
// warm after the first run), writing the work files and assembling the container.
#include <benchmark/benchmark.h>
#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>

#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"

namespace qmoe {
namespace {
namespace fs = std::filesystem;

fs::path bench_dir() {
  const char* d = std::getenv("QMOE_BENCH_DIR");
  return d ? fs::path(d) : fs::temp_directory_path() / "qmoe_bench_pipeline";
}

const fs::path& checkpoint() {
  static const fs::path p = [] {
    const fs::path dir = bench_dir() / "switch-base-8";
    if (!fs::exists(dir / "config.json") || !fs::exists(dir / "model.safetensors"))
      sw::generate_checkpoint(dir, sw::generate_preset("switch-base-8"));
    return dir;
  }();
  return p;
}

// GPTQ needs a Hessian per expert matrix. A Hessian file for this checkpoint would take 7.6 GB (the
// 96 wo Hessians are 3072 x 3072 float64), so Hessians come from a provider that builds
// H = I + v v^T / cols (v Gaussian, seeded by the matrix) in memory: GPTQ's work (factorisation,
// column sweep) does not depend on H's values, only its size.
class SyntheticHessians final : public sw::HessianProvider {
 public:
  std::string describe() const override { return "synthetic (benchmark)"; }
  std::string fingerprint() const override { return "synthetic-1"; }
  void validate(std::span<const sw::ExpertMatrix>) const override {}
  std::vector<float> hessian(const sw::ExpertMatrix& m, int64_t& tokens) const override {
    const int64_t d = m.cols;
    std::mt19937_64 rng(std::hash<std::string>{}(m.name));
    std::normal_distribution<float> nd;
    std::vector<float> v(static_cast<size_t>(d)), h(static_cast<size_t>(d * d));
    for (auto& x : v) x = nd(rng);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j)
        h[static_cast<size_t>(i * d + j)] =
            (i == j ? 1.0f : 0.0f) + v[i] * v[j] / static_cast<float>(d);
    tokens = 2 * d;
    return h;
  }
};

void run(benchmark::State& state, int threads, bool gptq) {
  const fs::path ck = checkpoint();
  const fs::path out = bench_dir() / ("out-" + std::to_string(::getpid()) + ".safetensors");
  SyntheticHessians hess;
  sw::CompressOptions opt;
  opt.threads = threads;
  if (gptq) opt.hessians = &hess;
  sw::CompressSummary s;
  for (auto _ : state) {
    s = sw::compress_checkpoint(ck, out, opt);
    fs::remove(out);
  }
  const double experts = static_cast<double>(s.expert_matrices) / 2.0;
  state.counters["threads"] = threads;
  state.counters["experts/s"] = benchmark::Counter(
      experts * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["weights/s"] = benchmark::Counter(
      static_cast<double>(s.expert_weights) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
  state.counters["bits_per_expert_weight"] = s.bits_per_expert_weight();
  state.counters["zero_fraction"] = s.mean_zero_fraction;
  state.counters["compress_s"] = s.compress_seconds;
  state.counters["assemble_s"] = s.assemble_seconds;
  state.counters["input_MB"] = static_cast<double>(s.input_bytes) / 1e6;
  state.counters["output_MB"] = static_cast<double>(s.output_bytes) / 1e6;
}

void BM_CompressRtn(benchmark::State& state) {
  run(state, static_cast<int>(state.range(0)), false);
}
void BM_CompressGptq(benchmark::State& state) {
  run(state, static_cast<int>(state.range(0)), true);
}

BENCHMARK(BM_CompressRtn)->Arg(1)->Iterations(1)->UseRealTime()->Unit(benchmark::kSecond);
BENCHMARK(BM_CompressRtn)
    ->Arg(omp_get_max_threads())
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kSecond);
BENCHMARK(BM_CompressGptq)
    ->Arg(omp_get_max_threads())
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kSecond);

}  // namespace
}  // namespace qmoe

BENCHMARK_MAIN();
