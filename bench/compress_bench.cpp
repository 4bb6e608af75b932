// Calibrated compression (the block loop of switch/block_loop.h), phase by phase, with the dense
// fp32 GEMM rate of core's gemm() measured by this binary in the same run and thread count:
//
//   BM_DenseGemm/threads        the reference: Y = X W^T, 2048 x 2048 x 2048 (best of 3)
//   BM_Base8Calibrated/threads  `qmoe compress --calib-tokens` of a switch-base-8-shaped
//                               checkpoint (12 + 12 blocks, every other one sparse with 8 experts,
//                               d_model 768, d_ff 3072, f32), 32 pairs of 128 + 32 tokens
//   BM_C2048Block/threads       one switch-c-2048-shaped block: 64 experts of 2080 x 6144 (bf16),
//                               30 heads of 64, with 2,500 calibration tokens per expert
//                               (160,000 tokens), as c-2048 sees them with QMoE-sized
//                               calibration (10,000 samples of 512 encoder tokens over 2,048
//                               experts); only this block's experts are compressed
//
// Counters: per phase <phase>_s (seconds; pool work as thread-seconds / threads) and
// <phase>_GFLOP/s; calib_GFLOP/s and calib_frac_of_gemm for forward + Hessians; gemm_GFLOP/s;
// peak_rss_MB (of the process so far: run one benchmark per process to read it), spilled_blocks.
//
//   bench_compress --benchmark_filter='DenseGemm|Base8'
//   QMOE_BENCH_MAX_MEMORY=3G bench_compress --benchmark_filter='C2048Block/threads:2'
//
// QMOE_BENCH_DIR (default: the temp folder) keeps the generated checkpoints between runs;
// QMOE_BENCH_C2048_TOKENS_PER_EXPERT changes the 2,500.
#include <benchmark/benchmark.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "qmoe/core/gemm.h"
#include "qmoe/switch/block_loop.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"

namespace qmoe {
namespace {
namespace fs = std::filesystem;

fs::path bench_dir() {
  const char* d = std::getenv("QMOE_BENCH_DIR");
  return d ? fs::path(d) : fs::temp_directory_path() / "qmoe_bench_compress";
}

int64_t env_bytes(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  double x = std::strtod(v, &end);
  const std::string suf = end ? end : "";
  if (suf == "K" || suf == "k") x *= 1024;
  if (suf == "M" || suf == "m") x *= 1024.0 * 1024;
  if (suf == "G" || suf == "g") x *= 1024.0 * 1024 * 1024;
  return static_cast<int64_t>(x);
}

// The dense fp32 GEMM rate of core's gemm() at `threads`, measured once per thread count.
double gemm_rate(int threads) {
  static std::map<int, double> cache;
  if (auto it = cache.find(threads); it != cache.end()) return it->second;
  const int64_t n = 2048;
  std::vector<float> x(static_cast<size_t>(n * n)), w(x.size()), y(x.size());
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  for (float& v : x) v = nd(rng);
  for (float& v : w) v = nd(rng);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    matmul_xwt(n, n, n, x.data(), n, w.data(), y.data(), n, {.threads = threads});
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n * n * n) / s * 1e-9);
  }
  cache[threads] = best;
  return best;
}

sw::GenerateTokensOptions tokens_options(int64_t vocab, int64_t pairs, int64_t enc, int64_t dec) {
  sw::GenerateTokensOptions t;
  t.vocab_size = vocab;
  t.pairs = pairs;
  t.encoder_length = enc;
  t.decoder_length = dec;
  return t;
}

double peak_rss_mb() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

void report(benchmark::State& st, const sw::LoopReport& r, int threads) {
  const double gemm = gemm_rate(threads);
  auto wall = [&](const sw::PhaseStats& p) {
    return p.thread_seconds ? p.seconds / std::max(1, r.threads) : p.seconds;
  };
  const std::pair<const char*, const sw::PhaseStats*> phases[] = {
      {"load", &r.load},     {"forward", &r.forward}, {"hessians", &r.hessians}, {"gptq", &r.gptq},
      {"encode", &r.encode}, {"write", &r.write},     {"outputs", &r.outputs}};
  for (const auto& [name, p] : phases) {
    const double w = wall(*p);
    st.counters[std::string(name) + "_s"] = w;
    if (p->flops > 0) st.counters[std::string(name) + "_GFLOP/s"] = w > 0 ? p->flops / w * 1e-9 : 0;
  }
  const double cs = wall(r.forward) + wall(r.hessians);
  const double cf = r.forward.flops + r.hessians.flops;
  st.counters["calib_GFLOP/s"] = cs > 0 ? cf / cs * 1e-9 : 0;
  st.counters["calib_frac_of_gemm"] = cs > 0 ? cf / cs * 1e-9 / gemm : 0;
  st.counters["gptq_frac_of_gemm"] =
      wall(r.gptq) > 0 ? r.gptq.flops / wall(r.gptq) * 1e-9 / gemm : 0;
  st.counters["gemm_GFLOP/s"] = gemm;
  st.counters["loop_s"] = r.seconds;
  st.counters["matrices"] = static_cast<double>(r.matrices);
  st.counters["spilled_blocks"] = static_cast<double>(r.spilled_blocks);
  st.counters["peak_rss_MB"] = peak_rss_mb();
}

void BM_DenseGemm(benchmark::State& st) {
  const int threads = static_cast<int>(st.range(0));
  for (auto _ : st) benchmark::DoNotOptimize(gemm_rate(threads));
  st.counters["gemm_GFLOP/s"] = gemm_rate(threads);
  st.SetLabel(std::string(gemm_level()));
}

void BM_Base8Calibrated(benchmark::State& st) {
  const int threads = static_cast<int>(st.range(0));
  const fs::path dir = bench_dir() / "switch-base-8";
  if (!fs::exists(dir / "config.json") || !fs::exists(dir / "model.safetensors"))
    sw::generate_checkpoint(dir, sw::generate_preset("switch-base-8"));
  const fs::path tokens = dir / "calibration_32x160.safetensors";
  if (!fs::exists(tokens)) sw::generate_tokens(tokens_options(32128, 32, 128, 32)).save(tokens);
  gemm_rate(threads);  // measured before, not after, the compression
  sw::CompressSummary s;
  for (auto _ : st) {
    const fs::path out = bench_dir() / "base8.qmoe.safetensors";
    std::error_code ec;
    fs::remove(out, ec);
    sw::CompressOptions opt;
    opt.threads = threads;
    opt.calib_tokens = tokens;
    opt.max_memory = env_bytes("QMOE_BENCH_MAX_MEMORY");
    s = sw::compress_checkpoint(dir, out, opt);
    fs::remove(out, ec);
  }
  report(st, s.loop, threads);
  st.counters["assemble_s"] = s.assemble_seconds;
  st.counters["bits_per_weight"] = s.bits_per_expert_weight();
  st.counters["calib_tokens"] = static_cast<double>(s.calibration_tokens);
}

void BM_C2048Block(benchmark::State& st) {
  const int threads = static_cast<int>(st.range(0));
  const char* tpe = std::getenv("QMOE_BENCH_C2048_TOKENS_PER_EXPERT");
  const int64_t per_expert = tpe ? std::atoll(tpe) : 2500;
  const fs::path dir = bench_dir() / "c2048-block";
  const sw::GenerateOptions g = sw::generate_preset("c2048-block");
  if (!fs::exists(dir / "config.json") || !fs::exists(dir / "model.safetensors"))
    sw::generate_checkpoint(dir, g);
  const int64_t enc_len = 500, pairs = (per_expert * g.num_experts + enc_len - 1) / enc_len;
  const fs::path tokens = dir / ("calibration_" + std::to_string(pairs) + "x500.safetensors");
  if (!fs::exists(tokens))
    sw::generate_tokens(tokens_options(g.vocab_size, pairs, enc_len, 1)).save(tokens);
  gemm_rate(threads);
  const auto src = sw::SwitchSource::open(dir);
  sw::CompressOptions po;
  po.check_disk = false;
  const sw::CompressPlan plan = sw::plan_compression(dir, bench_dir() / "unused.qmoe", po);
  std::vector<sw::ExpertMatrix> block;  // encoder block 0 only
  for (const auto& m : plan.experts)
    if (m.stack == "encoder" && m.block == 0) block.push_back(m);
  const sw::TokenPairs calib = sw::TokenPairs::load(tokens, g.vocab_size);
  sw::LoopReport r;
  for (auto _ : st) {
    sw::MemoryExpertStore store;
    sw::LoopOptions lo;
    lo.calibration = &calib;
    lo.threads = threads;
    lo.max_memory = env_bytes("QMOE_BENCH_MAX_MEMORY");
    lo.scratch_dir = bench_dir();
    r = sw::run_block_loop(src, block, lo, store);
  }
  report(st, r, threads);
  st.counters["calib_tokens"] = static_cast<double>(calib.encoder_ids.size());
  st.counters["max_memory_MB"] =
      static_cast<double>(env_bytes("QMOE_BENCH_MAX_MEMORY")) / 1048576.0;
}

void thread_args(benchmark::internal::Benchmark* b) {
  b->Arg(1);
  if (omp_get_max_threads() > 1) b->Arg(omp_get_max_threads());
  b->ArgName("threads")->UseRealTime()->Unit(benchmark::kSecond)->Iterations(1);
}

BENCHMARK(BM_DenseGemm)->Apply(thread_args);
BENCHMARK(BM_Base8Calibrated)->Apply(thread_args);
BENCHMARK(BM_C2048Block)->Apply(thread_args);

}  // namespace
}  // namespace qmoe

BENCHMARK_MAIN();
