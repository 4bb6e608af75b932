// qmoe eval MODEL --tokens FILE: teacher-forced cross-entropy of a Switch model (a Hugging Face
// checkpoint directory or a qmoe container) on a token file, and its speed.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "command.h"
#include "qmoe/format/error.h"
#include "qmoe/switch/forward.h"
#include "ternary_flags.h"
#include "util.h"

#include "qmoe/switch/compress_experts.h"

namespace qmoe::cli {
namespace {

struct EvalArgs {
  std::string model, tokens, config;
  int threads = 0;
  int64_t batch = 8;
  int64_t capacity = 0;
  int64_t max_pairs = 0;
  bool dense_experts = false;
  bool progress = false;
  std::string quantize = "none";  // none | rtn | gptq
  std::string calib_tokens;
  bool no_sequential = false;
  double percdamp = 0.1;
  bool actorder = false;
  TernaryFlags ternary;
};

int run_eval(const EvalArgs& a) {
  if (a.threads < 0) throw InvalidArgument("--threads must be >= 0");
  if (a.batch < 1) throw InvalidArgument("--batch must be >= 1");
  if (a.capacity < 0) throw InvalidArgument("--capacity must be >= 0");
  if (a.threads > 0) omp_set_num_threads(a.threads);
  Stopwatch load_clock;
  const auto src = sw::SwitchSource::open(a.model, a.config);
  sw::LoadOptions lo;
  lo.compressed_experts = !a.dense_experts;
  sw::SwitchModel m = sw::SwitchModel::load(src, lo);
  sw::TokenPairs pairs = sw::TokenPairs::load(a.tokens, m.config.vocab_size);
  if (a.max_pairs > 0 && a.max_pairs < pairs.num_pairs()) pairs = pairs.slice(0, a.max_pairs);
  // A mean over nothing is no result: refuse before any work instead of reporting "loss 0".
  if (pairs.num_pairs() == 0)
    throw FormatError(error_context(a.tokens, "", "holds no pairs: there is nothing to evaluate"));
  if (std::all_of(pairs.decoder_targets.begin(), pairs.decoder_targets.end(),
                  [](int32_t t) { return t == -100; }))
    throw FormatError(error_context(a.tokens, "decoder_targets",
                                    "no target to score (every pair's targets are empty or -100)"));
  const double load_s = load_clock.seconds();

  if (a.quantize != "none") {
    if (a.quantize != "rtn" && a.quantize != "gptq")
      throw InvalidArgument("--quantize must be none, rtn or gptq (not '" + a.quantize + "')");
    sw::ExpertCompressOptions co;
    co.rtn = a.quantize == "rtn";
    co.sequential = !a.no_sequential;
    co.threads = a.threads;
    co.gptq.percdamp = a.percdamp;
    co.gptq.actorder = a.actorder;
    apply_ternary_flags(a.ternary, !co.rtn, co.gptq.ternary, co.rate, co.gptq.actorder);
    sw::TokenPairs calib;
    if (!co.rtn) {
      if (a.calib_tokens.empty())
        throw InvalidArgument("--quantize gptq needs --calib-tokens FILE");
      calib = sw::TokenPairs::load(a.calib_tokens, m.config.vocab_size);
    }
    Stopwatch qclock;
    int64_t bytes = 0, weights = 0, zeros = 0;
    double gptq_loss = 0, min_bits = INFINITY, max_bits = 0;
    sw::compress_experts(m, calib, co, [&](sw::CompressedExpertResult& r) {
      for (const auto* c : {&r.wi, &r.wo}) {
        const int64_t n = c->matrix.rows * c->matrix.cols;
        bytes += c->matrix.view().compressed_bytes();
        weights += n;
        zeros += std::llround(c->zero_fraction * static_cast<double>(n));
        gptq_loss += c->output_loss;
        min_bits = std::min(min_bits, c->matrix.view().bits_per_weight());
        max_bits = std::max(max_bits, c->matrix.view().bits_per_weight());
      }
    });
    const double w = static_cast<double>(weights);
    std::printf("quantize %s%s: %.4f bits per expert weight, %.2f s", a.quantize.c_str(),
                co.rtn ? "" : (co.sequential ? " (sequential)" : " (one pass, original model)"),
                weights ? 8.0 * static_cast<double>(bytes) / w : 0.0, qclock.seconds());
    if (!co.rtn) std::printf(", summed GPTQ layer output loss %.6g", gptq_loss);
    std::printf("\n");
    if (weights)
      std::printf("matrices %.4f to %.4f bits per weight, %.4f zeros\n", min_bits, max_bits,
                  static_cast<double>(zeros) / w);
  }

  int64_t compressed = 0, experts = 0;
  for (sw::Stack s : {sw::Stack::kEncoder, sw::Stack::kDecoder})
    for (const auto& b : m.blocks(s))
      for (const auto& e : b.ff.experts) {
        ++experts;
        compressed += e->kind() == "compressed" ? 1 : 0;
      }
  std::printf(
      "model    %s (%s; %lld encoder + %lld decoder blocks, %lld experts per sparse block, "
      "%lld of %lld experts run compressed)\n",
      a.model.c_str(), src->is_container() ? "qmoe container" : "checkpoint",
      static_cast<long long>(m.encoder.size()), static_cast<long long>(m.decoder.size()),
      static_cast<long long>(m.layout.num_experts), static_cast<long long>(compressed),
      static_cast<long long>(experts));
  std::printf("tokens   %s: %lld pairs, %lld encoder + %lld decoder tokens (loaded in %.2f s)\n",
              a.tokens.c_str(), static_cast<long long>(pairs.num_pairs()),
              static_cast<long long>(pairs.encoder_ids.size()),
              static_cast<long long>(pairs.decoder_targets.size()), load_s);
  std::fflush(stdout);

  sw::ForwardOptions fo;
  fo.expert_capacity = a.capacity;
  const int64_t total = pairs.num_pairs();
  const auto progress = [&](int64_t done) {
    if (a.progress)
      std::fprintf(stderr, "\r%lld / %lld pairs", static_cast<long long>(done),
                   static_cast<long long>(total));
  };
  const sw::EvalResult r = sw::evaluate(m, pairs, a.batch, fo, progress);
  if (a.progress) std::fprintf(stderr, "\n");
  if (!std::isfinite(r.loss.mean())) {
    // NaN or infinite weights are the usual cause: name the first one.
    const auto bad = src->find_non_finite();
    const std::string loss = "the loss over " + std::to_string(r.loss.targets) + " targets is " +
                             std::to_string(r.loss.mean());
    if (bad) throw FormatError(*bad + ", and " + loss);
    throw Error(a.model + ": " + loss +
                " although every stored weight is finite: the activations overflowed");
  }
  const double toks = static_cast<double>(r.encoder_tokens + r.decoder_tokens);
  std::printf("loss     %.6f nats per target token (%lld targets; perplexity %.6g)\n",
              r.loss.mean(), static_cast<long long>(r.loss.targets), std::exp(r.loss.mean()));
  std::printf(
      "speed    %.1f tokens/s (encoder + decoder), %.1f target tokens/s, %.2f s, %d threads, batch "
      "%lld; %.1f GFLOP/s (%.3g GFLOP, dense-equivalent)\n",
      r.seconds > 0 ? toks / r.seconds : 0.0,
      r.seconds > 0 ? static_cast<double>(r.decoder_tokens) / r.seconds : 0.0, r.seconds,
      omp_get_max_threads(), static_cast<long long>(a.batch),
      r.seconds > 0 ? r.flops / r.seconds * 1e-9 : 0.0, r.flops * 1e-9);
  return 0;
}

const Registrar reg("eval", [](CLI::App& app) -> std::function<int()> {
  auto args = std::make_shared<EvalArgs>();
  app.description(
      "Mean cross-entropy of the decoder targets of a token file (teacher forcing), and tokens/s, "
      "for a Switch "
      "checkpoint directory or a qmoe container");
  app.add_option("model", args->model,
                 "checkpoint directory (config.json + safetensors) or qmoe container")
      ->required();
  app.add_option("--tokens", args->tokens, "token file (format/TOKENS.md)")->required();
  app.add_option("--config", args->config,
                 "config.json to use (default: the model's own, or beside a container)");
  app.add_option("--threads", args->threads,
                 "OpenMP threads (0: all); results are identical for any count");
  app.add_option("--batch", args->batch, "pairs per forward batch (default 8)");
  app.add_option("--capacity", args->capacity,
                 "expert capacity per sequence; 0 (default) = no dropping. Dropped tokens behave "
                 "as in transformers");
  app.add_option("--max-pairs", args->max_pairs, "evaluate only the first N pairs");
  app.add_flag("--dense-experts", args->dense_experts,
               "decode compressed experts once at load time instead of running them compressed");
  app.add_flag("--progress", args->progress, "pairs done on stderr");
  app.add_option("--quantize", args->quantize,
                 "compress the experts in memory before evaluating: none (default), rtn "
                 "(round-to-nearest ternary) "
                 "or gptq (ternary GPTQ on Hessians from --calib-tokens)");
  app.add_option("--calib-tokens", args->calib_tokens,
                 "calibration token file for --quantize gptq");
  app.add_flag(
      "--no-sequential", args->no_sequential,
      "gptq: take every Hessian from the original model instead of recomputing each block with the "
      "compressed experts of the blocks before it");
  app.add_option("--percdamp", args->percdamp,
                 "gptq: dampening, a fraction of the mean diagonal of H (default 0.1)");
  app.add_flag("--actorder", args->actorder,
               "gptq: columns in order of decreasing Hessian diagonal");
  add_ternary_flags(app, args->ternary);
  return [args] { return run_eval(*args); };
});

}  // namespace
}  // namespace qmoe::cli
