// qmoe synth (formerly generate): a synthetic Switch Transformers checkpoint in the Hugging Face
// layout (switch/generate.h), for tests, benchmarks and the main job.
#include <cstdio>
#include <memory>
#include <string>
#include <tuple>

#include "command.h"
#include "qmoe/format/error.h"
#include "qmoe/switch/generate.h"
#include "util.h"

namespace qmoe::cli {
namespace {

struct GenerateArgs {
  std::string out, preset = "switch-base-8", dtype, shard_size, target_size;
  int64_t experts = 0, d_model = 0, d_ff = 0, layers = 0, vocab = 0;
  bool all_sparse = false, every_other = false, misleading = false;
  uint64_t seed = 1;
  int threads = 0;
  int64_t calib_pairs = 0, eval_pairs = 0, encoder_length = 128, decoder_length = 32;
};

int run_generate(const GenerateArgs& a) {
  Stopwatch clock;
  sw::GenerateOptions o = sw::generate_preset(a.preset);
  if (!a.dtype.empty()) {
    if (a.dtype == "f32" || a.dtype == "F32" || a.dtype == "float32")
      o.dtype = DType::kF32;
    else if (a.dtype == "bf16" || a.dtype == "BF16" || a.dtype == "bfloat16")
      o.dtype = DType::kBF16;
    else
      throw InvalidArgument("--dtype must be f32 or bf16");
  }
  if (a.d_model > 0) {
    o.d_model = a.d_model;
    o.num_heads = std::max<int64_t>(1, a.d_model / o.d_kv);
  }
  if (a.d_ff > 0) o.d_ff = a.d_ff;
  if (a.layers > 0) o.num_layers = o.num_decoder_layers = a.layers;
  if (a.vocab > 0) o.vocab_size = a.vocab;
  if (a.all_sparse) o.sparse_step = 1;
  if (a.every_other) o.sparse_step = 2;
  if (a.misleading) o.misleading_config = true;
  if (!a.shard_size.empty()) o.shard_size = parse_bytes(a.shard_size);
  if (a.experts > 0) o.num_experts = a.experts;
  if (!a.target_size.empty()) o.num_experts = sw::experts_for_size(o, parse_bytes(a.target_size));
  o.seed = a.seed;
  o.threads = a.threads;
  if (a.calib_pairs < 0 || a.eval_pairs < 0)
    throw InvalidArgument("--calib-pairs and --eval-pairs must be >= 0");
  const auto s = sw::generate_checkpoint(a.out, o);
  // Token files beside the checkpoint: calibration and evaluation pairs from different seeds.
  for (const auto& [pairs, file, seed] :
       {std::tuple{a.calib_pairs, "calibration.safetensors", a.seed * 2 + 1},
        std::tuple{a.eval_pairs, "eval.safetensors", a.seed * 2 + 2}}) {
    if (pairs == 0) continue;
    sw::GenerateTokensOptions t;
    t.vocab_size = o.vocab_size;
    t.pairs = pairs;
    t.encoder_length = a.encoder_length;
    t.decoder_length = a.decoder_length;
    t.seed = seed;
    const auto path = std::filesystem::path(a.out) / file;
    sw::generate_tokens(t).save(path);
    std::printf("tokens %s: %lld pairs of %lld encoder + %lld decoder tokens\n",
                path.string().c_str(), static_cast<long long>(pairs),
                static_cast<long long>(a.encoder_length), static_cast<long long>(a.decoder_length));
  }
  std::printf(
      "generated %s: %lld tensors, %lld parameters (%lld expert matrices, %lld expert weights), "
      "%s, %s, "
      "%lld experts, sparse %s, %zu file(s), %s in %.2f s\n",
      a.out.c_str(), static_cast<long long>(s.tensors), static_cast<long long>(s.parameters),
      static_cast<long long>(s.expert_matrices), static_cast<long long>(s.expert_weights),
      std::string(dtype_name(o.dtype)).c_str(), o.shard_size ? "sharded" : "one file",
      static_cast<long long>(o.num_experts),
      o.sparse_step == 1 ? "every block" : "every other block", s.files.size(),
      human_bytes(static_cast<double>(s.total_bytes)).c_str(), clock.seconds());
  return 0;
}

Registrar synth_cmd("synth", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<GenerateArgs>();
  std::string presets;
  for (const auto& p : sw::generate_preset_names()) presets += (presets.empty() ? "" : ", ") + p;
  app.description(
      "Write a synthetic Switch Transformers checkpoint for tests and benchmarks (Hugging Face "
      "layout, realistic weight statistics); `generate` is its old name, kept for one release");
  app.alias("generate");
  app.add_option("out", a->out, "output directory")->required();
  app.add_option("--preset", a->preset, "shape preset: " + presets + " (default switch-base-8)");
  app.add_option("--dtype", a->dtype, "f32 or bf16");
  app.add_option("--shard-size", a->shard_size,
                 "shard at about this size, e.g. 500M (with an index and tied aliases)");
  app.add_option("--experts", a->experts, "experts per sparse block");
  app.add_option("--target-size", a->target_size,
                 "pick the number of experts so the checkpoint takes about this size");
  app.add_option("--d-model", a->d_model, "d_model");
  app.add_option("--d-ff", a->d_ff, "d_ff");
  app.add_option("--layers", a->layers, "blocks per stack (encoder and decoder)");
  app.add_option("--vocab", a->vocab, "vocabulary size");
  app.add_flag("--all-sparse", a->all_sparse, "every block sparse (switch-c-2048 layout)");
  app.add_flag("--every-other", a->every_other, "every other block sparse (switch-base layout)");
  app.add_flag("--misleading-config", a->misleading,
               "config.json understates the sparse decoder blocks, as "
               "switch-c-2048's does");
  app.add_option("--calib-pairs", a->calib_pairs,
                 "also write OUT/calibration.safetensors with this many token pairs (for "
                 "qmoe compress --calib-tokens)");
  app.add_option("--eval-pairs", a->eval_pairs,
                 "also write OUT/eval.safetensors with this many token pairs (for qmoe eval)");
  app.add_option("--encoder-length", a->encoder_length, "encoder tokens per pair (default 128)");
  app.add_option("--decoder-length", a->decoder_length, "decoder tokens per pair (default 32)");
  app.add_option("--seed", a->seed, "random seed");
  app.add_option("--threads", a->threads,
                 "threads (0 = all); the bytes are the same for any value");
  return [a] { return run_generate(*a); };
});

}  // namespace
}  // namespace qmoe::cli
