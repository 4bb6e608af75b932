// Eval and calibration throughput of the Switch forward pass on a switch-base-8-shaped model
// (12 + 12 blocks, every other one sparse with 8 experts, d_model 768, d_ff 3072, 12 heads,
// vocabulary 32128) with random weights generated here, and random token pairs.
//
// Configurations: experts dense (float32) or compressed (qmoe-v1 codes with QMoE's statistics,
// P(0) = 0.885, run through decoder_cpu's fused kernels), 1 thread and all threads. Counters:
// tokens/s (encoder + decoder tokens), target_tokens/s, bits_per_expert_weight.
//
//   QMOE_BENCH_PAIRS (default 4), QMOE_BENCH_ENC_LEN (128), QMOE_BENCH_DEC_LEN (32) set the batch.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdlib>
#include <memory>
#include <random>

#include "qmoe/switch/calibration.h"
#include "qmoe/switch/forward.h"

#include "qmoe/encoder/encode.h"
#include "qmoe/gptq/hessian.h"

namespace {
using namespace qmoe;
using namespace qmoe::sw;

int64_t env_int(const char* name, int64_t def) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : def;
}

// Fills a tensor with N(0, std²)-like values (sum of uniforms), in parallel over fixed chunks.
FloatTensor random_tensor(std::vector<int64_t> shape, float stddev, uint64_t seed) {
  FloatTensor t;
  t.shape = std::move(shape);
  t.owned.resize(static_cast<size_t>(t.numel()));
  const int64_t n = t.numel(), chunk = 1 << 16;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + chunk - 1) / chunk; ++c) {
    std::mt19937 rng(static_cast<uint32_t>(seed * 7919 + static_cast<uint64_t>(c)));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i)
      t.owned[static_cast<size_t>(i)] =
          stddev * 1.2247f * (u(rng) + u(rng)) * 0.70710678f;  // var = std²
  }
  t.data = t.owned.data();
  return t;
}

Linear random_linear(int64_t out, int64_t in, uint64_t seed) {
  Linear l;
  l.out = out;
  l.in = in;
  l.t = random_tensor({out, in}, 1.0f / std::sqrt(static_cast<float>(in)), seed);
  return l;
}

FloatTensor ones(int64_t d) {
  FloatTensor t;
  t.shape = {d};
  t.owned.assign(static_cast<size_t>(d), 1.0f);
  t.data = t.owned.data();
  return t;
}

SwitchModel make_model(bool compressed, double* bits_per_weight) {
  SwitchModel m;
  SwitchConfig& c = m.config;
  c.vocab_size = 32128, c.d_model = 768, c.d_kv = 64, c.d_ff = 3072, c.num_heads = 12,
  c.num_experts = 8;
  const int64_t L = 12, E = 8, inner = c.num_heads * c.d_kv;
  m.layout.num_experts = E;
  uint64_t seed = 1;
  m.shared = random_tensor({c.vocab_size, c.d_model}, 1.0f, seed++);
  m.lm_head.t = m.shared;
  m.lm_head.t.data = m.lm_head.t.owned.data();
  m.lm_head.out = c.vocab_size, m.lm_head.in = c.d_model;
  int64_t cbytes = 0, cweights = 0;
  for (Stack s : {Stack::kEncoder, Stack::kDecoder}) {
    StackLayout& sl = s == Stack::kEncoder ? m.layout.encoder : m.layout.decoder;
    sl.num_blocks = L;
    auto& blocks = m.blocks(s);
    blocks.resize(static_cast<size_t>(L));
    for (int64_t b = 0; b < L; ++b) {
      Block& blk = blocks[static_cast<size_t>(b)];
      auto attn = [&](Attention& a, bool bias) {
        a.q = random_linear(inner, c.d_model, seed++);
        a.k = random_linear(inner, c.d_model, seed++);
        a.v = random_linear(inner, c.d_model, seed++);
        a.o = random_linear(c.d_model, inner, seed++);
        if (bias)
          a.relative_bias =
              random_tensor({c.relative_attention_num_buckets, c.num_heads}, 1.0f, seed++);
      };
      blk.self_ln = ones(c.d_model);
      attn(blk.self_attn, b == 0);
      if (s == Stack::kDecoder) {
        blk.cross_ln = ones(c.d_model);
        attn(blk.cross_attn, false);
      }
      blk.ff.layer_norm = ones(c.d_model);
      blk.ff.sparse = b % 2 == 1;
      sl.sparse.push_back(blk.ff.sparse);
      if (!blk.ff.sparse) {
        blk.ff.wi = random_linear(c.d_ff, c.d_model, seed++);
        blk.ff.wo = random_linear(c.d_model, c.d_ff, seed++);
        continue;
      }
      blk.ff.router = random_linear(E, c.d_model, seed++);
      for (int64_t e = 0; e < E; ++e) {
        if (!compressed) {
          blk.ff.experts.push_back(std::make_shared<DenseExpert>(
              random_linear(c.d_ff, c.d_model, seed), random_linear(c.d_model, c.d_ff, seed + 1)));
          seed += 2;
          continue;
        }
        auto ternary = [&](int64_t rows, int64_t cols) {
          std::mt19937_64 rng(seed++);
          std::uniform_real_distribution<double> u(0.0, 1.0);
          TernaryMatrix t(rows, cols);
          for (auto& sym : t.symbols) {
            const double x = u(rng);
            sym = x < 0.885 ? 0 : (x < 0.9425 ? 1 : 2);
          }
          const float lvl = 2.0f / std::sqrt(static_cast<float>(cols));
          for (int64_t r = 0; r < rows; ++r) {
            t.levels[static_cast<size_t>(2 * r)] = float_to_bf16(-lvl);
            t.levels[static_cast<size_t>(2 * r + 1)] = float_to_bf16(lvl);
          }
          EncodeOptions eo;
          eo.codec = Codec::kV1;
          return encode(t, eo);
        };
        CompressedMatrix wi = ternary(c.d_ff, c.d_model), wo = ternary(c.d_model, c.d_ff);
        cbytes += wi.view().compressed_bytes() + wo.view().compressed_bytes();
        cweights += 2 * c.d_ff * c.d_model;
        blk.ff.experts.push_back(CompressedExpert::owning(std::move(wi), std::move(wo)));
      }
    }
  }
  m.encoder_final_ln = ones(c.d_model);
  m.decoder_final_ln = ones(c.d_model);
  if (bits_per_weight)
    *bits_per_weight =
        cweights ? 8.0 * static_cast<double>(cbytes) / static_cast<double>(cweights) : 32.0;
  return m;
}

TokenPairs make_pairs(int64_t vocab) {
  const int64_t n = env_int("QMOE_BENCH_PAIRS", 4), le = env_int("QMOE_BENCH_ENC_LEN", 128),
                ld = env_int("QMOE_BENCH_DEC_LEN", 32);
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> id(2, static_cast<int32_t>(vocab - 1));
  TokenPairs p;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> e(static_cast<size_t>(le)), d(static_cast<size_t>(ld));
    for (auto& v : e) v = id(rng);
    for (auto& v : d) v = id(rng);
    p.add(e, d);
  }
  return p;
}

struct Models {
  SwitchModel dense, compressed;
  double bits = 32;
  TokenPairs pairs;
};

Models& models() {
  static Models m = [] {
    Models r;
    r.dense = make_model(false, nullptr);
    r.compressed = make_model(true, &r.bits);
    r.pairs = make_pairs(32128);
    return r;
  }();
  return m;
}

int threads_of(const benchmark::State& st) {
  return st.range(1) == 0 ? omp_get_num_procs() : 1;
}

void set_counters(benchmark::State& st, const TokenPairs& p, double bits) {
  const double toks = static_cast<double>(p.encoder_ids.size() + p.decoder_targets.size());
  st.counters["tokens/s"] =
      benchmark::Counter(toks * static_cast<double>(st.iterations()), benchmark::Counter::kIsRate);
  st.counters["target_tokens/s"] = benchmark::Counter(
      static_cast<double>(p.decoder_targets.size()) * static_cast<double>(st.iterations()),
      benchmark::Counter::kIsRate);
  st.counters["bits_per_expert_weight"] = bits;
  st.counters["threads"] = threads_of(st);
}

// range(0): 0 dense experts, 1 compressed; range(1): 1 = one thread, 0 = all threads.
void BM_Eval(benchmark::State& st) {
  Models& m = models();
  const bool comp = st.range(0) == 1;
  if (comp && m.compressed.encoder.empty()) {
    st.SkipWithError("built without the encoder module: no compressed experts");
    return;
  }
  omp_set_num_threads(threads_of(st));
  const SwitchModel& model = comp ? m.compressed : m.dense;
  double loss = 0;
  for (auto _ : st) {
    const LossResult l = cross_entropy(model, m.pairs);
    loss = l.mean();
    benchmark::DoNotOptimize(loss);
  }
  set_counters(st, m.pairs, comp ? m.bits : 32.0);
}

// Calibration: the sequential runner through every block; at each sparse block every expert's wi
// and wo inputs are gathered and added to Hessian accumulators (GPTQ itself is not included: its
// cost is per expert, not per token).
void BM_Calibration(benchmark::State& st) {
  Models& m = models();
  omp_set_num_threads(threads_of(st));
  for (auto _ : st) {
    SequentialRunner run(m.dense, m.pairs);
    while (!run.done()) {
      run.begin_block();
      if (run.sparse()) {
        for (int64_t e = 0; e < run.num_experts(); ++e) {
          const RowMatrix x = run.wi_inputs(e);
          const RowMatrix a = run.wo_inputs(e);
          HessianAccumulator hi(x.cols()), ho(a.cols());
          hi.add(x.data(), x.rows());
          ho.add(a.data(), a.rows());
          benchmark::DoNotOptimize(ho.sum().data());
        }
      }
      run.end_block();
    }
  }
  set_counters(st, m.pairs, 32.0);
}

BENCHMARK(BM_Eval)
    ->ArgNames({"compressed", "one_thread"})
    ->Args({0, 1})
    ->Args({0, 0})
    ->Args({1, 1})
    ->Args({1, 0})
    ->Iterations(2)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();
BENCHMARK(BM_Calibration)
    ->ArgNames({"unused", "one_thread"})
    ->Args({0, 1})
    ->Args({0, 0})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
