// Switch Transformers checkpoints as qmoe reads them: the Hugging Face hub layout (config.json plus
// model.safetensors, or shards with model.safetensors.index.json) or a qmoe container, and the
// model's layout (blocks, sparse blocks, experts) found from the tensor names.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/format/container.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/safetensors.h"

namespace qmoe::sw {

// The largest matrix dimension a config may imply (d_model, d_ff, d_kv, num_heads, num_heads x
// d_kv, num_experts): the row limit of a compressed matrix (format/SPEC.md 2.3).
inline constexpr int64_t kMaxDimension = (int64_t{1} << 31) - 2;
// The most relative-position buckets a config may have (T5 uses 32).
inline constexpr int64_t kMaxRelativeBuckets = 65536;

// The fields of config.json the forward pass needs. Block counts and sparsity are NOT taken from
// here (switch-c-2048's config is wrong): see SwitchLayout.
struct SwitchConfig {
  int64_t vocab_size = 0;
  int64_t d_model = 0;
  int64_t d_kv = 0;
  int64_t d_ff = 0;
  int64_t num_heads = 0;
  int64_t num_experts = 0;  // as configured; the layout's count (from router shapes) wins
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  int64_t expert_capacity = 64;  // informative; the forward pass takes capacity as an option
  double layer_norm_epsilon = 1e-6;
  bool tie_word_embeddings = true;
  int32_t decoder_start_token_id = 0;
  int32_t pad_token_id = 0;

  // Parses config.json text. Throws FormatError naming `file` when the JSON breaks the rules of
  // format/SPEC.md section 2.1, a required field is missing, of the wrong type or out of range
  // (every integer has an upper bound: sizes kMaxDimension, token ids below vocab_size,
  // relative_attention_num_buckets in [4, kMaxRelativeBuckets] and max_distance beyond half of
  // it), a product of sizes (num_heads x d_kv, the element count of every matrix the config
  // implies) overflows its bound, or the model is not a Switch Transformer (model_type other
  // than "switch_transformers", or no num_experts).
  static SwitchConfig parse(std::string_view json_text, const std::string& file);
  static SwitchConfig load(const std::filesystem::path& config_json);
  // The config.json text of this config (the fields above only).
  std::string to_json() const;
};

// One stack's blocks as found in the tensor names.
struct StackLayout {
  int64_t num_blocks = 0;
  std::vector<bool> sparse;  // per block: has "...layer.{ff}.mlp.router.classifier.weight"
};

struct SwitchLayout {
  StackLayout encoder;
  StackLayout decoder;
  int64_t num_experts = 0;  // from the router's shape (0 if no sparse block)
};

// Names of the tensors of a Switch checkpoint (HF layout). `stack` is "encoder" or "decoder".
// The feed-forward layer index is 1 in the encoder and 2 in the decoder (after cross-attention).
struct SwitchNames {
  static std::string block_prefix(std::string_view stack, int64_t block);
  static int64_t ff_layer(std::string_view stack) { return stack == "decoder" ? 2 : 1; }
  static std::string ff_prefix(std::string_view stack,
                               int64_t block);  // "<stack>.block.<b>.layer.<ff>."
  static std::string router(std::string_view stack, int64_t block);
  static std::string expert(std::string_view stack, int64_t block, int64_t expert,
                            std::string_view w);  // w: wi|wo
};

// A float32 copy (or zero-copy view, for F32 tensors) of a stored tensor.
struct FloatTensor {
  std::vector<int64_t> shape;
  const float* data = nullptr;  // points into `owned` or into the mapped file
  std::vector<float> owned;     // filled when the tensor needed conversion (BF16, F16)
  int64_t numel() const;
};

// Read access to the tensors of a Switch model, from a checkpoint directory or a qmoe container.
// Thread-safe for reading; cheap to share through the shared_ptr returned by open().
class SwitchSource {
 public:
  // `path`: a checkpoint directory (config.json + model.safetensors or the sharded form), a qmoe
  // container (a directory or file that Container::open accepts, holding the checkpoint's tensors;
  // its config comes from the container metadata key "config.json" or from a config.json beside
  // it; `config_json`, when given, is used instead). Validates everything up front, from the
  // headers alone (no tensor data is read): config, shard files, index entries, and every tensor
  // the forward pass loads -- present, of a float dtype (or compressed, for experts) and of the
  // shape the config and the layout imply (the embedding is [vocab_size, d_model], lm_head.weight
  // exists when tie_word_embeddings is false, attention is [num_heads * d_kv, d_model], ...);
  // FormatError naming the file and tensor otherwise.
  static std::shared_ptr<const SwitchSource> open(const std::filesystem::path& path,
                                                  const std::filesystem::path& config_json = {});
  // The same for a container already open (e.g. with verified checksums), found at `path`.
  static std::shared_ptr<const SwitchSource> open(Container container,
                                                  const std::filesystem::path& path,
                                                  const std::filesystem::path& config_json = {});

  const SwitchConfig& config() const { return config_; }
  const SwitchLayout& layout() const { return layout_; }
  const std::filesystem::path& path() const { return path_; }
  bool is_container() const { return container_.has_value(); }

  // True if a dense tensor (or a compressed matrix, for containers) of this name exists. Tied
  // aliases (encoder/decoder.embed_tokens.weight -> shared.weight) resolve as in HF's shards.
  bool has(std::string_view name) const;
  // The tensor as float32, checked against `shape` (empty: any). Throws FormatError naming the
  // file and tensor when it is missing, compressed, of a non-float dtype or of another shape.
  FloatTensor dense(std::string_view name, const std::vector<int64_t>& shape = {}) const;
  // A dense tensor as stored: its bytes (a view of the mapping), dtype, shape and file. Throws
  // FormatError naming the file and tensor when it is missing or compressed.
  struct Stored {
    std::span<const std::byte> bytes;
    DType dtype = DType::kF32;
    std::vector<int64_t> shape;
    std::string file;
  };
  Stored stored(std::string_view name) const;
  // The compressed matrix of that name (containers only), nullptr if it is not compressed.
  const CompressedView* compressed(std::string_view name) const;
  // All tensor names (dense and compressed), sorted.
  std::vector<std::string> names() const;
  // The safetensors files of a checkpoint (empty for a container), each holding the tensors
  // actually stored (tied aliases are index entries, not tensors).
  const std::vector<SafetensorsFile>& shards() const { return shards_; }
  // The first stored float tensor (in name order) holding a NaN or an infinity, as
  // "<file>: tensor '<name>': element <i> is nan" (nullopt when every one is finite). Reads every
  // dense float tensor: a diagnosis for results that came out non-finite, not a load-time check.
  // (The levels of compressed matrices are finite by validation.)
  std::optional<std::string> find_non_finite() const;

 private:
  struct Located {
    const SafetensorsFile* file = nullptr;
    const TensorInfo* info = nullptr;
  };
  std::optional<Located> locate(std::string_view name) const;
  std::string file_of(std::string_view name) const;

  std::filesystem::path path_;
  SwitchConfig config_;
  SwitchLayout layout_;
  std::vector<SafetensorsFile> shards_;
  std::vector<std::pair<std::string, Located>> index_;  // sorted by name
  std::optional<Container> container_;

  void build_layout();
  void check_tensors() const;
};

}  // namespace qmoe::sw
