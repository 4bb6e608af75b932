// GPU benchmarks of qmoe_decoder_cuda against dense bf16 cuBLAS, measured in the same run.
//
//   bench_decoder_cuda [--benchmark_filter=...]
//
// Shapes: the Switch expert matrices 768x3072, 3072x768, 1024x4096, 4096x1024, 2080x6144,
// 6144x2080 (rows x cols, y = W x) for 1, 8 and 32 tokens, bf16 activations; and a grouped MoE
// layer of 128 experts (3072x768, i.e. Switch-base-128's wi) for 32, 128 and 512 routed tokens.
// Ternary symbols are i.i.d. with P(0) = 0.885 (QMoE's sparsity), encoded as qmoe-v1 (and, for
// qmoe_v2_fused, as qmoe-v2 with its fitted dictionary).
//
// Every call uses the next copy from a pool of device copies of the matrix that together exceed
// 256 MB, so weights come from DRAM (not L2) as in a real MoE layer. GPU time is taken with CUDA
// events around kLaunchesPerIteration launches (UseManualTime). Counters: bits_per_weight,
// weights/s, and bytes/s of the weights read (codes + offsets + levels, or 2 bytes per weight for
// dense bf16): the effective bandwidth to compare with the GPU's DRAM bandwidth. The run's context
// (JSON "context") names the GPU, its compute capability and its peak DRAM bandwidth (2 x memory
// clock x bus width), which scripts/gpu_table.py prints the table against.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/decoder_cuda/decoder.h"
#include "qmoe/encoder/encode.h"

namespace qmoe::bench {
namespace {

constexpr int kLaunchesPerIteration = 10;
constexpr int64_t kPoolBytes = int64_t{256} << 20;

#define BENCH_CUDA(call)                                                                        \
  do {                                                                                          \
    const cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) throw CudaError(std::string(#call) + ": " + cudaGetErrorString(e_)); \
  } while (0)

CompressedMatrix make_matrix(int64_t rows, int64_t cols, uint64_t seed, Codec codec) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  TernaryMatrix t(rows, cols);
  for (auto& s : t.symbols) {
    const double x = u(rng);
    s = x < 0.885 ? 0 : (x < 0.9425 ? 1 : 2);
  }
  for (int64_t r = 0; r < rows; ++r) {
    t.levels[2 * r] = float_to_bf16(-0.02f);
    t.levels[2 * r + 1] = float_to_bf16(0.02f);
  }
  EncodeOptions opt;
  opt.codec = codec;
  return encode(t, opt);
}

void* dev_alloc(size_t bytes, const void* init = nullptr) {
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, bytes));
  if (init) {
    BENCH_CUDA(cudaMemcpy(p, init, bytes, cudaMemcpyHostToDevice));
  } else {
    BENCH_CUDA(cudaMemset(p, 0, bytes));
  }
  return p;
}

// A pool of device copies of one compressed matrix, and of its dense bf16 form.
struct Pool {
  int64_t rows = 0, cols = 0;
  Codec codec = Codec::kV1;
  double bits_per_weight = 0;
  int64_t compressed_bytes = 0;
  std::vector<std::unique_ptr<cuda::DeviceMatrix>> copies;
  std::vector<void*> dense;  // bf16 rows x cols each
};

Pool& pool(int64_t rows, int64_t cols, Codec codec = Codec::kV1) {
  static std::vector<std::unique_ptr<Pool>> pools;
  for (auto& p : pools) {
    if (p->rows == rows && p->cols == cols && p->codec == codec) return *p;
  }
  auto p = std::make_unique<Pool>();
  p->rows = rows;
  p->cols = cols;
  p->codec = codec;
  const CompressedMatrix m = make_matrix(rows, cols, 1234 + rows, codec);
  p->bits_per_weight = m.view().bits_per_weight();
  p->compressed_bytes = m.view().compressed_bytes();
  const int64_t n = std::max<int64_t>(2, kPoolBytes / p->compressed_bytes);
  for (int64_t i = 0; i < n; ++i)
    p->copies.push_back(std::make_unique<cuda::DeviceMatrix>(m.view()));
  const int64_t dense_bytes = rows * cols * 2;
  const int64_t nd = std::max<int64_t>(2, kPoolBytes / dense_bytes);
  for (int64_t i = 0; i < nd; ++i) {
    void* d = dev_alloc(static_cast<size_t>(dense_bytes));
    p->copies[0]->decode_dense(DType::kBF16, d, cols, 0, rows);
    p->dense.push_back(d);
  }
  BENCH_CUDA(cudaDeviceSynchronize());
  pools.push_back(std::move(p));
  return *pools.back();
}

cublasHandle_t cublas() {
  static cublasHandle_t h = [] {
    cublasHandle_t c = nullptr;
    if (cublasCreate(&c) != CUBLAS_STATUS_SUCCESS) throw CudaError("cublasCreate failed");
    return c;
  }();
  return h;
}

// Times kLaunchesPerIteration calls of f(i) per iteration with CUDA events.
template <class F>
void time_gpu(benchmark::State& state, F&& f) {
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  int64_t call = 0;
  for (int i = 0; i < 3; ++i) f(call++);  // warm-up (table upload, cuBLAS heuristics)
  for (auto _ : state) {
    BENCH_CUDA(cudaEventRecord(a));
    for (int i = 0; i < kLaunchesPerIteration; ++i) f(call++);
    BENCH_CUDA(cudaEventRecord(b));
    BENCH_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    state.SetIterationTime(ms * 1e-3 / kLaunchesPerIteration);
  }
  BENCH_CUDA(cudaEventDestroy(a));
  BENCH_CUDA(cudaEventDestroy(b));
}

void set_counters(benchmark::State& state, double weights, double bytes, double bpw) {
  state.counters["bits_per_weight"] = bpw;
  state.counters["weights/s"] =
      benchmark::Counter(weights, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Fused(benchmark::State& state, int64_t rows, int64_t cols, Codec codec) {
  const int64_t n = state.range(0);
  Pool& p = pool(rows, cols, codec);
  void* x = dev_alloc(static_cast<size_t>(n * cols * 2));
  void* y = dev_alloc(static_cast<size_t>(n * rows * 2));
  time_gpu(state, [&](int64_t i) {
    auto& m = *p.copies[i % p.copies.size()];
    cuda::launch_fused(m.matrix_dev(), DType::kBF16, x, cols, y, rows, n, false, nullptr);
  });
  set_counters(state, static_cast<double>(rows * cols), static_cast<double>(p.compressed_bytes),
               p.bits_per_weight);
  cudaFree(x);
  cudaFree(y);
}

void BM_DecodeDenseGemm(benchmark::State& state, int64_t rows, int64_t cols) {
  const int64_t n = state.range(0);
  Pool& p = pool(rows, cols);
  void* x = dev_alloc(static_cast<size_t>(n * cols * 2));
  void* y = dev_alloc(static_cast<size_t>(n * rows * 2));
  // Each DeviceMatrix keeps its own dense workspace, so only a few copies take this path; the
  // 4 bytes per weight of dense traffic dominate whether the codes come from L2 or DRAM.
  const size_t used = std::min<size_t>(4, p.copies.size());
  cuda::ForwardOptions opt;
  opt.dense_min_tokens = 1;  // force the decode-to-dense + cuBLAS path
  for (size_t c = 0; c < used; ++c) p.copies[c]->set_options(opt);
  time_gpu(state, [&](int64_t i) {
    p.copies[i % used]->forward(DType::kBF16, x, cols, y, rows, n, false, nullptr);
  });
  for (size_t c = 0; c < used; ++c) p.copies[c]->set_options(cuda::ForwardOptions{});
  set_counters(state, static_cast<double>(rows * cols), static_cast<double>(p.compressed_bytes),
               p.bits_per_weight);
  cudaFree(x);
  cudaFree(y);
}

void BM_DenseBf16(benchmark::State& state, int64_t rows, int64_t cols) {
  const int64_t n = state.range(0);
  Pool& p = pool(rows, cols);
  void* x = dev_alloc(static_cast<size_t>(n * cols * 2));
  void* y = dev_alloc(static_cast<size_t>(n * rows * 2));
  time_gpu(state, [&](int64_t i) {
    cuda::gemm_dense(cublas(), DType::kBF16, p.dense[i % p.dense.size()], cols, rows, cols, x, cols,
                     y, rows, n, false, nullptr);
  });
  set_counters(state, static_cast<double>(rows * cols), static_cast<double>(rows * cols * 2), 16.0);
  cudaFree(x);
  cudaFree(y);
}

// Grouped layer: 128 experts of 3072x768 (one pool copy each), top-1 routing of n tokens,
// uniform (range(1) = 0) or skewed (1: half the tokens to one expert).
constexpr int kExperts = 128;
constexpr int64_t kLayerRows = 3072, kLayerCols = 768;

struct Routing {
  std::vector<int32_t> offsets, token_ids;
};
Routing route(int64_t n, bool skewed) {
  std::mt19937_64 rng(99);
  std::vector<int> expert_of(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    expert_of[t] = skewed && t % 2 == 0 ? 7 : static_cast<int>(rng() % kExperts);
  }
  Routing r;
  r.offsets.assign(kExperts + 1, 0);
  for (int e : expert_of) ++r.offsets[e + 1];
  for (int e = 0; e < kExperts; ++e) r.offsets[e + 1] += r.offsets[e];
  std::vector<int32_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  r.token_ids.resize(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) r.token_ids[fill[expert_of[t]]++] = static_cast<int32_t>(t);
  return r;
}

void BM_GroupedLayer(benchmark::State& state) {
  const int64_t n = state.range(0);
  const bool skewed = state.range(1) != 0;
  Pool& p = pool(kLayerRows, kLayerCols);
  if (static_cast<int>(p.copies.size()) < kExperts) {
    state.SkipWithError("pool smaller than 128 experts");
    return;
  }
  std::vector<cuda::MatrixDev> views;
  for (int e = 0; e < kExperts; ++e) views.push_back(p.copies[e]->matrix_dev());
  const Routing r = route(n, skewed);
  auto* views_dev = static_cast<cuda::MatrixDev*>(
      dev_alloc(views.size() * sizeof(cuda::MatrixDev), views.data()));
  auto* off_dev = static_cast<int32_t*>(dev_alloc(r.offsets.size() * 4, r.offsets.data()));
  auto* tok_dev = static_cast<int32_t*>(dev_alloc(r.token_ids.size() * 4, r.token_ids.data()));
  void* x = dev_alloc(static_cast<size_t>(n * kLayerCols * 2));
  void* y = dev_alloc(static_cast<size_t>(n * kLayerRows * 2));
  cuda::GroupedArgs g;
  g.experts_dev = views_dev;
  g.num_experts = kExperts;
  g.max_rows = kLayerRows;
  g.cols = kLayerCols;
  g.expert_offsets_dev = off_dev;
  g.token_ids_dev = tok_dev;
  g.total_slots = n;
  g.x_dev = x;
  g.ldx = kLayerCols;
  g.y_dev = y;
  g.ldy = kLayerRows;
  time_gpu(state, [&](int64_t) { cuda::launch_grouped(g, DType::kBF16, nullptr); });
  int active = 0;
  for (int e = 0; e < kExperts; ++e) active += r.offsets[e + 1] > r.offsets[e];
  state.counters["active_experts"] = active;
  set_counters(state, static_cast<double>(active) * kLayerRows * kLayerCols,
               static_cast<double>(active) * static_cast<double>(p.compressed_bytes),
               p.bits_per_weight);
  cudaFree(views_dev);
  cudaFree(off_dev);
  cudaFree(tok_dev);
  cudaFree(x);
  cudaFree(y);
}

// Dense baseline of the same layer: one cuBLAS GEMM per active expert over its gathered tokens
// (the gather itself is not timed, which favours the baseline).
void BM_GroupedLayerDenseBf16(benchmark::State& state) {
  const int64_t n = state.range(0);
  const bool skewed = state.range(1) != 0;
  Pool& p = pool(kLayerRows, kLayerCols);
  const Routing r = route(n, skewed);
  void* x = dev_alloc(static_cast<size_t>(n * kLayerCols * 2));
  void* y = dev_alloc(static_cast<size_t>(n * kLayerRows * 2));
  int active = 0;
  time_gpu(state, [&](int64_t) {
    active = 0;
    for (int e = 0; e < kExperts; ++e) {
      const int64_t t0 = r.offsets[e], t1 = r.offsets[e + 1];
      if (t1 == t0) continue;
      ++active;
      cuda::gemm_dense(cublas(), DType::kBF16, p.dense[e % p.dense.size()], kLayerCols, kLayerRows,
                       kLayerCols, static_cast<char*>(x) + t0 * kLayerCols * 2, kLayerCols,
                       static_cast<char*>(y) + t0 * kLayerRows * 2, kLayerRows, t1 - t0, false,
                       nullptr);
    }
  });
  state.counters["active_experts"] = active;
  set_counters(state, static_cast<double>(active) * kLayerRows * kLayerCols,
               static_cast<double>(active) * kLayerRows * kLayerCols * 2, 16.0);
  cudaFree(x);
  cudaFree(y);
}

void register_all() {
  const int64_t shapes[][2] = {{768, 3072},  {3072, 768},  {1024, 4096},
                               {4096, 1024}, {2080, 6144}, {6144, 2080}};
  // 1, 8 and 32 tokens, GPU time.
  auto tokens = [](benchmark::internal::Benchmark* b) {
    b->Arg(1)->Arg(8)->Arg(32)->UseManualTime()->Unit(benchmark::kMicrosecond);
  };
  for (const auto& s : shapes) {
    const std::string dims = std::to_string(s[0]) + "x" + std::to_string(s[1]);
    for (auto [name, codec] :
         {std::pair{"qmoe_fused/", Codec::kV1}, std::pair{"qmoe_v2_fused/", Codec::kV2}}) {
      tokens(benchmark::RegisterBenchmark((name + dims).c_str(), &BM_Fused, s[0], s[1], codec));
    }
    for (auto [name, fn] : {std::pair{"qmoe_dense_gemm/", &BM_DecodeDenseGemm},
                            std::pair{"dense_bf16/", &BM_DenseBf16}}) {
      tokens(benchmark::RegisterBenchmark((name + dims).c_str(), fn, s[0], s[1]));
    }
  }
  for (auto [name, fn] : {std::pair{"grouped128/qmoe_fused", &BM_GroupedLayer},
                          std::pair{"grouped128/dense_bf16", &BM_GroupedLayerDenseBf16}}) {
    benchmark::RegisterBenchmark(name, fn)
        ->ArgsProduct({{32, 128, 512}, {0, 1}})
        ->ArgNames({"tokens", "skewed"})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace
}  // namespace qmoe::bench

int main(int argc, char** argv) {
  if (qmoe::cuda::device_count() == 0) {
    std::printf(
        "bench_decoder_cuda: no CUDA device found (cudaGetDeviceCount returned 0 or an error); "
        "nothing to run\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  {
    int dev = 0, major = 0, minor = 0, mem_khz = 0, bus_bits = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&prop, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess) {
      benchmark::AddCustomContext("gpu_name", prop.name);
      benchmark::AddCustomContext("gpu_compute_capability",
                                  std::to_string(major) + "." + std::to_string(minor));
      // Peak DRAM bandwidth: double data rate x memory clock x bus width.
      if (cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev) == cudaSuccess &&
          cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) == cudaSuccess &&
          mem_khz > 0 && bus_bits > 0) {
        const double gbps = 2.0 * mem_khz * 1e3 * (bus_bits / 8.0) / 1e9;
        benchmark::AddCustomContext("gpu_peak_memory_GBps", std::to_string(gbps));
      }
    }
  }
  qmoe::bench::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
