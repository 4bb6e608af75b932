// Encode / reference-decode throughput of the codecs, and bits per weight of qmoe-v1 and qmoe-v2
// next to the order-0 entropy of the symbols. A qmoe-v2 dictionary (256 KiB) is stored once per
// file for all its matrices of similar sparsity; dictionary_bits_one_matrix is what it would add
// to a file holding this one matrix alone.
//
//   bench_codec --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"  // tests/common: i.i.d. symbols (levels do not change the size)

namespace qmoe {
namespace {

double entropy_bits(double p_zero) {
  const double q = (1 - p_zero) / 2;
  return -(p_zero * std::log2(p_zero) + 2 * q * std::log2(q));
}

// Encode of a 768x3072 matrix (Switch-base wo shape).
template <Codec kCodec>
void BM_Encode(benchmark::State& state) {
  const double p_zero = static_cast<double>(state.range(0)) / 1000.0;
  const int threads = static_cast<int>(state.range(1));
  const auto t = test::random_ternary(768, 3072, p_zero, 1);
  CompressedMatrix m;
  for (auto _ : state) {
    m = encode(t, {.codec = kCodec, .threads = threads});
    benchmark::DoNotOptimize(m.codes.data());
  }
  const double weights = static_cast<double>(t.rows * t.cols);
  state.counters["weights/s"] =
      benchmark::Counter(weights, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weights/s/thread"] =
      benchmark::Counter(weights / threads, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_weight"] = m.view().bits_per_weight(false);
  state.counters["codes_bits_per_weight"] = m.view().bits_per_weight(true);
  state.counters["entropy_bits"] = entropy_bits(p_zero);
  state.counters["ratio_to_entropy"] = m.view().bits_per_weight(true) / entropy_bits(p_zero);
  state.counters["p_zero"] = p_zero;
  if (kCodec == Codec::kV2)
    state.counters["dictionary_bits_one_matrix"] = 8.0 * v2::kTableBytes / weights;
}

template <Codec kCodec>
void BM_DecodeRef(benchmark::State& state) {
  const double p_zero = static_cast<double>(state.range(0)) / 1000.0;
  const int threads = static_cast<int>(state.range(1));
  const auto t = test::random_ternary(768, 3072, p_zero, 2);
  const auto m = encode(t, {.codec = kCodec});
  const auto v = m.view();
  std::vector<float> out(static_cast<size_t>(t.rows * t.cols));
  // Rows split evenly between threads; decode_ref on row slices.
  const int64_t rows_per = (v.rows + threads - 1) / threads;
  for (auto _ : state) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < threads; ++i) {
      const int64_t r0 = std::min<int64_t>(v.rows, i * rows_per),
                    r1 = std::min<int64_t>(v.rows, r0 + rows_per);
      CompressedView s = v;
      s.rows = r1 - r0;
      s.levels = v.levels.subspan(static_cast<size_t>(2 * r0), static_cast<size_t>(2 * s.rows));
      std::vector<int32_t> offs(v.row_offsets.begin() + r0, v.row_offsets.begin() + r1 + 1);
      for (auto& o : offs) o -= v.row_offsets[r0];
      s.row_offsets = offs;
      s.codes = v.codes.subspan(static_cast<size_t>(v.row_offsets[r0]),
                                static_cast<size_t>(v.row_offsets[r1] - v.row_offsets[r0]));
      decode_ref(s, out.data() + r0 * v.cols);
    }
    benchmark::DoNotOptimize(out.data());
  }
  const double weights = static_cast<double>(t.rows * t.cols);
  state.counters["weights/s"] =
      benchmark::Counter(weights, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["weights/s/thread"] =
      benchmark::Counter(weights / threads, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] = benchmark::Counter(static_cast<double>(v.compressed_bytes()),
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_weight"] = v.bits_per_weight(false);
}

// validate() (sizes, offsets, every row's codes; a qmoe-v2 dictionary too), and validate_codes(),
// what opening a container costs per matrix (its dictionaries are checked once per file).
template <Codec kCodec, bool kCodesOnly>
void BM_Validate(benchmark::State& state) {
  const double p_zero = static_cast<double>(state.range(0)) / 1000.0;
  const auto t = test::random_ternary(768, 3072, p_zero, 4);
  const auto m = encode(t, {.codec = kCodec});
  for (auto _ : state) {
    if (kCodesOnly) {
      validate_codes(m.view(), "bench");
    } else {
      validate(m.view(), "bench");
    }
  }
  state.counters["weights/s"] = benchmark::Counter(static_cast<double>(t.rows * t.cols),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void BM_EncodeP5(benchmark::State& state) {
  const auto t = test::random_ternary(768, 3072, 0.5, 3);
  CompressedMatrix m;
  for (auto _ : state) {
    m = encode(t, {.codec = Codec::kP5, .threads = 1});
    benchmark::DoNotOptimize(m.packed.data());
  }
  state.counters["weights/s"] = benchmark::Counter(static_cast<double>(t.rows * t.cols),
                                                   benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_weight"] = m.view().bits_per_weight(false);
}

void args(benchmark::internal::Benchmark* b) {
  const int all = omp_get_max_threads();
  for (int pz : {800, 885, 920, 950}) {
    b->Args({pz, 1});
    if (all > 1) b->Args({pz, all});
  }
  b->ArgNames({"p_zero_x1000", "threads"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Encode<Codec::kV1>)->Name("BM_EncodeV1")->Apply(args);
BENCHMARK(BM_Encode<Codec::kV2>)->Name("BM_EncodeV2")->Apply(args);
BENCHMARK(BM_DecodeRef<Codec::kV1>)->Name("BM_DecodeRefV1")->Apply(args);
BENCHMARK(BM_DecodeRef<Codec::kV2>)->Name("BM_DecodeRefV2")->Apply(args);
BENCHMARK(BM_Validate<Codec::kV1, false>)->Name("BM_ValidateV1")->Arg(885)->ArgName("p_zero_x1000");
BENCHMARK(BM_Validate<Codec::kV2, false>)->Name("BM_ValidateV2")->Arg(885)->ArgName("p_zero_x1000");
BENCHMARK(BM_Validate<Codec::kV2, true>)
    ->Name("BM_ValidateCodesV2")
    ->Arg(885)
    ->ArgName("p_zero_x1000");
BENCHMARK(BM_EncodeP5)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace qmoe

BENCHMARK_MAIN();
