// Synthetic Switch Transformers checkpoints in the Hugging Face hub layout, for tests, benchmarks
// and the main job: config.json with the real field names, the real tensor names and shapes, fp32
// or bf16, one model.safetensors or shards with model.safetensors.index.json (including the tied
// aliases the safetensors conversion bot writes), sparse every other block (switch-base) or every
// block (switch-c-2048), and weights with the statistics that matter for ternary compression.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "qmoe/core/dtype.h"
#include "qmoe/switch/tokens.h"

namespace qmoe::sw {

struct GenerateOptions {
  int64_t vocab_size = 32128;
  int64_t d_model = 768;
  int64_t d_ff = 3072;
  int64_t d_kv = 64;
  int64_t num_heads = 12;
  int64_t num_layers = 12;          // encoder blocks
  int64_t num_decoder_layers = 12;  // decoder blocks
  int64_t num_experts = 8;
  // 2: blocks 1, 3, 5, ... are sparse (switch-base); 1: every block is sparse (switch-c-2048).
  int64_t sparse_step = 2;
  DType dtype = DType::kF32;  // kF32 or kBF16
  // 0: one model.safetensors. Otherwise shards of at most about this many bytes (a tensor is
  // never split), named model-XXXXX-of-YYYYY.safetensors, plus model.safetensors.index.json with
  // index entries for the tied aliases encoder/decoder.embed_tokens.weight and lm_head.weight,
  // resolved through the __metadata__ of the shard holding shared.weight.
  int64_t shard_size = 0;
  // Write config.json as published for the largest models: claims num_sparse_decoder_layers
  // that disagree with the tensors (readers must find sparse blocks from tensor names).
  bool misleading_config = false;
  uint64_t seed = 1;
  int threads = 0;  // OpenMP threads (0 = default); the bytes are identical for any value
};

// Presets: "switch-base-8" (d_model 768, d_ff 3072, 12+12 blocks, every other sparse, 8 experts),
// "switch-base-8-bf16", "c2048-style" (all sparse, bf16, sharded, misleading config; scaled
// down), "tiny" (d_model 64, d_ff 256, 4+4 blocks, 8 experts), "small" (d_model 512, d_ff 2048,
// 8+8 blocks, 8 experts), "c2048-block" (switch-c-2048's shapes, d_model 2080, d_ff 6144, 30
// heads, bf16, with one sparse block per stack of 64 experts: 6.5 GB). Throws InvalidArgument for
// an unknown name.
GenerateOptions generate_preset(const std::string& name);
std::vector<std::string> generate_preset_names();

// Number of experts for which the checkpoint of `opt` takes about `bytes` (at least 1).
int64_t experts_for_size(const GenerateOptions& opt, int64_t bytes);

struct GenerateSummary {
  std::vector<std::filesystem::path> files;  // config.json, shards, index
  int64_t total_bytes = 0;                   // of all files
  int64_t tensors = 0;
  int64_t expert_matrices = 0;
  int64_t expert_weights = 0;
  int64_t parameters = 0;
};

// Writes the checkpoint into directory `dir` (created if needed; existing model files in it are
// replaced). Files are written under temporary names and renamed at the end. Deterministic: the
// same options give the same bytes for any thread count. Throws InvalidArgument for bad options,
// Error for I/O failures.
GenerateSummary generate_checkpoint(const std::filesystem::path& dir, const GenerateOptions& opt);

// Synthetic calibration or evaluation token pairs: every id drawn independently from a Zipf
// distribution over the vocabulary (rank r has weight (r + 1)^-s; ranks are spread over the ids by
// a fixed permutation), so that some experts receive more tokens than others, as with text.
// Deterministic for a seed.
struct GenerateTokensOptions {
  int64_t vocab_size = 32128;
  int64_t pairs = 128;
  int64_t encoder_length = 128;
  int64_t decoder_length = 32;
  double zipf_exponent = 1.1;
  uint64_t seed = 1;
};
// Throws InvalidArgument for a vocabulary below 2 ids, negative pairs or lengths below 1.
TokenPairs generate_tokens(const GenerateTokensOptions& opt);

}  // namespace qmoe::sw
