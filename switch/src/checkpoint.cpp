#include "qmoe/switch/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "qmoe/core/bf16.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "text_file.h"

namespace qmoe::sw {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using internal::read_text;

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Tied aliases that HF checkpoints may name without storing (resolved to shared.weight).
std::optional<std::string> tied_alias_target(std::string_view name) {
  if (name == "encoder.embed_tokens.weight" || name == "decoder.embed_tokens.weight")
    return "shared.weight";
  return std::nullopt;
}

void convert_to_float(DType dt, std::span<const std::byte> bytes, std::vector<float>& out) {
  out.resize(bytes.size() / static_cast<size_t>(dtype_size(dt)));
  to_float(dt, bytes, out.data());
}

}  // namespace

// ---- config -------------------------------------------------------------------------------------

SwitchConfig SwitchConfig::parse(std::string_view json_text, const std::string& file) {
  // The JSON rules of format/SPEC.md section 2.1: no byte-order mark, no duplicate keys (which
  // value would count?), no U+0000.
  check_json_text(json_text, file);
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw FormatError(error_context(file, "", std::string("invalid JSON: ") + e.what()));
  }
  if (!j.is_object()) throw FormatError(error_context(file, "", "config is not a JSON object"));
  if (j.contains("model_type") && j["model_type"] != "switch_transformers")
    throw FormatError(error_context(
        file, "", "not a Switch Transformers config (model_type " + j["model_type"].dump() + ")"));
  auto fail = [&](const std::string& what) { return FormatError(error_context(file, "", what)); };
  // Every integer is bounded: sizes are matrix dimensions (at most kMaxDimension, as the rows of a
  // compressed matrix), token ids are int32.
  auto get_int = [&](const char* key, std::optional<int64_t> def, int64_t min, int64_t max,
                     const std::string& why = "") -> int64_t {
    const std::string because = why.empty() ? "" : " (" + why + ")";
    if (!j.contains(key) || j[key].is_null()) {
      if (def) return *def;
      throw fail(std::string("missing field '") + key + "'");
    }
    const json& v = j[key];
    if (!v.is_number_integer()) throw fail(std::string("field '") + key + "' is not an integer");
    if (v.is_number_unsigned() &&
        v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw fail(std::string("field '") + key + "' = " + v.dump() + " is above " +
                 std::to_string(max) + because);
    const int64_t x = v.get<int64_t>();
    if (x < min)
      throw fail(std::string("field '") + key + "' = " + std::to_string(x) + " is below " +
                 std::to_string(min) + because);
    if (x > max)
      throw fail(std::string("field '") + key + "' = " + std::to_string(x) + " is above " +
                 std::to_string(max) + because);
    return x;
  };
  constexpr int64_t kTokenMax = std::numeric_limits<int32_t>::max();
  SwitchConfig c;
  c.vocab_size = get_int("vocab_size", std::nullopt, 1, kTokenMax);
  c.d_model = get_int("d_model", std::nullopt, 1, kMaxDimension);
  c.d_kv = get_int("d_kv", std::nullopt, 1, kMaxDimension);
  c.d_ff = get_int("d_ff", std::nullopt, 1, kMaxDimension);
  c.num_heads = get_int("num_heads", std::nullopt, 1, kMaxDimension);
  c.num_experts = get_int("num_experts", std::nullopt, 1, kMaxDimension);
  // T5's relative position buckets: half of them per direction in the encoder, and half of those
  // exact; at least 4 so that every direction has an exact bucket, and a max_distance beyond the
  // exact buckets of both stacks (else the logarithmic buckets divide by log(<= 1)).
  c.relative_attention_num_buckets =
      get_int("relative_attention_num_buckets", 32, 4, kMaxRelativeBuckets);
  c.relative_attention_max_distance =
      get_int("relative_attention_max_distance", 128, c.relative_attention_num_buckets / 2 + 1,
              kTokenMax, "it must exceed half of relative_attention_num_buckets");
  c.expert_capacity = get_int("expert_capacity", 64, 0, kTokenMax);
  const std::string vocab =
      "not a token id of the vocabulary [0, vocab_size = " + std::to_string(c.vocab_size) + ")";
  c.decoder_start_token_id =
      static_cast<int32_t>(get_int("decoder_start_token_id", 0, 0, c.vocab_size - 1, vocab));
  c.pad_token_id = static_cast<int32_t>(get_int("pad_token_id", 0, 0, c.vocab_size - 1, vocab));
  // Products: the width of the attention projections and the size of every matrix the config
  // implies. num_heads * d_kv = 2^64 + 32 would otherwise wrap to a plausible 32.
  auto product = [&](int64_t a, int64_t b, const std::string& what, int64_t max) {
    int64_t r = 0;
    if (__builtin_mul_overflow(a, b, &r) || r > max)
      throw fail(what + " = " + std::to_string(a) + " x " + std::to_string(b) +
                 " is above the limit of " + std::to_string(max));
    return r;
  };
  const int64_t inner = product(c.num_heads, c.d_kv, "num_heads x d_kv", kMaxDimension);
  // Float matrices of these shapes, and the products' accumulators, must be addressable in bytes.
  constexpr int64_t kMaxElements = std::numeric_limits<int64_t>::max() / 8;
  (void)product(c.vocab_size, c.d_model, "vocab_size x d_model", kMaxElements);
  (void)product(inner, c.d_model, "num_heads x d_kv x d_model", kMaxElements);
  (void)product(c.d_ff, c.d_model, "d_ff x d_model", kMaxElements);
  (void)product(c.num_experts, c.d_model, "num_experts x d_model", kMaxElements);
  (void)product(c.relative_attention_num_buckets, c.num_heads,
                "relative_attention_num_buckets x num_heads", kMaxElements);
  if (j.contains("layer_norm_epsilon")) {
    const json& e = j["layer_norm_epsilon"];
    if (!e.is_number() || !(e.get<double>() > 0) || !std::isfinite(e.get<double>()))
      throw fail("field 'layer_norm_epsilon' is not a positive finite number");
    c.layer_norm_epsilon = e.get<double>();
  }
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean())
      throw fail("field 'tie_word_embeddings' is not a boolean");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("dense_act_fn") && j["dense_act_fn"] != "relu")
    throw fail("unsupported dense_act_fn " + j["dense_act_fn"].dump() + " (only relu)");
  if (j.contains("router_bias") && j["router_bias"] == true)
    throw fail("router_bias = true is not supported");
  if (j.contains("feed_forward_proj") && j["feed_forward_proj"] != "relu")
    throw fail("unsupported feed_forward_proj " + j["feed_forward_proj"].dump());
  return c;
}

SwitchConfig SwitchConfig::load(const fs::path& config_json) {
  return parse(read_text(config_json), config_json.string());
}

std::string SwitchConfig::to_json() const {
  json j = {{"model_type", "switch_transformers"},
            {"vocab_size", vocab_size},
            {"d_model", d_model},
            {"d_kv", d_kv},
            {"d_ff", d_ff},
            {"num_heads", num_heads},
            {"num_experts", num_experts},
            {"relative_attention_num_buckets", relative_attention_num_buckets},
            {"relative_attention_max_distance", relative_attention_max_distance},
            {"expert_capacity", expert_capacity},
            {"layer_norm_epsilon", layer_norm_epsilon},
            {"tie_word_embeddings", tie_word_embeddings},
            {"decoder_start_token_id", decoder_start_token_id},
            {"pad_token_id", pad_token_id},
            {"dense_act_fn", "relu"}};
  return j.dump(2);
}

// ---- names --------------------------------------------------------------------------------------

std::string SwitchNames::block_prefix(std::string_view stack, int64_t block) {
  return std::string(stack) + ".block." + std::to_string(block) + ".";
}
std::string SwitchNames::ff_prefix(std::string_view stack, int64_t block) {
  return block_prefix(stack, block) + "layer." + std::to_string(ff_layer(stack)) + ".";
}
std::string SwitchNames::router(std::string_view stack, int64_t block) {
  return ff_prefix(stack, block) + "mlp.router.classifier.weight";
}
std::string SwitchNames::expert(std::string_view stack, int64_t block, int64_t expert,
                                std::string_view w) {
  return ff_prefix(stack, block) + "mlp.experts.expert_" + std::to_string(expert) + "." +
         std::string(w) + ".weight";
}

int64_t FloatTensor::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// ---- source -------------------------------------------------------------------------------------

std::shared_ptr<const SwitchSource> SwitchSource::open(const fs::path& path,
                                                       const fs::path& config_json) {
  auto src = std::shared_ptr<SwitchSource>(new SwitchSource());
  src->path_ = path;
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw FormatError(error_context(path.string(), "", "no such file or directory"));
  const fs::path dir = fs::is_directory(path) ? path : path.parent_path();
  const bool hf_single = fs::is_directory(path) && fs::exists(dir / "model.safetensors");
  const bool hf_index = fs::is_directory(path) && fs::exists(dir / "model.safetensors.index.json");

  // A qmoe container is recognised by its metadata; try it first when the files could be one.
  auto looks_like_container = [&]() {
    fs::path probe;
    if (!fs::is_directory(path)) {
      if (path.extension() == ".json") return true;  // an index: let Container decide
      probe = path;
    } else if (hf_single) {
      probe = dir / "model.safetensors";
    } else if (hf_index) {
      return true;
    } else {
      return false;
    }
    const auto f = SafetensorsFile::open(probe);
    auto it = f.metadata().find("format");
    return it != f.metadata().end() && it->second == kFormatName;
  };
  bool is_container = false;
  if (looks_like_container()) {
    if (hf_index && fs::is_directory(path)) {
      const json idx = json::parse(read_text(dir / "model.safetensors.index.json"), nullptr, false);
      is_container = idx.is_object() && idx.contains("metadata") && idx["metadata"].is_object() &&
                     idx["metadata"].value("format", "") == kFormatName;
    } else {
      is_container = true;
    }
  }

  if (is_container) return open(Container::open(path), path, config_json);
  {  // A Hugging Face checkpoint directory.
    if (!fs::is_directory(path))
      throw FormatError(
          error_context(path.string(), "", "not a checkpoint directory nor a qmoe container"));
    const fs::path cfg = config_json.empty() ? dir / "config.json" : config_json;
    if (!fs::exists(cfg)) throw FormatError(error_context(cfg.string(), "", "missing config.json"));
    src->config_ = SwitchConfig::load(cfg);
    std::map<std::string, std::string> weight_map;  // tensor -> shard file name
    std::vector<std::string> shard_names;
    if (hf_index) {
      const fs::path ip = dir / "model.safetensors.index.json";
      json idx;
      try {
        const std::string text = read_text(ip);
        check_json_text(text, ip.string());
        idx = json::parse(text);
      } catch (const json::exception& e) {
        throw FormatError(error_context(ip.string(), "", std::string("invalid JSON: ") + e.what()));
      }
      if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
        throw FormatError(error_context(ip.string(), "", "no 'weight_map' object"));
      for (auto& [k, v] : idx["weight_map"].items()) {
        if (!v.is_string())
          throw FormatError(error_context(ip.string(), k, "shard name is not a string"));
        const std::string s = v.get<std::string>();
        if (s.find('/') != std::string::npos || s.find('\\') != std::string::npos || s == ".." ||
            s.empty())
          throw FormatError(
              error_context(ip.string(), k, "shard name '" + s + "' is not a plain file name"));
        weight_map[k] = s;
        if (std::find(shard_names.begin(), shard_names.end(), s) == shard_names.end())
          shard_names.push_back(s);
      }
      std::sort(shard_names.begin(), shard_names.end());
    } else if (hf_single) {
      shard_names.push_back("model.safetensors");
    } else {
      throw FormatError(
          error_context(dir.string(), "", "no model.safetensors nor model.safetensors.index.json"));
    }
    src->shards_.reserve(shard_names.size());
    for (const auto& s : shard_names) {
      if (!fs::exists(dir / s))
        throw FormatError(error_context((dir / s).string(), "", "missing shard file"));
      src->shards_.push_back(SafetensorsFile::open(dir / s));
    }
    std::map<std::string, Located> located;
    for (const auto& f : src->shards_)
      for (const auto& t : f.tensors()) {
        if (located.count(t.name))
          throw FormatError(
              error_context(f.path().string(), t.name, "tensor stored in two shards"));
        located[t.name] = Located{&f, &t};
      }
    // Every index entry must name a tensor in its shard, or be a tied alias that the shard's
    // metadata or the tied-embedding convention resolves.
    for (const auto& [name, shard] : weight_map) {
      auto it = located.find(name);
      if (it != located.end()) {
        if (it->second.file->path().filename() != shard)
          throw FormatError(error_context((dir / shard).string(), name,
                                          "index names this shard but the tensor is in " +
                                              it->second.file->path().filename().string()));
        continue;
      }
      // The shard is one of shards_, which were opened from the weight_map's shard names.
      // shard_file: clang 14 (the fuzz build's compiler) cannot capture a structured binding.
      const std::string& shard_file = shard;
      const auto& f = *std::find_if(
          src->shards_.begin(), src->shards_.end(),
          [&](const SafetensorsFile& s) { return s.path().filename() == shard_file; });
      std::optional<std::string> target;
      if (auto m = f.metadata().find(name); m != f.metadata().end())
        target = m->second;  // HF bot aliases
      if (!target) target = tied_alias_target(name);
      if (!target && name == "lm_head.weight" && src->config_.tie_word_embeddings)
        target = "shared.weight";
      if (!target || !located.count(*target))
        throw FormatError(error_context((dir / shard).string(), name,
                                        "index entry names a tensor the shard lacks"));
      located[name] = located[*target];
    }
    src->index_.assign(located.begin(), located.end());
  }
  src->build_layout();
  src->check_tensors();
  return src;
}

// Every tensor the forward pass loads, with the shape the config and the layout imply, checked
// from the headers alone (no tensor data is read): a config that contradicts the weights is
// refused here, before any work, rather than by the first pass that touches the tensor.
void SwitchSource::check_tensors() const {
  const SwitchConfig& c = config_;
  const std::string cfg = " in the config";
  auto dims = [](std::initializer_list<std::pair<const char*, int64_t>> d) {
    std::string r;
    for (const auto& [k, v] : d)
      r += (r.empty() ? "" : ", ") + std::string(k) + " " + std::to_string(v);
    return r;
  };
  auto check = [&](const std::string& name, const std::vector<int64_t>& want,
                   const std::string& why, bool may_be_compressed,
                   const std::string& missing_why = "") {
    std::vector<int64_t> got;
    std::string file = path_.string();
    DType dtype = DType::kF32;
    bool compressed = false;
    if (container_) {
      const DenseEntry* d = container_->find_dense(name);
      if (!d) {
        if (auto a = tied_alias_target(name)) d = container_->find_dense(*a);
      }
      if (d) {
        got = d->shape;
        dtype = d->dtype;
        file = d->shard;
      } else if (const CompressedEntry* e = container_->find_compressed(name)) {
        got = e->original_shape;
        file = e->shard;
        compressed = true;
      } else {
        throw FormatError(error_context(
            path_.string(), name,
            "missing tensor" + (missing_why.empty() ? "" : " (" + missing_why + ")")));
      }
    } else {
      const auto l = locate(name);
      if (!l)
        throw FormatError(error_context(
            path_.string(), name,
            "missing tensor" + (missing_why.empty() ? "" : " (" + missing_why + ")")));
      got = l->info->shape;
      dtype = l->info->dtype;
      file = l->file->path().string();
    }
    if (compressed && !may_be_compressed)
      throw FormatError(
          error_context(file, name, "is compressed where the model needs a dense tensor"));
    if (!compressed && dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16)
      throw FormatError(error_context(
          file, name, "dtype " + std::string(dtype_name(dtype)) + " (expected F32, BF16 or F16)"));
    if (got != want)
      throw FormatError(error_context(
          file, name,
          "shape " + shape_str(got) + ", expected " + shape_str(want) + " (" + why + cfg + ")"));
  };
  const int64_t inner = c.num_heads * c.d_kv;  // bounded by SwitchConfig::parse
  const std::string emb = has("shared.weight") ? "shared.weight" : "encoder.embed_tokens.weight";
  check(emb, {c.vocab_size, c.d_model},
        dims({{"vocab_size", c.vocab_size}, {"d_model", c.d_model}}), false,
        "the token embedding, shared.weight");
  if (!c.tie_word_embeddings)
    check("lm_head.weight", {c.vocab_size, c.d_model},
          dims({{"vocab_size", c.vocab_size}, {"d_model", c.d_model}}), false,
          "tie_word_embeddings is false in the config, so the output layer is lm_head.weight");
  const std::string heads =
      dims({{"num_heads", c.num_heads}, {"d_kv", c.d_kv}, {"d_model", c.d_model}});
  for (const char* stack : {"encoder", "decoder"}) {
    const StackLayout& sl = std::string(stack) == "encoder" ? layout_.encoder : layout_.decoder;
    for (int64_t b = 0; b < sl.num_blocks; ++b) {
      const std::string p = SwitchNames::block_prefix(stack, b);
      auto attention = [&](const std::string& a, bool bias) {
        for (const char* w : {"q", "k", "v"})
          check(a + w + ".weight", {inner, c.d_model}, heads, false);
        check(a + "o.weight", {c.d_model, inner}, heads, false);
        if (bias)
          check(a + "relative_attention_bias.weight",
                {c.relative_attention_num_buckets, c.num_heads},
                dims({{"relative_attention_num_buckets", c.relative_attention_num_buckets},
                      {"num_heads", c.num_heads}}),
                false);
      };
      const std::string dm = dims({{"d_model", c.d_model}});
      check(p + "layer.0.layer_norm.weight", {c.d_model}, dm, false);
      attention(p + "layer.0.SelfAttention.", b == 0);
      if (std::string(stack) == "decoder") {
        check(p + "layer.1.layer_norm.weight", {c.d_model}, dm, false);
        attention(p + "layer.1.EncDecAttention.", false);
      }
      const std::string fp = SwitchNames::ff_prefix(stack, b);
      check(fp + "layer_norm.weight", {c.d_model}, dm, false);
      const std::string ff = dims({{"d_ff", c.d_ff}, {"d_model", c.d_model}});
      if (!sl.sparse[static_cast<size_t>(b)]) {
        const std::string why = std::string(stack) + " block " + std::to_string(b) +
                                " is not sparse (it has no " + SwitchNames::router(stack, b) +
                                "), so its feed-forward layer is a dense mlp.wi / mlp.wo";
        check(fp + "mlp.wi.weight", {c.d_ff, c.d_model}, ff, false, why);
        check(fp + "mlp.wo.weight", {c.d_model, c.d_ff}, ff, false, why);
        continue;
      }
      for (int64_t e = 0; e < layout_.num_experts; ++e) {
        const std::string why = ff + "; the router of " + p + " has " +
                                std::to_string(layout_.num_experts) + " experts";
        check(SwitchNames::expert(stack, b, e, "wi"), {c.d_ff, c.d_model}, ff, true, why);
        check(SwitchNames::expert(stack, b, e, "wo"), {c.d_model, c.d_ff}, ff, true, why);
      }
    }
    check(std::string(stack) + ".final_layer_norm.weight", {c.d_model},
          dims({{"d_model", c.d_model}}), false);
  }
}

std::shared_ptr<const SwitchSource> SwitchSource::open(Container container, const fs::path& path,
                                                       const fs::path& config_json) {
  auto src = std::shared_ptr<SwitchSource>(new SwitchSource());
  src->path_ = path;
  src->container_ = std::move(container);
  const fs::path dir = fs::is_directory(path) ? path : path.parent_path();
  const auto& md = src->container_->metadata();
  if (!config_json.empty()) {
    src->config_ = SwitchConfig::load(config_json);
  } else if (auto it = md.find("config.json"); it != md.end()) {
    src->config_ = SwitchConfig::parse(it->second, path.string() + " (metadata config.json)");
  } else if (std::error_code ec; fs::exists(dir / "config.json", ec)) {
    src->config_ = SwitchConfig::load(dir / "config.json");
  } else {
    throw FormatError(
        error_context(path.string(), "",
                      "qmoe container without a Switch config (no metadata key 'config.json' "
                      "and no config.json beside it)"));
  }
  src->build_layout();
  src->check_tensors();
  return src;
}

std::optional<SwitchSource::Located> SwitchSource::locate(std::string_view name) const {
  auto it = std::lower_bound(index_.begin(), index_.end(), name,
                             [](const auto& e, std::string_view n) { return e.first < n; });
  if (it != index_.end() && it->first == name) return it->second;
  return std::nullopt;
}

std::string SwitchSource::file_of(std::string_view name) const {
  if (container_) {
    if (auto* c = container_->find_compressed(name)) return c->shard;
    if (auto* d = container_->find_dense(name)) return d->shard;
    return path_.string();
  }
  if (auto l = locate(name)) return l->file->path().string();
  return path_.string();
}

bool SwitchSource::has(std::string_view name) const {
  if (container_) {
    if (container_->find_compressed(name) || container_->find_dense(name)) return true;
    if (auto t = tied_alias_target(name)) return container_->find_dense(*t) != nullptr;
    return false;
  }
  return locate(name).has_value();
}

const CompressedView* SwitchSource::compressed(std::string_view name) const {
  if (!container_) return nullptr;
  const auto* c = container_->find_compressed(name);
  return c ? &c->view : nullptr;
}

std::vector<std::string> SwitchSource::names() const {
  if (container_) return container_->names();
  std::vector<std::string> r;
  r.reserve(index_.size());
  for (const auto& e : index_) r.push_back(e.first);
  return r;
}

std::optional<std::string> SwitchSource::find_non_finite() const {
  for (const std::string& name : names()) {
    if (compressed(name) != nullptr) continue;
    DType dt;
    if (container_) {
      const DenseEntry* d = container_->find_dense(name);
      if (d == nullptr) continue;
      dt = d->dtype;
    } else {
      dt = locate(name)->info->dtype;
    }
    if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kF16) continue;
    const FloatTensor t = dense(name);
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(t.data[i])) {
        return error_context(
            file_of(name), name,
            "element " + std::to_string(i) + " is " + (std::isnan(t.data[i]) ? "nan" : "infinite"));
      }
    }
  }
  return std::nullopt;
}

SwitchSource::Stored SwitchSource::stored(std::string_view name) const {
  Stored st;
  if (container_) {
    const DenseEntry* d = container_->find_dense(name);
    if (!d) {
      if (auto a = tied_alias_target(name)) d = container_->find_dense(*a);
    }
    if (!d) {
      if (container_->find_compressed(name))
        throw FormatError(error_context(path_.string(), std::string(name),
                                        "tensor is compressed where a dense tensor is needed"));
      throw FormatError(error_context(path_.string(), std::string(name), "missing tensor"));
    }
    st.dtype = d->dtype;
    st.shape = d->shape;
    st.bytes = d->bytes;
    st.file = d->shard;
  } else {
    auto l = locate(name);
    if (!l) throw FormatError(error_context(path_.string(), std::string(name), "missing tensor"));
    st.dtype = l->info->dtype;
    st.shape = l->info->shape;
    st.bytes = l->file->bytes(*l->info);
    st.file = l->file->path().string();
  }
  return st;
}

FloatTensor SwitchSource::dense(std::string_view name, const std::vector<int64_t>& shape) const {
  Stored st = stored(name);
  FloatTensor t;
  t.shape = std::move(st.shape);
  const DType dt = st.dtype;
  const auto bytes = st.bytes;
  const std::string& file = st.file;
  if (!shape.empty() && t.shape != shape)
    throw FormatError(error_context(
        file, std::string(name), "shape " + shape_str(t.shape) + ", expected " + shape_str(shape)));
  if (dt == DType::kF32) {
    t.data = reinterpret_cast<const float*>(bytes.data());
  } else if (dt == DType::kBF16 || dt == DType::kF16) {
    convert_to_float(dt, bytes, t.owned);
    t.data = t.owned.data();
  } else {
    throw FormatError(
        error_context(file, std::string(name),
                      "dtype " + std::string(dtype_name(dt)) + " (expected F32, BF16 or F16)"));
  }
  return t;
}

void SwitchSource::build_layout() {
  std::map<std::string, std::set<int64_t>> blocks;
  std::map<std::string, std::set<int64_t>> sparse;
  for (const auto& n : names()) {
    // "<stack>.block.<digits>.<rest>"
    std::string stack;
    for (const char* st : {"encoder", "decoder"})
      if (n.starts_with(std::string(st) + ".block.")) stack = st;
    if (stack.empty()) continue;
    const size_t p0 = stack.size() + 7;
    size_t p = p0;
    while (p < n.size() && n[p] >= '0' && n[p] <= '9') ++p;
    if (p == p0 || p - p0 > 9 || p >= n.size() || n[p] != '.') continue;
    const int64_t b = std::stoll(n.substr(p0, p - p0));
    blocks[stack].insert(b);
    if (n == SwitchNames::router(stack, b)) sparse[stack].insert(b);
  }
  layout_.num_experts = 0;
  for (const char* stack : {"encoder", "decoder"}) {
    StackLayout& s = std::string(stack) == "encoder" ? layout_.encoder : layout_.decoder;
    const auto& bs = blocks[stack];
    if (bs.empty())
      throw FormatError(error_context(path_.string(), "", std::string("no ") + stack + " blocks"));
    s.num_blocks = *bs.rbegin() + 1;
    for (int64_t b = 0; b < s.num_blocks; ++b)
      if (!bs.count(b))
        throw FormatError(
            error_context(path_.string(), "",
                          std::string(stack) + " block " + std::to_string(b) + " is missing"));
    s.sparse.assign(static_cast<size_t>(s.num_blocks), false);
    for (int64_t b : sparse[stack]) {
      s.sparse[static_cast<size_t>(b)] = true;
      const std::string rn = SwitchNames::router(stack, b);
      std::vector<int64_t> shp;
      if (container_) {
        auto* d = container_->find_dense(rn);
        if (!d)
          throw FormatError(error_context(path_.string(), rn, "router is not a dense tensor"));
        shp = d->shape;
      } else {
        shp = locate(rn)->info->shape;
      }
      if (shp.size() != 2 || shp[1] != config_.d_model || shp[0] < 1)
        throw FormatError(error_context(file_of(rn), rn,
                                        "router shape " + shape_str(shp) + ", expected [E, " +
                                            std::to_string(config_.d_model) + "]"));
      if (layout_.num_experts == 0) layout_.num_experts = shp[0];
      if (shp[0] != layout_.num_experts)
        throw FormatError(error_context(file_of(rn), rn,
                                        "router has " + std::to_string(shp[0]) +
                                            " experts, other blocks have " +
                                            std::to_string(layout_.num_experts)));
    }
  }
}

}  // namespace qmoe::sw
