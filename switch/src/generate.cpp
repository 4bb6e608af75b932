#include "qmoe/switch/generate.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>

#include <omp.h>
#include <nlohmann/json.hpp>

#include "qmoe/core/bf16.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/switch/checkpoint.h"

namespace qmoe::sw {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// What a tensor holds decides its statistics.
enum class Kind : uint8_t {
  kExpert,
  kDenseMlp,
  kAttention,
  kRelBias,
  kNorm,
  kRouter,
  kEmbedding,
  kHead
};

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  Kind kind;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a, then mixed
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return splitmix(h);
}

// Uniform in (0, 1], 53 bits.
double unit(uint64_t& s) {
  return (static_cast<double>(splitmix(s) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

// Standard normal pairs by Box-Muller, from a counter-based stream: element i of a tensor
// depends only on (tensor seed, i), so any partition of the work gives the same bytes.
void normals(uint64_t seed, int64_t begin, int64_t n, float* out) {
  // Streams are cut in chunks of 2 values: chunk k is seeded by (seed, k).
  int64_t i = begin;
  const int64_t end = begin + n;
  while (i < end) {
    const int64_t pair = i / 2;
    uint64_t s = seed ^ (static_cast<uint64_t>(pair) * 0xd1342543de82ef95ull);
    const double u1 = unit(s), u2 = unit(s);
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double z[2] = {r * std::cos(6.283185307179586 * u2),
                         r * std::sin(6.283185307179586 * u2)};
    for (int k = static_cast<int>(i - 2 * pair); k < 2 && i < end; ++k, ++i)
      out[i - begin] = static_cast<float>(z[k]);
  }
}

std::vector<Spec> tensor_specs(const GenerateOptions& o) {
  std::vector<Spec> v;
  const int64_t dm = o.d_model, dff = o.d_ff, inner = o.d_kv * o.num_heads;
  auto attention = [&](const std::string& p, bool bias) {
    for (const char* w : {"q", "k", "v"})
      v.push_back({p + w + ".weight", {inner, dm}, Kind::kAttention});
    v.push_back({p + "o.weight", {dm, inner}, Kind::kAttention});
    if (bias)
      v.push_back({p + "relative_attention_bias.weight", {32, o.num_heads}, Kind::kRelBias});
  };
  for (const char* stack : {"encoder", "decoder"}) {
    const bool dec = std::string(stack) == "decoder";
    const int64_t nb = dec ? o.num_decoder_layers : o.num_layers;
    for (int64_t b = 0; b < nb; ++b) {
      const std::string bp = SwitchNames::block_prefix(stack, b);
      attention(bp + "layer.0.SelfAttention.", b == 0);
      v.push_back({bp + "layer.0.layer_norm.weight", {dm}, Kind::kNorm});
      if (dec) {
        attention(bp + "layer.1.EncDecAttention.", false);
        v.push_back({bp + "layer.1.layer_norm.weight", {dm}, Kind::kNorm});
      }
      const std::string fp = SwitchNames::ff_prefix(stack, b);
      v.push_back({fp + "layer_norm.weight", {dm}, Kind::kNorm});
      const bool sparse = o.sparse_step == 1 || b % o.sparse_step == 1;
      if (sparse) {
        v.push_back({SwitchNames::router(stack, b), {o.num_experts, dm}, Kind::kRouter});
        for (int64_t e = 0; e < o.num_experts; ++e) {
          v.push_back({SwitchNames::expert(stack, b, e, "wi"), {dff, dm}, Kind::kExpert});
          v.push_back({SwitchNames::expert(stack, b, e, "wo"), {dm, dff}, Kind::kExpert});
        }
      } else {
        v.push_back({fp + "mlp.wi.weight", {dff, dm}, Kind::kDenseMlp});
        v.push_back({fp + "mlp.wo.weight", {dm, dff}, Kind::kDenseMlp});
      }
    }
    v.push_back({std::string(stack) + ".final_layer_norm.weight", {dm}, Kind::kNorm});
  }
  v.push_back({"shared.weight", {o.vocab_size, dm}, Kind::kEmbedding});
  std::sort(v.begin(), v.end(), [](const Spec& a, const Spec& b) { return a.name < b.name; });
  return v;
}

// The values of one tensor, generated a range of elements at a time.
//   matrices: N(0, 1/fan_in), scaled per row (log-normal, sigma 0.25) and, for MLP matrices, per
//   input feature (log-normal, sigma 0.05). Round-to-nearest ternarization then leaves about 88%
//   zeros in wi ([d_ff, 768]) and 92% in wo ([768, 3072]), as in trained Switch experts, since
//   the row maxima that set the ternary levels grow with the row width as for Gaussian rows.
//   layer norms: around 1; embedding: large (T5's shared embedding is not scaled down).
// Element i depends only on (tensor, seed, i), so any split into ranges gives the same values.
class Filler {
 public:
  Filler(const Spec& t, uint64_t seed) : t_(t), ts_(hash_name(t.name, seed)) {
    rows_ = t.shape.size() == 2 ? t.shape[0] : 1;
    cols_ = t.shape.size() == 2 ? t.shape[1] : t.shape[0];
    const bool mlp = t.kind == Kind::kExpert || t.kind == Kind::kDenseMlp;
    switch (t.kind) {
      case Kind::kExpert:
      case Kind::kDenseMlp:
      case Kind::kAttention:
      case Kind::kHead:
        scale_ = 1.0 / std::sqrt(static_cast<double>(cols_));
        break;
      case Kind::kRouter:
        scale_ = 0.1 / std::sqrt(static_cast<double>(cols_));
        break;
      case Kind::kRelBias:
        scale_ = 0.5;
        break;
      case Kind::kNorm:
        scale_ = 0.1;
        break;
      case Kind::kEmbedding:
        scale_ = 8.0;
        break;
    }
    row_scale_.assign(static_cast<size_t>(rows_), 1.0f);
    col_scale_.assign(static_cast<size_t>(cols_), 1.0f);
    if (mlp || t.kind == Kind::kAttention) {
      normals(ts_ ^ 0x1111, 0, rows_, row_scale_.data());
      for (auto& r : row_scale_) r = static_cast<float>(std::exp(0.25 * r));
    }
    if (mlp) {
      normals(ts_ ^ 0x2222, 0, cols_, col_scale_.data());
      for (auto& c : col_scale_) c = static_cast<float>(std::exp(0.05 * c));
    }
  }

  // Elements [begin, begin + n) into out[0, n).
  void fill(int64_t begin, int64_t n, float* out, int threads) const {
    constexpr int64_t kChunk = 1 << 16;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) \
    num_threads(threads > 0 ? threads : omp_get_max_threads()) if (chunks > 8)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * kChunk, len = std::min(kChunk, n - b);
      float* o = out + b;
      normals(ts_, begin + b, len, o);
      for (int64_t k = 0; k < len; ++k) {
        const int64_t i = begin + b + k;
        double v = o[k] * scale_;
        if (t_.kind == Kind::kNorm) {
          v += 1.0;
        } else if (t_.kind != Kind::kEmbedding && t_.kind != Kind::kRelBias) {
          v *= row_scale_[static_cast<size_t>(i / cols_)] *
               col_scale_[static_cast<size_t>(i % cols_)];
        }
        o[k] = static_cast<float>(v);
      }
    }
  }

 private:
  const Spec& t_;
  uint64_t ts_;
  int64_t rows_ = 1, cols_ = 1;
  double scale_ = 1.0;
  std::vector<float> row_scale_, col_scale_;
};

json config_json(const GenerateOptions& o) {
  const int64_t n_sparse_enc = o.sparse_step == 1 ? o.num_layers : o.num_layers / o.sparse_step;
  int64_t n_sparse_dec =
      o.sparse_step == 1 ? o.num_decoder_layers : o.num_decoder_layers / o.sparse_step;
  if (o.misleading_config) n_sparse_dec = o.num_decoder_layers / 2;  // as switch-c-2048's config
  auto step = [](int64_t layers, int64_t sparse) { return sparse > 0 ? layers / sparse : layers; };
  return json{{"architectures", {"SwitchTransformersForConditionalGeneration"}},
              {"add_router_probs", false},
              {"batch_prioritized_routing", false},
              {"d_ff", o.d_ff},
              {"d_kv", o.d_kv},
              {"d_model", o.d_model},
              {"decoder_sparse_step", step(o.num_decoder_layers, n_sparse_dec)},
              {"decoder_start_token_id", 0},
              {"dense_act_fn", "relu"},
              {"dropout_rate", 0.1},
              {"encoder_sparse_step", step(o.num_layers, n_sparse_enc)},
              {"eos_token_id", 1},
              {"expert_capacity", 64},
              {"initializer_factor", 1.0},
              {"is_encoder_decoder", true},
              {"is_gated_act", false},
              {"layer_norm_epsilon", 1e-6},
              {"model_type", "switch_transformers"},
              {"num_decoder_layers", o.num_decoder_layers},
              {"num_experts", o.num_experts},
              {"num_heads", o.num_heads},
              {"num_layers", o.num_layers},
              {"num_selected_experts", 1},
              {"num_sparse_decoder_layers", n_sparse_dec},
              {"num_sparse_encoder_layers", n_sparse_enc},
              {"pad_token_id", 0},
              {"relative_attention_max_distance", 128},
              {"relative_attention_num_buckets", 32},
              {"router_aux_loss_coef", 0.001},
              {"router_bias", false},
              {"router_dtype", "float32"},
              {"router_ignore_padding_tokens", false},
              {"router_jitter_noise", 0.01},
              {"router_type", "tokens_masked"},
              {"router_z_loss_coef", 0.001},
              {"tie_word_embeddings", true},
              {"torch_dtype", o.dtype == DType::kBF16 ? "bfloat16" : "float32"},
              {"transformers_version", "4.46.3"},
              {"use_cache", true},
              {"vocab_size", o.vocab_size}};
}

[[noreturn]] void io_fail(const fs::path& p, const char* what) {
  throw Error(p.string() + ": " + what + ": " + std::strerror(errno));
}

// The files of one run: written under temporary names, renamed at the end. Until commit(), the
// destructor removes every temporary file and every file already renamed, so a failed run (a
// full disk, an I/O error) leaves nothing behind; the temporary files are marked for the signal
// handlers of qmoe/format/file.h too (an interrupted run).
class Staged {
 public:
  Staged() = default;
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  ~Staged() {
    if (committed_) return;
    for (const auto& [tmp, final_path] : files_) ::unlink(tmp.c_str());
    for (const auto& f : renamed_) ::unlink(f.c_str());
  }
  // The temporary name for `final_path`, remembered for clean-up.
  fs::path add(const fs::path& final_path) {
    fs::path tmp = final_path.string() + ".tmp." + std::to_string(::getpid());
    files_.emplace_back(tmp, final_path);
    marks_.emplace_back(tmp.string());
    return tmp;
  }
  // Renames every file, in the order added (so the file that makes the checkpoint complete goes
  // last).
  void commit() {
    for (const auto& [tmp, final_path] : files_) {
      if (::rename(tmp.c_str(), final_path.c_str()) != 0) io_fail(final_path, "rename failed");
      renamed_.push_back(final_path);
    }
    marks_.clear();
    committed_ = true;
  }

 private:
  std::vector<std::pair<fs::path, fs::path>> files_;
  std::vector<fs::path> renamed_;
  std::vector<TempFileMark> marks_;
  bool committed_ = false;
};

void write_all_at(int fd, const void* data, size_t n, int64_t offset, const fs::path& p) {
  const char* c = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, c, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) io_fail(p, "write failed");
    c += w;
    n -= static_cast<size_t>(w);
    offset += w;
  }
}

// Opens `tmp` for writing and reserves `size` bytes: a file system without room fails here, at
// once, instead of part-way through (where writing through a mapping of a sparse file would have
// ended the process with SIGBUS).
int create_sized(const fs::path& tmp, int64_t size) {
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_fail(tmp, "cannot create");
  if (size > 0) {
    const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
    // EOPNOTSUPP / EINVAL: the file system cannot reserve space; pwrite() reports ENOSPC then.
    if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
      ::close(fd);
      errno = rc;
      io_fail(tmp, "cannot reserve the file's size");
    }
  }
  return fd;
}

void write_text(Staged& staged, const fs::path& p, const std::string& text) {
  const fs::path tmp = staged.add(p);
  const int fd = create_sized(tmp, static_cast<int64_t>(text.size()));
  try {
    write_all_at(fd, text.data(), text.size(), 0, tmp);
    if (::fsync(fd) != 0) io_fail(tmp, "fsync failed");
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) io_fail(tmp, "close failed");
}

// Writes one safetensors file holding `specs` (in that order) under its temporary name, generated
// and written a few MiB at a time so that memory stays small whatever the file size.
int64_t write_shard(Staged& staged, const fs::path& path, const std::vector<const Spec*>& specs,
                    const GenerateOptions& o, const std::map<std::string, std::string>& metadata) {
  const int64_t es = dtype_size(o.dtype);
  json header = json::object();
  json md = json::object();
  for (const auto& [k, v] : metadata) md[k] = v;
  header["__metadata__"] = md;
  int64_t off = 0;
  for (const Spec* s : specs) {
    const int64_t nb = s->numel() * es;
    header[s->name] = {{"dtype", std::string(dtype_name(o.dtype))},
                       {"shape", s->shape},
                       {"data_offsets", {off, off + nb}}};
    off += nb;
  }
  std::string text = header.dump();
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');
  const int64_t data_start = 8 + static_cast<int64_t>(text.size());
  const int64_t total = data_start + off;

  const fs::path tmp = staged.add(path);
  const int fd = create_sized(tmp, total);
  try {
    const uint64_t n_le = text.size();
    write_all_at(fd, &n_le, 8, 0, tmp);
    write_all_at(fd, text.data(), text.size(), 8, tmp);
    constexpr int64_t kBlock = int64_t{1} << 20;  // elements generated and written at a time
    std::vector<float> buf;
    std::vector<uint16_t> half;
    int64_t pos = data_start;
    for (const Spec* s : specs) {
      const Filler filler(*s, o.seed);
      const int64_t n = s->numel();
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t len = std::min(kBlock, n - b);
        buf.resize(static_cast<size_t>(len));
        filler.fill(b, len, buf.data(), o.threads);
        if (o.dtype == DType::kF32) {
          write_all_at(fd, buf.data(), static_cast<size_t>(len) * 4, pos, tmp);
        } else {
          half.resize(static_cast<size_t>(len));
          for (int64_t i = 0; i < len; ++i)
            half[static_cast<size_t>(i)] = float_to_bf16(buf[static_cast<size_t>(i)]);
          write_all_at(fd, half.data(), static_cast<size_t>(len) * 2, pos, tmp);
        }
        pos += len * es;
      }
    }
    if (::fsync(fd) != 0) io_fail(tmp, "fsync failed");
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) io_fail(tmp, "close failed");
  return total;
}

void check(const GenerateOptions& o) {
  auto pos = [](int64_t v, const char* what) {
    if (v < 1) throw InvalidArgument(std::string("generate: ") + what + " must be >= 1");
  };
  pos(o.vocab_size, "vocab_size");
  pos(o.d_model, "d_model");
  pos(o.d_ff, "d_ff");
  pos(o.d_kv, "d_kv");
  pos(o.num_heads, "num_heads");
  pos(o.num_layers, "num_layers");
  pos(o.num_decoder_layers, "num_decoder_layers");
  pos(o.num_experts, "num_experts");
  if (o.sparse_step != 1 && o.sparse_step != 2)
    throw InvalidArgument("generate: sparse_step must be 1 or 2");
  if (o.dtype != DType::kF32 && o.dtype != DType::kBF16)
    throw InvalidArgument("generate: dtype must be F32 or BF16");
  if (o.shard_size < 0) throw InvalidArgument("generate: shard_size must be >= 0");
}

}  // namespace

GenerateOptions generate_preset(const std::string& name) {
  GenerateOptions o;
  if (name == "switch-base-8") return o;
  if (name == "switch-base-8-bf16") {
    o.dtype = DType::kBF16;
    return o;
  }
  if (name == "small") {
    o.d_model = 512;
    o.d_ff = 2048;
    o.d_kv = 64;
    o.num_heads = 8;
    o.num_layers = o.num_decoder_layers = 8;
    o.vocab_size = 8192;
    return o;
  }
  if (name == "tiny") {
    o.d_model = 64;
    o.d_ff = 256;
    o.d_kv = 16;
    o.num_heads = 4;
    o.num_layers = o.num_decoder_layers = 4;
    o.vocab_size = 512;
    return o;
  }
  if (name == "c2048-block") {  // switch-c-2048's shapes: one block per stack, 64 experts
    o.d_model = 2080;
    o.d_ff = 6144;
    o.d_kv = 64;
    o.num_heads = 30;
    o.num_layers = o.num_decoder_layers = 1;
    o.num_experts = 64;
    o.sparse_step = 1;
    o.dtype = DType::kBF16;
    return o;
  }
  if (name == "c2048-style") {
    o.d_model = 256;
    o.d_ff = 1024;
    o.d_kv = 32;
    o.num_heads = 8;
    o.num_layers = o.num_decoder_layers = 4;
    o.vocab_size = 2048;
    o.num_experts = 32;
    o.sparse_step = 1;
    o.dtype = DType::kBF16;
    o.shard_size = 16 << 20;
    o.misleading_config = true;
    return o;
  }
  throw InvalidArgument("unknown checkpoint preset '" + name + "'");
}

std::vector<std::string> generate_preset_names() {
  return {"switch-base-8", "switch-base-8-bf16", "small", "tiny", "c2048-style", "c2048-block"};
}

int64_t experts_for_size(const GenerateOptions& opt, int64_t bytes) {
  GenerateOptions one = opt;
  one.num_experts = 1;
  int64_t fixed = 0, per_expert = 0;
  for (const auto& s : tensor_specs(one)) {
    const int64_t nb = s.numel() * dtype_size(opt.dtype);
    if (s.kind == Kind::kExpert)
      per_expert += nb;
    else
      fixed += nb;
  }
  const int64_t e = per_expert > 0 ? (bytes - fixed + per_expert / 2) / per_expert : 1;
  return std::max<int64_t>(1, e);
}

GenerateSummary generate_checkpoint(const fs::path& dir, const GenerateOptions& opt) {
  check(opt);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": cannot create the directory");
  for (const auto& e : fs::directory_iterator(dir)) {  // replace an earlier checkpoint
    const std::string n = e.path().filename().string();
    if (n == "config.json" || n == "model.safetensors" || n == "model.safetensors.index.json" ||
        (n.rfind("model-", 0) == 0 && e.path().extension() == ".safetensors"))
      fs::remove(e.path());
  }
  const auto specs = tensor_specs(opt);
  GenerateSummary sum;
  const int64_t es = dtype_size(opt.dtype);
  for (const auto& s : specs) {
    ++sum.tensors;
    sum.parameters += s.numel();
    if (s.kind == Kind::kExpert) {
      ++sum.expert_matrices;
      sum.expert_weights += s.numel();
    }
  }
  // Everything is written under temporary names first and renamed at the end, the model files
  // first and config.json last (a directory with a config.json holds a whole checkpoint); a
  // failure removes whatever this run wrote.
  Staged staged;
  const std::string config_text = config_json(opt).dump(2) + "\n";
  if (opt.shard_size == 0) {
    std::vector<const Spec*> all;
    for (const auto& s : specs) all.push_back(&s);
    sum.total_bytes += write_shard(staged, dir / "model.safetensors", all, opt, {{"format", "pt"}});
    sum.files.push_back(dir / "model.safetensors");
  } else {
    std::vector<std::vector<const Spec*>> shards(1);
    int64_t cur = 0;
    for (const auto& s : specs) {
      const int64_t nb = s.numel() * es;
      if (!shards.back().empty() && cur + nb > opt.shard_size) {
        shards.emplace_back();
        cur = 0;
      }
      shards.back().push_back(&s);
      cur += nb;
    }
    const size_t n = shards.size();
    auto shard_file = [&](size_t k) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n);
      return std::string(buf);
    };
    // The conversion bot's index names the tied aliases too, pointing at the shard that holds
    // shared.weight; that shard's metadata maps each alias to it.
    const char* aliases[] = {"decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                             "lm_head.weight"};
    json wm = json::object();
    int64_t data_bytes = 0;
    for (size_t k = 0; k < n; ++k) {
      std::map<std::string, std::string> md{{"format", "pt"}};
      for (const Spec* s : shards[k]) {
        wm[s->name] = shard_file(k);
        data_bytes += s->numel() * es;
        if (s->name == "shared.weight") {
          for (const char* a : aliases) {
            md[a] = "shared.weight";
            wm[a] = shard_file(k);
          }
        }
      }
      sum.total_bytes += write_shard(staged, dir / shard_file(k), shards[k], opt, md);
      sum.files.push_back(dir / shard_file(k));
    }
    const json index = {{"metadata", {{"total_size", data_bytes}}}, {"weight_map", wm}};
    const std::string index_text = index.dump(2) + "\n";
    write_text(staged, dir / "model.safetensors.index.json", index_text);
    sum.files.push_back(dir / "model.safetensors.index.json");
    sum.total_bytes += static_cast<int64_t>(index_text.size());
  }
  write_text(staged, dir / "config.json", config_text);
  sum.files.insert(sum.files.begin(), dir / "config.json");
  sum.total_bytes += static_cast<int64_t>(config_text.size());
  staged.commit();
  return sum;
}

}  // namespace qmoe::sw

namespace qmoe::sw {

TokenPairs generate_tokens(const GenerateTokensOptions& o) {
  if (o.vocab_size < 2 || o.vocab_size > (int64_t{1} << 31) - 1)
    throw InvalidArgument("generate_tokens: vocab_size must be in [2, 2^31)");
  if (o.pairs < 0 || o.encoder_length < 1 || o.decoder_length < 1)
    throw InvalidArgument("generate_tokens: pairs must be >= 0, encoder and decoder lengths >= 1");
  if (!(o.zipf_exponent >= 0)) throw InvalidArgument("generate_tokens: zipf_exponent must be >= 0");
  // Cumulative Zipf weights over ranks; rank r is token id (a * r + b) mod vocab with a odd and
  // coprime to the vocabulary size, so that frequent tokens are spread over the id range.
  const int64_t V = o.vocab_size;
  std::vector<double> cdf(static_cast<size_t>(V));
  double acc = 0;
  for (int64_t r = 0; r < V; ++r) {
    acc += std::pow(static_cast<double>(r + 1), -o.zipf_exponent);
    cdf[static_cast<size_t>(r)] = acc;
  }
  int64_t a = (V / 2) | 1;
  while (std::gcd(a, V) != 1) a += 2;
  uint64_t state = o.seed * 0x9e3779b97f4a7c15ull + 12345;
  auto draw = [&]() -> int32_t {
    const double u = unit(state) * acc;
    const auto it = std::lower_bound(cdf.begin(), cdf.end(), u);
    const int64_t rank = std::min<int64_t>(V - 1, it - cdf.begin());
    return static_cast<int32_t>((a * rank + 7) % V);
  };
  TokenPairs p;
  std::vector<int32_t> enc(static_cast<size_t>(o.encoder_length)),
      dec(static_cast<size_t>(o.decoder_length));
  for (int64_t i = 0; i < o.pairs; ++i) {
    for (auto& t : enc) t = draw();
    for (auto& t : dec) t = draw();
    p.add(enc, dec);
  }
  return p;
}

}  // namespace qmoe::sw
