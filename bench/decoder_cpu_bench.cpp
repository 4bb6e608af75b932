// MoE inference with experts streamed from memory: qmoe_decoder_cpu against dense fp32 Eigen and
// the reference decoder, on the same matrices, in the same run.
//
//   bench_decoder_cpu --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// Each shape has a pool of experts whose dense fp32 size is many times the last-level cache, and
// every call takes the next expert of the pool, so weights come from DRAM as in a real MoE layer.
// The compressed pools are streamed too: each codec's pool holds copies of the encoded experts
// (distinct memory, the same contents) until it is at least QMOE_BENCH_POOL_MB megabytes, by
// default four times the last-level cache, so that compressed weights come from DRAM as well.
// Every timed run starts after a 50 ms pause, so that OpenMP workers left spinning by the previous
// benchmark (another thread count, or the dense baseline) have gone to sleep and hold no core.
// Shapes:
//   wi   3072 x 768   (d_ff x d_model, Switch-base up projection)     QMOE_BENCH_EXPERTS (64)
//   wo   768 x 3072   (d_model x d_ff, Switch-base down projection)   QMOE_BENCH_EXPERTS (64)
//   big  4096 x 14336 (a large-model down projection)                QMOE_BENCH_BIG_EXPERTS (4)
// Ternary symbols are i.i.d. with P(0) = 0.885 (QMoE's measured sparsity), encoded as qmoe-v1
// (qmoe_*) and, for the qmoe_v2, qmoe_v3, qmoe_g4 and qmoe_p5 rows, the same matrices in the
// fitted-dictionary codec qmoe-v2, in its row-pair form qmoe-v3, in the gap-token codec qmoe-g4
// and in the 1.6-bit qmoe-p5 fallback codec. qmoe_g4 at one token uses int8 inputs where the CPU
// has the kernel (MatmulOptions::int8_activations); qmoe_g4_fp32 is the same with float inputs.
// Dense copies take 4 bytes per weight: 64 + 64 experts of 2.4M weights = 1.2 GB, and 0.94 GB per
// 4 big experts; pools are built on first use, so a --benchmark_filter builds only what it needs.
//
// A MoE layer (layer_*): 16, 64 or 256 tokens routed top-1 over the wi pool, as one grouped_matmul
// call, as one call per active expert, and as dense fp32 Eigen per active expert.
//
// Per configuration: time per call (real time), weights/s and tokens/s, bytes/s of the weights
// read (codes + offsets + levels for qmoe, fp32 for dense) and bits_per_weight. After the run two
// tables give the median time of each path and its speed-up over dense fp32: in real time, and in
// the CPU time of the calling thread (on a shared machine, less the time other processes took).
#include <benchmark/benchmark.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/reference.h"

namespace qmoe::bench {
void dense_matmul(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y,
                  int threads);
}

namespace qmoe::bench {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

struct Shape {
  const char* name;
  int64_t rows, cols;
  int experts;
};

std::vector<Shape> shapes() {
  const int n = env_int("QMOE_BENCH_EXPERTS", 64);
  return {{"wi_3072x768", 3072, 768, n},
          {"wo_768x3072", 768, 3072, n},
          {"big_4096x14336", 4096, 14336, env_int("QMOE_BENCH_BIG_EXPERTS", 4)}};
}

// Bytes of the last-level cache: the largest cache of cpu0 in sysfs (the kernel's view; glibc's
// sysconf derives it from CPUID, which virtual machines may misreport: 320 MiB for a 32 MiB L3
// here), else sysconf, else 32 MiB.
int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int i = 0; i < 8; ++i) {
      const std::string path =
          "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size";
      std::FILE* f = std::fopen(path.c_str(), "r");
      if (f == nullptr) continue;
      long v = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &v, &unit) >= 1) {
        const int64_t b = unit == 'M' ? int64_t{v} << 20 : unit == 'K' ? int64_t{v} << 10 : v;
        best = std::max(best, b);
      }
      std::fclose(f);
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (best == 0) best = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    return best > 0 ? best : int64_t{32} << 20;
  }();
  return bytes;
}

// Bytes each compressed pool must reach: QMOE_BENCH_POOL_MB, else four times the LLC.
int64_t pool_min_bytes() {
  const int mb = env_int("QMOE_BENCH_POOL_MB", 0);
  return mb > 0 ? int64_t{mb} << 20 : 4 * llc_bytes();
}

// Appends copies of `v`'s matrices (new buffers, shared dictionaries) until their compressed
// bytes reach `min_bytes`; returns the total.
int64_t replicate(std::vector<CompressedMatrix>& v, int64_t min_bytes) {
  int64_t total = 0;
  for (const auto& m : v) total += m.view().compressed_bytes();
  const size_t distinct = v.size();
  for (size_t i = 0; total < min_bytes && distinct > 0; ++i) {
    v.push_back(v[i % distinct]);
    total += v.back().view().compressed_bytes();
  }
  return total;
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

struct Pool {
  Shape shape{};
  std::vector<CompressedMatrix> comp;
  std::vector<CompressedMatrix> v2;  // the same matrices in qmoe-v2
  std::vector<CompressedMatrix> v3;  // the same matrices in qmoe-v3
  std::vector<CompressedMatrix> p5;  // the same matrices in the qmoe-p5 fallback codec
  std::vector<CompressedMatrix> g4;  // the same matrices in qmoe-g4
  std::vector<std::unique_ptr<float, FreeDeleter>> dense;
  double bits_per_weight = 0;
  double v2_bits_per_weight = 0;
  double v3_bits_per_weight = 0;
  double p5_bits_per_weight = 0;
  double g4_bits_per_weight = 0;
};

// Ternary matrix with P(0) = 0.885, levels around +-0.05 (bf16), fast generator (the pools hold
// hundreds of millions of symbols).
TernaryMatrix make_ternary(int64_t rows, int64_t cols, uint64_t seed) {
  TernaryMatrix t(rows, cols);
  const uint64_t zero_below = static_cast<uint64_t>(0.885 * 4294967296.0);
  const uint64_t low_below = static_cast<uint64_t>((0.885 + 0.0575) * 4294967296.0);
#pragma omp parallel
  {
    std::mt19937_64 rng(seed * 1000003 + static_cast<uint64_t>(omp_get_thread_num()));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* s = t.symbols.data() + r * cols;
      for (int64_t c = 0; c < cols; c += 2) {
        const uint64_t v = rng();
        const uint64_t a = v & 0xffffffffu, b = v >> 32;
        s[c] = a < zero_below ? 0 : (a < low_below ? 1 : 2);
        if (c + 1 < cols) s[c + 1] = b < zero_below ? 0 : (b < low_below ? 1 : 2);
      }
      const double jitter = static_cast<double>(rng() % 1000) / 1000.0;
      t.levels[2 * r] = float_to_bf16(static_cast<float>(-0.04 - 0.02 * jitter));
      t.levels[2 * r + 1] = float_to_bf16(static_cast<float>(0.04 + 0.02 * jitter));
    }
  }
  return t;
}

Pool& pool(int index) {
  static std::map<int, std::unique_ptr<Pool>> pools;
  auto& slot = pools[index];
  if (slot) return *slot;
  slot = std::make_unique<Pool>();
  Pool& p = *slot;
  p.shape = shapes()[static_cast<size_t>(index)];
  const int64_t rows = p.shape.rows, cols = p.shape.cols;
  double bits = 0, v2_bits = 0, v3_bits = 0, p5_bits = 0, g4_bits = 0;
  for (int e = 0; e < p.shape.experts; ++e) {
    const TernaryMatrix t = make_ternary(rows, cols, static_cast<uint64_t>(index * 1000 + e + 1));
    p.comp.push_back(encode(t, {.codec = Codec::kV1}));
    bits += p.comp.back().view().bits_per_weight();
    p.v2.push_back(encode(t, {.codec = Codec::kV2}));
    v2_bits += p.v2.back().view().bits_per_weight();
    p.v3.push_back(encode(t, {.codec = Codec::kV3}));
    v3_bits += p.v3.back().view().bits_per_weight();
    p.p5.push_back(encode(t, {.codec = Codec::kP5}));
    p5_bits += p.p5.back().view().bits_per_weight();
    p.g4.push_back(encode(t, {.codec = Codec::kG4}));
    g4_bits += p.g4.back().view().bits_per_weight();
    float* d = static_cast<float*>(
        std::aligned_alloc(64, static_cast<size_t>(rows * cols) * sizeof(float)));
    p.dense.emplace_back(d);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float lo = bf16_to_float(t.levels[2 * r]), hi = bf16_to_float(t.levels[2 * r + 1]);
      for (int64_t c = 0; c < cols; ++c)
        d[r * cols + c] = symbol_value(t.symbols[r * cols + c], lo, hi);
    }
  }
  p.bits_per_weight = bits / p.shape.experts;
  p.v2_bits_per_weight = v2_bits / p.shape.experts;
  p.v3_bits_per_weight = v3_bits / p.shape.experts;
  p.p5_bits_per_weight = p5_bits / p.shape.experts;
  p.g4_bits_per_weight = g4_bits / p.shape.experts;
  const int64_t min_bytes = pool_min_bytes();
  std::fprintf(stderr,
               "# pool %s: %d experts, bits/weight qmoe-v1 %.4f, qmoe-v2 %.4f, qmoe-v3 %.4f, "
               "qmoe-g4 %.4f, qmoe-p5 %.4f; dense fp32 %.0f MB; compressed pools streamed, each "
               ">= %.0f MB (%.1fx the %.0f MB last-level cache):",
               p.shape.name, p.shape.experts, p.bits_per_weight, p.v2_bits_per_weight,
               p.v3_bits_per_weight, p.g4_bits_per_weight, p.p5_bits_per_weight,
               4.0 * rows * cols * p.shape.experts / 1e6, min_bytes / 1e6,
               static_cast<double>(min_bytes) / static_cast<double>(llc_bytes()),
               llc_bytes() / 1e6);
  for (auto [name, v] :
       {std::pair{"qmoe-v1", &p.comp}, std::pair{"qmoe-v2", &p.v2}, std::pair{"qmoe-v3", &p.v3},
        std::pair{"qmoe-g4", &p.g4}, std::pair{"qmoe-p5", &p.p5}}) {
    const int64_t b = replicate(*v, min_bytes);
    std::fprintf(stderr, " %s %zu matrices %.0f MB;", name, v->size(), b / 1e6);
  }
  std::fprintf(stderr, "\n");
  return p;
}

enum class Path { kQmoe, kQmoeV2, kQmoeV3, kQmoeG4, kQmoeP5, kDense, kRef };

void set_counters(benchmark::State& state, const Pool& p, int64_t n, double bytes_per_call,
                  double bpw) {
  const double weights = static_cast<double>(p.shape.rows * p.shape.cols);
  state.counters["weights/s"] = benchmark::Counter(weights * static_cast<double>(n),
                                                   benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] = benchmark::Counter(
      bytes_per_call, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1024);
  state.counters["bits_per_weight"] = bpw;
}

void run_path(benchmark::State& state, int shape, int64_t n, int threads, Path path,
              std::optional<cpu::SimdLevel> level, bool int8 = true) {
  Pool& p = pool(shape);
  const int64_t rows = p.shape.rows, cols = p.shape.cols;
  std::vector<float> x(static_cast<size_t>(n * cols)), y(static_cast<size_t>(n * rows));
  std::mt19937_64 rng(7);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& v : x) v = d(rng);
  cpu::MatmulOptions opt;
  opt.threads = threads;
  opt.simd = level;
  opt.int8_activations = int8;
  const std::vector<CompressedMatrix>& comp = path == Path::kQmoeV2   ? p.v2
                                              : path == Path::kQmoeV3 ? p.v3
                                              : path == Path::kQmoeG4 ? p.g4
                                              : path == Path::kQmoeP5 ? p.p5
                                                                      : p.comp;
  const size_t n_items = path == Path::kDense ? p.dense.size() : comp.size();
  size_t e = 0;
  double bytes = 0;
  // Untimed: OpenMP workers still spinning after the previous benchmark go to sleep.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  for (auto _ : state) {
    switch (path) {
      case Path::kQmoe:
      case Path::kQmoeV2:
      case Path::kQmoeV3:
      case Path::kQmoeG4:
      case Path::kQmoeP5: {
        const CompressedView v = comp[e].view();
        cpu::matmul(v, n, x.data(), cols, y.data(), rows, opt);
        bytes += static_cast<double>(v.compressed_bytes());
        break;
      }
      case Path::kDense:
        dense_matmul(p.dense[e].get(), rows, cols, x.data(), n, y.data(), threads);
        bytes += 4.0 * static_cast<double>(rows * cols);
        break;
      case Path::kRef: {
        const CompressedView v = comp[e].view();
        for (int64_t t = 0; t < n; ++t) matvec_ref(v, x.data() + t * cols, y.data() + t * rows);
        bytes += static_cast<double>(v.compressed_bytes());
        break;
      }
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    e = (e + 1) % n_items;
  }
  const double calls = static_cast<double>(state.iterations());
  set_counters(state, p, n, calls > 0 ? bytes / calls : 0.0,
               path == Path::kDense    ? 32.0
               : path == Path::kQmoeP5 ? p.p5_bits_per_weight
               : path == Path::kQmoeV2 ? p.v2_bits_per_weight
               : path == Path::kQmoeV3 ? p.v3_bits_per_weight
               : path == Path::kQmoeG4 ? p.g4_bits_per_weight
                                       : p.bits_per_weight);
}

// ---- one MoE layer ---------------------------------------------------------------------------
// T tokens routed top-1 over the pool's experts (a fixed pseudo-random routing, every expert of the
// pool eligible), outputs scaled by a router probability: the whole layer as one grouped call, as
// one matmul call per active expert, and dense fp32 Eigen per active expert (tokens gathered into
// a contiguous block first, outputs scattered back, both timed).
enum class LayerPath { kGrouped, kPerExpert, kDense };

void run_layer(benchmark::State& state, int shape, int64_t tokens, int threads, LayerPath path) {
  Pool& p = pool(shape);
  const int64_t rows = p.shape.rows, cols = p.shape.cols;
  const int experts = p.shape.experts;
  std::vector<float> x(static_cast<size_t>(tokens * cols)), y(static_cast<size_t>(tokens * rows));
  std::mt19937_64 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& v : x) v = d(rng);
  std::vector<std::vector<int32_t>> tok(static_cast<size_t>(experts));
  std::vector<std::vector<float>> prob(static_cast<size_t>(experts));
  for (int32_t t = 0; t < tokens; ++t) {
    const size_t e = static_cast<size_t>(rng() % static_cast<uint64_t>(experts));
    tok[e].push_back(t);
    prob[e].push_back(0.5f + static_cast<float>(rng() % 1000) / 2000.0f);
  }
  // One set of items per block of `experts` consecutive matrices of the (replicated) qmoe-v1
  // pool; each call takes the next set, so the compressed experts stream like the dense ones.
  std::vector<std::vector<cpu::ExpertBatch>> item_sets(
      std::max<size_t>(1, p.comp.size() / static_cast<size_t>(experts)));
  int active = 0;
  for (size_t b = 0; b < item_sets.size(); ++b) {
    for (int e = 0; e < experts; ++e) {
      if (tok[static_cast<size_t>(e)].empty()) continue;
      if (b == 0) ++active;
      item_sets[b].push_back(
          {p.comp[b * static_cast<size_t>(experts) + static_cast<size_t>(e)].view(),
           tok[static_cast<size_t>(e)],
           {},
           prob[static_cast<size_t>(e)]});
    }
  }
  size_t set = 0;
  std::vector<float> xg(static_cast<size_t>(tokens * cols)), yg(static_cast<size_t>(tokens * rows));
  cpu::MatmulOptions opt;
  opt.threads = threads;
  double bytes = 0;
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // as in run_path
  for (auto _ : state) {
    bytes = 0;
    const std::vector<cpu::ExpertBatch>& items = item_sets[set];
    set = (set + 1) % item_sets.size();
    switch (path) {
      case LayerPath::kGrouped:
        cpu::grouped_matmul(items, x.data(), tokens, cols, y.data(), tokens, rows, opt);
        for (const auto& it : items) bytes += static_cast<double>(it.weight.compressed_bytes());
        break;
      case LayerPath::kPerExpert:
        for (const auto& it : items) {
          cpu::grouped_matmul({&it, 1}, x.data(), tokens, cols, y.data(), tokens, rows, opt);
          bytes += static_cast<double>(it.weight.compressed_bytes());
        }
        break;
      case LayerPath::kDense:
        for (int e = 0; e < experts; ++e) {
          const auto& tk = tok[static_cast<size_t>(e)];
          const int64_t n = static_cast<int64_t>(tk.size());
          if (n == 0) continue;
          for (int64_t i = 0; i < n; ++i) {
            std::memcpy(xg.data() + i * cols, x.data() + tk[static_cast<size_t>(i)] * cols,
                        static_cast<size_t>(cols) * sizeof(float));
          }
          dense_matmul(p.dense[static_cast<size_t>(e)].get(), rows, cols, xg.data(), n, yg.data(),
                       threads);
          const float* pr = prob[static_cast<size_t>(e)].data();
          for (int64_t i = 0; i < n; ++i) {
            float* dst = y.data() + tk[static_cast<size_t>(i)] * rows;
            for (int64_t r = 0; r < rows; ++r) dst[r] = pr[i] * yg[i * rows + r];
          }
          bytes += 4.0 * static_cast<double>(rows * cols);
        }
        break;
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["active_experts"] = active;
  set_counters(state, p, tokens, bytes, path == LayerPath::kDense ? 32.0 : p.bits_per_weight);
  // weights/s counts the weights each token passes through (rows * cols per token).
}

// ---- summary table --------------------------------------------------------------------------
// Collects the median (or the only) real time per benchmark and prints, after the run, one line
// per shape/batch/threads with every path and its speed-up over dense fp32.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      if (r.run_type == Run::RT_Iteration && r.repetitions > 1) continue;
      times_[r.run_name.function_name] = r.GetAdjustedRealTime();  // microseconds (Unit below)
      cpu_times_[r.run_name.function_name] = r.GetAdjustedCPUTime();
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    auto& out = GetOutputStream();
    print_layers(out);
    out << "\nReal time (what a caller waits):\n";
    print_paths(out, times_);
    // The calling thread's CPU time: on a shared machine, less the time other processes took from
    // it (at 2 threads it includes the wait for the other thread).
    out << "\nCPU time of the calling thread (less sensitive to other load on the machine):\n";
    print_paths(out, cpu_times_);
  }

 private:
  // One line per shape, token count and thread count: the time of every path (median, µs) and the
  // speed-up of each qmoe path over dense fp32 measured in the same run.
  static void print_paths(std::ostream& out, const std::map<std::string, double>& times) {
    static const std::pair<const char*, const char*> kPaths[] = {
        {"qmoe", "v1"},           {"qmoe_v2", "v2"},           {"qmoe_v3", "v3"},
        {"qmoe_g4", "g4"},        {"qmoe_g4_fp32", "g4 fp32"}, {"qmoe_p5", "p5"},
        {"qmoe_avx2", "v1 avx2"}, {"qmoe_v3_avx2", "v3 avx2"}, {"qmoe_g4_avx2", "g4 avx2"}};
    auto get = [&](const std::string& k) {
      const auto it = times.find(k);
      return it == times.end() ? -1.0 : it->second;
    };
    auto num = [](double v, const char* fmt) {
      if (v < 0) return std::string("-");
      char b[64];
      std::snprintf(b, sizeof b, fmt, v);
      return std::string(b);
    };
    out << "| shape | tokens | threads | dense fp32 µs";
    for (const auto& [key, label] : kPaths) out << " | " << label << " µs";
    for (const auto& [key, label] : kPaths) out << " | dense ÷ " << label;
    out << " | reference µs |\n|---|---|---";
    for (size_t i = 0; i < 2 * std::size(kPaths) + 2; ++i) out << "|---";
    out << "|\n";
    // Rows by shape, then by token and thread count as numbers.
    std::vector<std::tuple<std::string, long, long, std::string>> rows;
    for (const auto& [key, t] : times) {
      if (key.rfind("qmoe/", 0) != 0) continue;
      const std::string rest = key.substr(5);  // shape/tokens:n/threads:t
      const size_t a = rest.find("/tokens:"), b = rest.find("/threads:");
      rows.emplace_back(rest.substr(0, a), std::stol(rest.substr(a + 8, b - a - 8)),
                        std::stol(rest.substr(b + 9)), rest);
    }
    std::sort(rows.begin(), rows.end());
    for (const auto& [shape, tokens, threads, rest] : rows) {
      const size_t a = rest.find("/tokens:"), b = rest.find("/threads:");
      const double dense = get("dense/" + rest);
      out << "| " << rest.substr(0, a) << " | " << rest.substr(a + 8, b - a - 8) << " | "
          << rest.substr(b + 9) << " | " << num(dense, "%.1f");
      for (const auto& [path, label] : kPaths)
        out << " | " << num(get(path + ("/" + rest)), "%.1f");
      for (const auto& [path, label] : kPaths) {
        const double v = get(path + ("/" + rest));
        out << " | " << (dense > 0 && v > 0 ? num(dense / v, "%.2fx") : "-");
      }
      out << " | " << num(get("reference/" + rest), "%.0f") << " |\n";
    }
  }

  // One line per layer configuration: grouped, per-expert calls, dense, and the ratios.
  void print_layers(std::ostream& out) const {
    bool header = false;
    for (const auto& [key, t] : times_) {
      if (key.rfind("layer_grouped/", 0) != 0) continue;
      const std::string rest = key.substr(14);
      auto get = [&](const std::string& k) {
        const auto it = times_.find(k);
        return it == times_.end() ? -1.0 : it->second;
      };
      const double per = get("layer_per_expert/" + rest), dense = get("layer_dense/" + rest);
      if (!header) {
        out << "\n| MoE layer | grouped µs | per-expert calls µs | dense fp32 µs | "
               "per-expert / grouped | dense / grouped |\n|---|---|---|---|---|---|\n";
        header = true;
      }
      char line[256];
      std::snprintf(line, sizeof line, "| %s | %.1f | %.1f | %.1f | %.2fx | %.2fx |\n",
                    rest.c_str(), t, per, dense, per > 0 ? per / t : 0.0,
                    dense > 0 ? dense / t : 0.0);
      out << line;
    }
  }

  std::map<std::string, double> times_, cpu_times_;
};

void register_all() {
  const int all = omp_get_max_threads();
  std::vector<int> thread_counts = {1};
  if (all > 1) thread_counts.push_back(all);
  const bool avx2 = cpu::simd_level_supported(cpu::SimdLevel::kAvx2);
  const bool best_is_avx2 = cpu::best_simd_level() == cpu::SimdLevel::kAvx2;
  const auto list = shapes();
  for (int s = 0; s < static_cast<int>(list.size()); ++s) {
    if (list[static_cast<size_t>(s)].experts <= 0) continue;
    for (int64_t n : {1, 8, 32}) {
      for (int threads : thread_counts) {
        const std::string suffix = std::string(list[static_cast<size_t>(s)].name) +
                                   "/tokens:" + std::to_string(n) +
                                   "/threads:" + std::to_string(threads);
        auto add = [&](const std::string& name, Path path, std::optional<cpu::SimdLevel> level,
                       bool int8 = true) {
          benchmark::RegisterBenchmark(
              (name + "/" + suffix).c_str(),
              [=](benchmark::State& st) { run_path(st, s, n, threads, path, level, int8); })
              ->Unit(benchmark::kMicrosecond)
              ->UseRealTime();
        };
        add("qmoe", Path::kQmoe, std::nullopt);
        add("qmoe_v2", Path::kQmoeV2, std::nullopt);
        add("qmoe_v3", Path::kQmoeV3, std::nullopt);
        add("qmoe_g4", Path::kQmoeG4, std::nullopt);
        if (n == 1) add("qmoe_g4_fp32", Path::kQmoeG4, std::nullopt, false);
        add("qmoe_p5", Path::kQmoeP5, std::nullopt);
        if (avx2 && !best_is_avx2) add("qmoe_avx2", Path::kQmoe, cpu::SimdLevel::kAvx2);
        if (avx2 && !best_is_avx2 && n == 1) {
          add("qmoe_v3_avx2", Path::kQmoeV3, cpu::SimdLevel::kAvx2);
          add("qmoe_g4_avx2", Path::kQmoeG4, cpu::SimdLevel::kAvx2);
        }
        if (avx2) add("dense", Path::kDense, std::nullopt);
        if (n == 1 && threads == 1) add("reference", Path::kRef, std::nullopt);
      }
    }
  }
  // One MoE layer over the wi pool (Switch-base up projections).
  if (list[0].experts > 0) {
    for (int64_t tokens : {16, 64, 256}) {
      for (int threads : thread_counts) {
        const std::string suffix = std::string(list[0].name) + "/tokens:" + std::to_string(tokens) +
                                   "/threads:" + std::to_string(threads);
        for (auto [name, path] : {std::pair{"layer_grouped", LayerPath::kGrouped},
                                  std::pair{"layer_per_expert", LayerPath::kPerExpert},
                                  std::pair{"layer_dense", LayerPath::kDense}}) {
          if (path == LayerPath::kDense && !avx2) continue;
          benchmark::RegisterBenchmark(
              (std::string(name) + "/" + suffix).c_str(),
              [=](benchmark::State& st) { run_layer(st, 0, tokens, threads, path); })
              ->Unit(benchmark::kMicrosecond)
              ->UseRealTime();
        }
      }
    }
  }
}

}  // namespace
}  // namespace qmoe::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::fprintf(stderr, "# qmoe CPU kernels: SIMD level %s (best %s), %d OpenMP threads\n",
               std::string(qmoe::cpu::simd_level_name(qmoe::cpu::simd_level())).c_str(),
               std::string(qmoe::cpu::simd_level_name(qmoe::cpu::best_simd_level())).c_str(),
               omp_get_max_threads());
  qmoe::bench::register_all();
  qmoe::bench::SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
