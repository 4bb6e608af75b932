#include "qmoe/switch/compress.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include <omp.h>
#include <xxhash.h>
#include <nlohmann/json.hpp>

#include "qmoe/core/bf16.h"
#include "qmoe/core/memory.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/format/reference.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/switch/checkpoint.h"
#include "text_file.h"

namespace qmoe::sw {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// 2: calibration activations from core's gemm (work files of version 1 came from other products).
constexpr int kWorkVersion = 2;
constexpr const char* kRunFile = "run.json";

using internal::read_text;

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

double round6(double v) {
  char b[40];
  std::snprintf(b, sizeof b, "%.6g", v);
  return std::strtod(b, nullptr);
}

bool is_float(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

// Hands the pages of a mapped range back to the page cache: the mapping is read-only and backed by
// the file, so touching them again just faults them back in. Keeps resident memory at what is in
// flight rather than everything read so far.
void release_pages(std::span<const std::byte> b) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto p = reinterpret_cast<uintptr_t>(b.data());
  const uintptr_t a = (p + page - 1) / page * page, e = (p + b.size()) / page * page;
  if (e > a) ::madvise(reinterpret_cast<void*>(a), e - a, MADV_DONTNEED);
}

bool pid_alive(long pid) {
  return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

// The pid in "<stem>...tmp.<pid>", "<stem>...tmp.<pid>.<n>.data" or "<stem>...partial.<pid>" (the
// temporary names of SafetensorsWriter and ContainerWriter); 0 when `name` is not one.
bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

long temp_owner(const std::string& name, const std::string& stem) {
  if (name.rfind(stem, 0) != 0) return 0;
  std::string_view s = name;
  if (s.ends_with(".data")) {  // "<...>.tmp.<pid>.<n>.data"
    s.remove_suffix(5);
    const auto d = s.rfind('.');
    if (d == std::string_view::npos || !all_digits(s.substr(d + 1))) return 0;
    s = s.substr(0, d);
  }
  const auto d = s.rfind('.');
  if (d == std::string_view::npos || !all_digits(s.substr(d + 1)) || s.size() - d > 12) return 0;
  const long pid = std::stol(std::string(s.substr(d + 1)));
  s = s.substr(0, d);
  return s.ends_with(".tmp") || s.ends_with(".partial") ? pid : 0;
}

// "model-00001-of-00012.safetensors", the shard names ContainerWriter gives.
bool is_shard_name(std::string_view n) {
  return n.size() == 32 && n.starts_with("model-") && all_digits(n.substr(6, 5)) &&
         n.substr(11, 4) == "-of-" && all_digits(n.substr(15, 5)) && n.substr(20) == ".safetensors";
}

// ---- the checkpoint as stored ------------------------------------------------------------------

struct Stored {
  const SafetensorsFile* file = nullptr;
  const TensorInfo* info = nullptr;
};

struct Checkpoint {
  fs::path dir;
  std::string config_text;
  std::shared_ptr<const SwitchSource> src;  // holds the shards' mappings
  std::map<std::string, Stored> stored;  // tensors actually stored (tied aliases resolve to these)
  std::vector<fs::path> files;
  int64_t bytes = 0;
};

std::unique_ptr<Checkpoint> open_checkpoint(const fs::path& dir) {
  auto ck = std::make_unique<Checkpoint>();
  ck->dir = dir;
  std::error_code ec;
  if (!fs::exists(dir, ec))
    throw FormatError(error_context(dir.string(), "", "no such checkpoint directory"));
  if (!fs::is_directory(dir))
    throw FormatError(error_context(
        dir.string(), "", "not a directory (expected a Hugging Face checkpoint directory)"));
  ck->src = SwitchSource::open(dir);  // config, shards, index entries, tied aliases, layout
  if (ck->src->is_container())
    throw FormatError(error_context(dir.string(), "",
                                    "is already a qmoe container, not a checkpoint to compress"));
  ck->config_text = read_text(dir / "config.json");
  ck->files.push_back(dir / "config.json");
  if (fs::exists(dir / "model.safetensors.index.json"))
    ck->files.push_back(dir / "model.safetensors.index.json");
  for (const auto& f : ck->src->shards()) {
    ck->files.push_back(f.path());
    for (const auto& t : f.tensors()) ck->stored[t.name] = Stored{&f, &t};
  }
  for (const auto& f : ck->files) ck->bytes += static_cast<int64_t>(fs::file_size(f));
  return ck;
}

// ---- expert matrices ---------------------------------------------------------------------------

std::vector<ExpertMatrix> find_experts(const Checkpoint& ck) {
  const auto& cfg = ck.src->config();
  const auto& lay = ck.src->layout();
  std::vector<ExpertMatrix> v;
  std::set<std::string> names;
  for (const char* stack : {"encoder", "decoder"}) {
    const StackLayout& s = std::string(stack) == "encoder" ? lay.encoder : lay.decoder;
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      if (!s.sparse[static_cast<size_t>(b)]) continue;
      for (int64_t e = 0; e < lay.num_experts; ++e) {
        for (const char* w : {"wi", "wo"}) {
          ExpertMatrix m;
          m.name = SwitchNames::expert(stack, b, e, w);
          m.stack = stack;
          m.block = b;
          m.expert = e;
          m.which = w;
          auto it = ck.stored.find(m.name);
          if (it == ck.stored.end())
            throw FormatError(error_context(ck.dir.string(), m.name,
                                            "missing expert tensor (the router of " +
                                                SwitchNames::block_prefix(stack, b) + " has " +
                                                std::to_string(lay.num_experts) + " experts)"));
          const TensorInfo& t = *it->second.info;
          const std::string file = it->second.file->path().string();
          const std::vector<int64_t> want = m.which == "wi"
                                                ? std::vector<int64_t>{cfg.d_ff, cfg.d_model}
                                                : std::vector<int64_t>{cfg.d_model, cfg.d_ff};
          if (t.shape != want)
            throw FormatError(error_context(file, m.name,
                                            "shape " + shape_str(t.shape) + ", expected " +
                                                shape_str(want) + " (d_ff " +
                                                std::to_string(cfg.d_ff) + ", d_model " +
                                                std::to_string(cfg.d_model) + " in config.json)"));
          if (!is_float(t.dtype))
            throw FormatError(error_context(
                file, m.name,
                "dtype " + std::string(dtype_name(t.dtype)) + ", expected F32, BF16 or F16"));
          m.rows = want[0];
          m.cols = want[1];
          m.dtype = t.dtype;
          m.file = file;
          names.insert(m.name);
          v.push_back(std::move(m));
        }
      }
    }
  }
  if (v.empty())
    throw FormatError(
        error_context(ck.dir.string(), "",
                      "no sparse block (no tensor named *.mlp.router.classifier.weight): "
                      "not a Mixture-of-Experts checkpoint"));
  // An expert tensor that the layout does not explain (a dense block, an index beyond the router's
  // count, an unknown matrix) means the checkpoint is not what we think it is.
  for (const auto& [name, st] : ck.stored)
    if (name.find(".mlp.experts.") != std::string::npos && !names.count(name))
      throw FormatError(error_context(
          st.file->path().string(), name,
          "unexpected expert tensor (not a wi/wo of an expert the block's router knows)"));
  return v;
}

// Upper bound of an encoded matrix: auto picks the smaller codec, so qmoe-p5's size bounds it.
int64_t bound_compressed(const ExpertMatrix& m, const std::optional<Codec>& codec) {
  return max_compressed_bytes(codec ? *codec : Codec::kP5, m.rows, m.cols);
}

// ---- work directory ----------------------------------------------------------------------------

fs::path matrix_file(const fs::path& work, size_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "m%07zu.safetensors", i);
  return work / buf;
}

struct Cached {
  SafetensorsFile file;
  CompressedView view;
  MatrixStats stats;
  Codec codec = Codec::kV1;
  int64_t compressed_bytes = 0;
  std::shared_ptr<const FittedDictionary> dictionary;  // qmoe-v2, qmoe-v3
};

// XXH3-64 over a work file's metadata (every key and value but "xxh3", in key order) and its
// tensors' bytes (in name order): a flipped bit anywhere in what the container will be assembled
// from shows.
std::string work_checksum(
    const std::map<std::string, std::string>& metadata,
    const std::vector<std::pair<std::string, std::span<const std::byte>>>& t) {
  XXH3_state_t* st = XXH3_createState();
  if (!st) throw std::bad_alloc();
  XXH3_64bits_reset(st);
  for (const auto& [k, v] : metadata) {
    if (k == "xxh3") continue;
    XXH3_64bits_update(st, k.data(), k.size() + 1);  // with the terminating NUL as separator
    XXH3_64bits_update(st, v.data(), v.size() + 1);
  }
  for (const auto& [name, bytes] : t) {
    XXH3_64bits_update(st, name.data(), name.size() + 1);
    XXH3_64bits_update(st, bytes.data(), bytes.size());
  }
  const uint64_t h = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// A work file's checksum covers its metadata and every tensor: this reads all of it.
void verify_cached(const SafetensorsFile& f, const fs::path& p, const ExpertMatrix& m) {
  const auto& md = f.metadata();
  std::vector<std::pair<std::string, std::span<const std::byte>>> t;
  for (const auto& ti : f.tensors()) t.emplace_back(ti.name, f.bytes(ti));
  std::sort(t.begin(), t.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  const auto it = md.find("xxh3");
  if (it == md.end() || it->second != work_checksum(md, t))
    throw FormatError(
        error_context(p.string(), m.name, "work file is damaged (its checksum does not match)"));
}

// verify = false: the data is not read (the caller verifies it before using it).
Cached load_cached(const fs::path& p, const ExpertMatrix& m, bool verify = true) {
  Cached c{SafetensorsFile::open(p), {}, {}, Codec::kV1, 0, {}};
  const auto& md = c.file.metadata();
  if (verify) verify_cached(c.file, p, m);
  auto get = [&](const char* k) -> const std::string& {
    auto it = md.find(k);
    if (it == md.end())
      throw FormatError(
          error_context(p.string(), m.name, std::string("work file lacks '") + k + "'"));
    return it->second;
  };
  if (get("name") != m.name || std::stoll(get("rows")) != m.rows ||
      std::stoll(get("cols")) != m.cols)
    throw FormatError(error_context(p.string(), m.name, "work file is for another matrix"));
  const auto codec = codec_from_name(get("codec"));
  if (!codec) throw FormatError(error_context(p.string(), m.name, "unknown codec in work file"));
  CompressedView& v = c.view;
  v.codec = *codec;
  v.rows = m.rows;
  v.cols = m.cols;
  auto tensor = [&](const char* n) -> const TensorInfo& {
    const TensorInfo* t = c.file.find(n);
    if (!t)
      throw FormatError(
          error_context(p.string(), m.name, std::string("work file lacks tensor '") + n + "'"));
    return *t;
  };
  if (v.has_codes()) {
    v.codes = c.file.as<uint16_t>(tensor("codes"), DType::kU16);
    v.row_offsets = c.file.as<int32_t>(tensor("row_offsets"), DType::kI32);
  } else if (v.codec == Codec::kG4) {
    v.tokens = c.file.as<uint8_t>(tensor("tokens"), DType::kU8);
    v.kinds = c.file.as<uint8_t>(tensor("kinds"), DType::kU8);
    v.group_offsets = c.file.as<int32_t>(tensor("group_offsets"), DType::kI32);
  } else {
    v.packed = c.file.as<uint8_t>(tensor("packed"), DType::kU8);
  }
  v.levels = c.file.as<uint16_t>(tensor("levels"), DType::kU16);
  if (v.has_dictionary()) {
    // The dictionary is rebuilt from its parameters (the construction is exact), and must be the
    // one the codes were written with.
    const bool v3 = v.codec == Codec::kV3;
    c.dictionary = v3 ? v3_dictionary(std::stod(get("v3_p0")))
                      : v2_dictionary(std::stod(get("v2_p0")), std::stoi(get("v2_max_width")));
    if (hex64(c.dictionary->id) != get(v3 ? "v3_dictionary" : "v2_dictionary"))
      throw FormatError(error_context(
          p.string(), m.name,
          std::string("work file's ") + std::string(codec_name(v.codec)) + " dictionary differs"));
    v.dictionary = c.dictionary->entries;
    v.dictionary_id = c.dictionary->id;
  }
  c.codec = v.codec;
  c.compressed_bytes = v.compressed_bytes();
  c.stats.zero_fraction = std::stod(get("zero_fraction"));
  c.stats.loss = std::stod(get("loss"));
  c.stats.output_loss = std::stod(get("output_loss"));
  c.stats.tokens = std::stoll(get("tokens"));
  c.stats.fallback = get("fallback") == "1";
  c.stats.below_target = md.count("below_target") != 0;
  return c;
}

void store_cached(const fs::path& p, const ExpertMatrix& m, const CompressedMatrix& cm,
                  const MatrixStats& s) {
  // The metadata goes to the writer and, for the checksum, to `meta`.
  struct Writer {
    SafetensorsWriter w;
    std::map<std::string, std::string>& meta;
    void set_metadata(const std::string& k, const std::string& v) {
      meta[k] = v;
      w.set_metadata(k, v);
    }
    void add(std::string name, DType dtype, std::vector<int64_t> shape,
             std::span<const std::byte> bytes) {
      w.add(std::move(name), dtype, std::move(shape), bytes);
    }
    void finish() { w.finish(); }
  };
  std::map<std::string, std::string> meta;
  Writer w{SafetensorsWriter(p), meta};
  w.set_metadata("name", m.name);
  w.set_metadata("rows", std::to_string(m.rows));
  w.set_metadata("cols", std::to_string(m.cols));
  w.set_metadata("codec", std::string(codec_name(cm.codec)));
  w.set_metadata("zero_fraction", num(s.zero_fraction));
  w.set_metadata("loss", num(s.loss));
  w.set_metadata("output_loss", num(s.output_loss));
  w.set_metadata("tokens", std::to_string(s.tokens));
  w.set_metadata("fallback", s.fallback ? "1" : "0");
  if (s.below_target) w.set_metadata("below_target", "1");
  if (cm.has_dictionary()) {
    char p0[32];
    std::snprintf(p0, sizeof p0, "%.17g", cm.dictionary->p0);
    if (cm.codec == Codec::kV3) {
      w.set_metadata("v3_p0", p0);
      w.set_metadata("v3_dictionary", hex64(cm.dictionary->id));
    } else {
      w.set_metadata("v2_p0", p0);
      w.set_metadata("v2_max_width", std::to_string(cm.dictionary->max_width));
      w.set_metadata("v2_dictionary", hex64(cm.dictionary->id));
    }
  }
  if (cm.has_codes()) {
    w.add("codes", DType::kU16, {static_cast<int64_t>(cm.codes.size())},
          std::as_bytes(std::span(cm.codes)));
    w.add("row_offsets", DType::kI32, {static_cast<int64_t>(cm.row_offsets.size())},
          std::as_bytes(std::span(cm.row_offsets)));
  } else if (cm.codec == Codec::kG4) {
    w.add("tokens", DType::kU8, {static_cast<int64_t>(cm.tokens.size())},
          std::as_bytes(std::span(cm.tokens)));
    w.add("kinds", DType::kU8, {static_cast<int64_t>(cm.kinds.size())},
          std::as_bytes(std::span(cm.kinds)));
    w.add("group_offsets", DType::kI32, {static_cast<int64_t>(cm.group_offsets.size())},
          std::as_bytes(std::span(cm.group_offsets)));
  } else {
    w.add("packed", DType::kU8, {static_cast<int64_t>(cm.packed.size())},
          std::as_bytes(std::span(cm.packed)));
  }
  w.add("levels", DType::kU16, {static_cast<int64_t>(cm.levels.size())},
        std::as_bytes(std::span(cm.levels)));
  std::vector<std::pair<std::string, std::span<const std::byte>>> t;
  if (cm.has_codes()) {
    t.emplace_back("codes", std::as_bytes(std::span(cm.codes)));
    t.emplace_back("row_offsets", std::as_bytes(std::span(cm.row_offsets)));
  } else if (cm.codec == Codec::kG4) {
    t.emplace_back("tokens", std::as_bytes(std::span(cm.tokens)));
    t.emplace_back("kinds", std::as_bytes(std::span(cm.kinds)));
    t.emplace_back("group_offsets", std::as_bytes(std::span(cm.group_offsets)));
  } else {
    t.emplace_back("packed", std::as_bytes(std::span(cm.packed)));
  }
  t.emplace_back("levels", std::as_bytes(std::span(cm.levels)));
  std::sort(t.begin(), t.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  w.set_metadata("xxh3", work_checksum(meta, t));
  w.finish();
}

// What the run's Hessians come from, as compress.options names it: a provider's description, or
// "calibration <token file> (<pairs> pairs, sequential|one pass)".
std::string hessian_source(const CompressOptions& opt, int64_t calib_pairs) {
  if (opt.hessians) return opt.hessians->describe();
  return "calibration " + opt.calib_tokens.filename().string() + " (" +
         std::to_string(calib_pairs) + " pairs, " + (opt.sequential ? "sequential" : "one pass") +
         ")";
}

// The ternary options and rate control, only when they are not the defaults (so that default
// runs keep their bytes): "ternary": {levels, zero_threshold, zero_penalty, refit} and "rate":
// {target_bits, knob, tolerance, max_steps}.
void add_ternary_options(json& j, const CompressOptions& opt) {
  const TernaryOptions& t = opt.ternary;
  if (!t.is_default()) {
    j["ternary"] = {{"levels", std::string(ternary_levels_name(t.levels))},
                    {"zero_threshold", t.zero_threshold},
                    {"zero_penalty", t.zero_penalty},
                    {"refit", t.refit}};
  }
  if (opt.rate.enabled()) {
    j["rate"] = {{"target_bits", opt.rate.target_bits},
                 {"knob", std::string(rate_knob_name(opt.rate.knob))},
                 {"tolerance", opt.rate.tolerance},
                 {"max_steps", opt.rate.max_steps},
                 {"scope", std::string(rate_scope_name(opt.rate.scope))}};
  }
}

std::string fingerprint(const Checkpoint& ck, const CompressOptions& opt) {
  json files = json::array();
  for (const auto& f : ck.files) {
    const auto t = fs::last_write_time(f).time_since_epoch().count();
    files.push_back(
        {f.filename().string(), static_cast<int64_t>(fs::file_size(f)), static_cast<int64_t>(t)});
  }
  const bool gptq = opt.hessians || !opt.calib_tokens.empty();
  json j = {{"version", kWorkVersion},
            {"input", fs::weakly_canonical(ck.dir).string()},
            {"files", files},
            {"quantizer", gptq ? "gptq" : "rtn"},
            {"codec", opt.codec ? std::string(codec_name(*opt.codec)) : "auto"},
            {"cast_bf16", opt.cast_bf16}};
  if (opt.target != Target::kAny) j["target"] = std::string(target_name(opt.target));
  if (opt.hessians) j["hessians"] = opt.hessians->fingerprint();
  if (!opt.calib_tokens.empty()) {
    const std::string tokens = read_text(opt.calib_tokens);
    char h[17];
    std::snprintf(h, sizeof h, "%016llx",
                  static_cast<unsigned long long>(XXH3_64bits(tokens.data(), tokens.size())));
    json ids = json::array();
    for (int32_t id : opt.calibration.excluded_ids) ids.push_back(id);
    j["calibration"] = {{"tokens_xxh3", h},
                        {"tokens_bytes", tokens.size()},
                        {"sequential", opt.sequential},
                        {"token_cap_multiplier", num(opt.token_cap_multiplier)},
                        {"capacity", opt.calibration.forward.expert_capacity},
                        {"excluded_ids", ids},
                        {"exclude_ignored_targets", opt.calibration.exclude_ignored_targets}};
  }
  if (gptq) {
    j["percdamp"] = num(opt.percdamp);
    j["blocksize"] = opt.blocksize;
    j["actorder"] = opt.actorder;
  }
  add_ternary_options(j, opt);
  return j.dump(2) + "\n";
}

std::string block_key(const ExpertMatrix& m) {
  return m.stack + ".block." + std::to_string(m.block);
}

// Finished matrix files in a work directory.
int64_t work_files(const fs::path& work) {
  std::error_code ec;
  int64_t n = 0;
  for (const auto& e : fs::directory_iterator(work, ec)) {
    const std::string f = e.path().filename().string();
    if (f.size() == 20 && f[0] == 'm' && f.ends_with(".safetensors")) ++n;
  }
  return n;
}

int64_t dir_bytes(const fs::path& dir) {
  std::error_code ec;
  int64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) n += static_cast<int64_t>(e.file_size(ec));
  return n;
}

// Removes a work directory file by file, run.json last, then the directory.
void remove_work_dir(const fs::path& work) {
  std::error_code ec;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(work, ec))
    if (e.path().filename() != kRunFile) files.push_back(e.path());
  for (const auto& f : files) fs::remove_all(f, ec);
  fs::remove(work / kRunFile, ec);
  fs::remove(work, ec);
}

// An exclusive lock (flock) on a work directory, held while a run uses it; the directory's "owner"
// file says who holds it. Two runs can then never share (or delete) one work directory.
class WorkLock {
 public:
  WorkLock() = default;
  WorkLock(const WorkLock&) = delete;
  WorkLock& operator=(const WorkLock&) = delete;
  WorkLock(WorkLock&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  WorkLock& operator=(WorkLock&& o) noexcept {
    if (this != &o) {
      release();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~WorkLock() { release(); }

  // Locks `dir`; false when another process holds the lock. Throws Error when dir cannot be opened.
  bool try_lock(const fs::path& dir) {
    release();
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
      throw Error(dir.string() + ": cannot open the work directory: " + std::strerror(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) return false;
      throw Error(dir.string() + ": cannot lock the work directory: " + std::strerror(err));
    }
    fd_ = fd;
    return true;
  }
  void release() {
    if (fd_ >= 0) ::close(fd_);  // closing the descriptor drops the lock
    fd_ = -1;
  }

  // "pid 123 on host, since <time>", from the owner file the holder wrote.
  static std::string holder(const fs::path& dir) {
    std::ifstream f(dir / "owner");
    std::string line;
    std::getline(f, line);
    return line.empty() ? "another process" : line;
  }
  static void write_owner(const fs::path& dir) {
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char when[64] = {};
    std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
    write_file_atomic(dir / "owner", "qmoe compress, pid " + std::to_string(::getpid()) + " on " +
                                         host + ", since " + when + "\n");
  }

 private:
  int fd_ = -1;
};

// The block loop's results as work files, one per expert matrix (matrix_file()); a finished one is
// one that opens and matches its matrix (a damaged one is removed and done again).
class WorkStore final : public ExpertStore {
 public:
  WorkStore(fs::path work, std::span<const ExpertMatrix> experts,
            std::function<void(const std::string&)> note)
      : work_(std::move(work)), note_(std::move(note)) {
    for (size_t i = 0; i < experts.size(); ++i) index_[experts[i].name] = i;
  }
  bool has(const ExpertMatrix& m) override {
    const size_t i = index_.at(m.name);
    if (auto it = have_.find(i); it != have_.end()) return it->second;
    const fs::path p = matrix_file(work_, i);
    std::error_code ec;
    bool ok = false;
    if (fs::exists(p, ec)) {
      try {
        (void)load_cached(p, m);
        ok = true;
      } catch (const Error& e) {
        fs::remove(p, ec);  // unreadable or damaged work file: do the matrix again
        if (note_) note_(std::string("redoing: ") + e.what());
      }
    }
    return have_[i] = ok;
  }
  StoredMatrix load(const ExpertMatrix& m) override {
    auto c = std::make_shared<Cached>(load_cached(matrix_file(work_, index_.at(m.name)), m));
    const CompressedView v = c->view;
    return {v, std::move(c)};
  }
  void store(const ExpertMatrix& m, const CompressedMatrix& cm, const MatrixStats& s) override {
    store_cached(matrix_file(work_, index_.at(m.name)), m, cm, s);
  }

 private:
  fs::path work_;
  std::function<void(const std::string&)> note_;
  std::map<std::string, size_t> index_;
  std::map<size_t, bool> have_;  // what has() found (the loop's thread only)
};

// Removes the temporary files that a killed run (not a live one) left in `dir`.
void cleanup_leftovers(const fs::path& dir, const std::string& stem, const CompressOptions& opt) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  std::vector<fs::path> gone;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const long pid = temp_owner(e.path().filename().string(), stem);
    if (pid == 0 || pid == static_cast<long>(::getpid()) || pid_alive(pid)) continue;
    gone.push_back(e.path());
  }
  for (const auto& p : gone) {
    fs::remove_all(p, ec);
    if (opt.note && !ec) opt.note("removed " + p.string() + " (left by an interrupted run)");
  }
}

}  // namespace

// ---- public ------------------------------------------------------------------------------------

fs::path work_dir_for(const fs::path& output) {
  fs::path o = output;
  if (!o.has_filename()) o = o.parent_path();  // "out/" -> "out"
  return fs::path(o.string() + ".qmoe-work");
}

namespace {

// Creates, or checks and locks for --resume, the work directory of a run (compress.h), and removes
// what killed runs left. The lock is held in `lock` for the run.
void setup_work_dir(const Checkpoint& ck, const fs::path& output, const fs::path& work,
                    const CompressOptions& opt, WorkLock& lock) {
  const std::string fp = fingerprint(ck, opt);
  std::error_code ec;
  {
    // A work directory appears complete with its run.json or not at all: it is made under a
    // temporary name and renamed. Those of killed runs are removed.
    const fs::path parent = work.parent_path().empty() ? fs::path(".") : work.parent_path();
    cleanup_leftovers(parent, work.filename().string() + ".tmp.", opt);
  }
  // Locked before it gets its name: a run that finds the directory can always tell whether another
  // run holds it.
  auto in_use = [&] {
    return Error(error_context(work.string(), "",
                               "is in use by " + WorkLock::holder(work) +
                                   ": another qmoe compress is writing this output; wait for it "
                                   "to finish or stop it"));
  };
  for (int attempt = 0;; ++attempt) {
    if (fs::exists(work, ec)) {
      if (!fs::exists(work / kRunFile, ec))
        throw Error(
            error_context(work.string(), "", "exists and is not a qmoe work directory; remove it"));
      if (!lock.try_lock(work)) throw in_use();
      if (opt.resume) {
        if (read_text(work / kRunFile) != fp)
          throw Error(error_context(
              work.string(), "",
              "was made for another input or other options (see its run.json); remove it or run "
              "without --resume"));
        WorkLock::write_owner(work);
        break;
      }
      if (opt.note) opt.note("starting afresh: removing the earlier work in " + work.string());
      fs::remove_all(work, ec);
      if (ec) throw Error(work.string() + ": cannot remove: " + ec.message());
      lock.release();
    } else if (opt.resume && opt.note && attempt == 0) {
      opt.note("nothing to resume (no " + work.string() + "): starting afresh");
    }
    const fs::path tmp = work.string() + ".tmp." + std::to_string(::getpid());
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    if (!fs::is_directory(tmp)) throw Error(tmp.string() + ": cannot create the work directory");
    if (!lock.try_lock(tmp)) throw Error(tmp.string() + ": cannot lock the new work directory");
    write_file_atomic(tmp / kRunFile, fp);
    WorkLock::write_owner(tmp);
    if (::rename(tmp.c_str(), work.c_str()) == 0) break;
    const int err = errno;
    fs::remove_all(tmp, ec);
    lock.release();
    // Another run made the directory between the check and the rename: look again (once).
    if ((err != ENOTEMPTY && err != EEXIST) || attempt > 0)
      throw Error(work.string() + ": cannot create the work directory: " + std::strerror(err));
  }
  cleanup_leftovers(work, "", opt);
  // Leftovers of an interrupted assembly: the writer's temporary files.
  fs::path o = output;
  if (!o.has_filename()) o = o.parent_path();
  const fs::path parent = o.parent_path().empty() ? fs::path(".") : o.parent_path();
  cleanup_leftovers(parent, o.filename().string() + ".tmp.", opt);
  if (opt.shard_size > 0) cleanup_leftovers(o, "model", opt);
}

struct Planned {
  CompressPlan plan;
  std::optional<TokenPairs> calibration;
};

Planned plan_for(const Checkpoint* ck, const fs::path& checkpoint, const fs::path& output,
                 const CompressOptions& opt) {
  if (opt.threads < 0) throw InvalidArgument("compress: threads must be >= 0");
  if (opt.max_memory < 0) throw InvalidArgument("compress: max_memory must be >= 0");
  if (opt.shard_size < 0) throw InvalidArgument("compress: shard_size must be >= 0");
  if (opt.hessians && !opt.calib_tokens.empty())
    throw InvalidArgument(
        "compress: Hessians from a file and calibration tokens exclude each other");
  if (!(opt.token_cap_multiplier >= 0))
    throw InvalidArgument("compress: token_cap_multiplier must be >= 0");
  Planned out;
  CompressPlan& plan = out.plan;
  plan.experts = find_experts(*ck);
  plan.input_bytes = ck->bytes;
  if (opt.hessians) opt.hessians->validate(plan.experts);
  if (!opt.calib_tokens.empty()) {
    // FormatError naming the token file for a bad file or an id outside the vocabulary.
    out.calibration = TokenPairs::load(opt.calib_tokens, ck->src->config().vocab_size);
    if (out.calibration->num_pairs() == 0)
      throw FormatError(error_context(opt.calib_tokens.string(), "", "holds no token pairs"));
  }

  std::set<std::string> expert_names;
  int64_t experts_bound = 0;
  for (const auto& m : plan.experts) {
    expert_names.insert(m.name);
    experts_bound += bound_compressed(m, opt.codec);
  }
  int64_t max_tensor = 0;
  for (const auto& [name, st] : ck->stored) {
    if (expert_names.count(name)) continue;
    ++plan.passthrough_tensors;
    int64_t nb = st.info->nbytes();
    if (opt.cast_bf16 && (st.info->dtype == DType::kF32 || st.info->dtype == DType::kF16))
      nb = st.info->numel() * 2;
    plan.passthrough_bytes += nb;
    max_tensor = std::max(max_tensor, nb);
  }

  // Output path.
  std::error_code ec;
  const fs::path in_canon = fs::weakly_canonical(checkpoint, ec);
  const fs::path out_canon = fs::weakly_canonical(output, ec);
  if (out_canon == in_canon)
    throw InvalidArgument("compress: the output must not be the checkpoint directory");
  if (opt.shard_size == 0 && fs::is_directory(output, ec))
    throw InvalidArgument(error_context(output.string(), "",
                                        "is a directory; give a file name, or --shard-size for a "
                                        "sharded (directory) output"));
  if (opt.shard_size > 0 && fs::exists(output, ec) && !fs::is_directory(output, ec))
    throw InvalidArgument(error_context(output.string(), "",
                                        "exists and is not a directory (a sharded output is one)"));
  fs::path parent = out_canon.parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::is_directory(parent, ec))
    throw InvalidArgument(
        error_context(output.string(), "", "the folder " + parent.string() + " does not exist"));

  // Disk: the work files still to write, the container, and the copy the writer stages per shard
  // (the whole container when unsharded).
  const int64_t n_shards =
      opt.shard_size > 0 ? (plan.passthrough_bytes + experts_bound) / opt.shard_size + 1 : 1;
  const int64_t headers = static_cast<int64_t>(plan.experts.size()) * 512 +
                          static_cast<int64_t>(ck->stored.size()) * 256;
  plan.output_bytes_bound =
      plan.passthrough_bytes + experts_bound + n_shards * (v1::kTableBytes + headers) + (1 << 20);
  int64_t work_left = 0;
  const fs::path work = work_dir_for(output);
  for (size_t i = 0; i < plan.experts.size(); ++i)
    if (!opt.resume || !fs::exists(matrix_file(work, i), ec))
      work_left += bound_compressed(plan.experts[i], opt.codec) + 8192;
  const int64_t staging = opt.shard_size > 0
                              ? std::min(plan.output_bytes_bound, opt.shard_size + max_tensor)
                              : plan.output_bytes_bound;
  plan.disk_needed = work_left + plan.output_bytes_bound + staging;
  struct statvfs vfs {};
  if (::statvfs(parent.c_str(), &vfs) == 0) {
    plan.disk_free = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
    if (opt.check_disk && plan.disk_free < plan.disk_needed)
      throw Error(error_context(parent.string(), "",
                                "not enough free disk space: the run needs up to " +
                                    std::to_string(plan.disk_needed) +
                                    " bytes (work files, output and the writer's staging copy), " +
                                    std::to_string(plan.disk_free) + " are free"));
  }
  return out;
}

}  // namespace

CompressPlan plan_compression(const fs::path& checkpoint, const fs::path& output,
                              const CompressOptions& opt) {
  const auto ck = open_checkpoint(checkpoint);
  return plan_for(ck.get(), checkpoint, output, opt).plan;
}

CompressSummary compress_checkpoint(const fs::path& checkpoint, const fs::path& output,
                                    const CompressOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto since = [](clock::time_point t) {
    return std::chrono::duration<double>(clock::now() - t).count();
  };
#if defined(__GLIBC__)
  // Large buffers straight from mmap and back to the system when freed: otherwise glibc's
  // growing threshold keeps freed matrix buffers in per-thread arenas and resident memory drifts
  // above what is in flight.
  ::mallopt(M_MMAP_THRESHOLD, 1 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 4 << 20);
#endif
  Comm& comm = opt.comm ? *opt.comm : *local_comm();
  const bool lead = comm.rank() == 0;  // sets up the work directory, assembles the container
  // Every process opens and checks the checkpoint (the only time it does); a bad input is
  // reported once, by the lowest process that saw it, and every process stops.
  std::unique_ptr<Checkpoint> ck;
  std::optional<Planned> planned_opt;
  {
    std::exception_ptr err;
    try {
      ck = open_checkpoint(checkpoint);
      planned_opt.emplace(plan_for(ck.get(), checkpoint, output, opt));
    } catch (...) {
      err = std::current_exception();
    }
    agree(comm, err, "the checks before any work");
  }
  Planned& planned = *planned_opt;
  const CompressPlan& plan = planned.plan;
  if (opt.planned && lead) opt.planned(plan);
  const auto& experts = plan.experts;
  const bool gptq = opt.hessians != nullptr || planned.calibration.has_value();

  CompressSummary sum;
  sum.quantizer = gptq ? "gptq" : "rtn";
  sum.input_bytes = plan.input_bytes;
  sum.expert_matrices = static_cast<int64_t>(experts.size());
  sum.passthrough_tensors = plan.passthrough_tensors;

  // ---- work directory (set up by the lead process; the others use it once it is there)
  const fs::path work = work_dir_for(output);
  std::error_code ec;
  WorkLock lock;
  std::exception_ptr setup_err;
  if (lead) try {
      setup_work_dir(*ck, output, work, opt, lock);
    } catch (...) {
      setup_err = std::current_exception();
    }
  agree(comm, setup_err, "setting up " + work.string());
  try {
    // ---- the block loop, its results in the work directory
    WorkStore store(work, experts, lead ? opt.note : nullptr);
    int64_t largest = 0;
    for (const auto& m : experts) largest = std::max(largest, expert_memory_estimate(m, gptq));
    if (opt.max_memory > 0) {
      const int64_t reserve = int64_t{24} << 20;  // thread stacks, allocator slack, writer buffers
      const int64_t budget = opt.max_memory - resident_bytes() - reserve;
      if (budget < largest && opt.note && lead)
        opt.note("the memory cap leaves " + std::to_string(std::max<int64_t>(budget, 0)) +
                 " bytes for work, less than one expert matrix needs (" + std::to_string(largest) +
                 "): matrices run one at a time and may exceed it");
    }
    LoopOptions lo;
    lo.hessians = opt.hessians;
    lo.calibration = planned.calibration ? &*planned.calibration : nullptr;
    lo.calib = opt.calibration;
    lo.sequential = opt.sequential;
    lo.token_cap_multiplier = opt.token_cap_multiplier;
    lo.percdamp = opt.percdamp;
    lo.blocksize = opt.blocksize;
    lo.actorder = opt.actorder;
    lo.ternary = opt.ternary;
    lo.rate = opt.rate;
    lo.codec = opt.codec;
    lo.target = opt.target;
    lo.threads = opt.threads;
    lo.max_memory = opt.max_memory;
    lo.scratch_dir = work;
    const auto tc = clock::now();
    auto tick = [&](const std::string& phase, const std::string& step, const std::string& cur,
                    int64_t done, int64_t resumed, int64_t tokens, int64_t total_tokens) {
      if (!opt.progress) return;
      CompressProgress p;
      p.done = done;
      p.total = static_cast<int64_t>(experts.size());
      p.resumed = resumed;
      p.seconds = since(tc);
      p.current = cur;
      p.phase = phase;
      p.step = step;
      p.tokens = tokens;
      p.total_tokens = total_tokens;
      opt.progress(p);
    };
    lo.progress = [&](const LoopProgress& lp) {
      tick("compress", lp.phase, lp.block, lp.done, lp.resumed, lp.tokens, lp.total_tokens);
    };
    if (planned.calibration) {
      sum.calibration_pairs = planned.calibration->num_pairs();
      sum.calibration_tokens = static_cast<int64_t>(planned.calibration->encoder_ids.size() +
                                                    planned.calibration->decoder_targets.size());
    }
    lo.comm = opt.comm;
    {
      // Finished matrices, counted by their owners.
      Partition part;
      part.ranks = comm.size();
      int64_t mine = 0;
      const int64_t enc_blocks = ck->src->layout().encoder.num_blocks;
      for (const auto& m : experts) {
        const int64_t bi = m.stack == "decoder" ? enc_blocks + m.block : m.block;
        if (part.owner(bi, m.expert) == comm.rank() && store.has(m)) ++mine;
      }
      for (const auto& v : comm.allgather(std::to_string(mine)))
        sum.resumed_matrices += std::stoll(v);
    }
    if (sum.resumed_matrices > 0 && opt.note && lead)
      opt.note("resuming: " + std::to_string(sum.resumed_matrices) + " of " +
               std::to_string(experts.size()) + " expert matrices were finished by an earlier run");
    const LoopReport own = run_block_loop(ck->src, experts, lo, store);
    sum.ranks = gather_reports(comm, own);
    sum.loop = combine(sum.ranks);
    sum.memory_budget = sum.loop.memory_budget;
    // The container: written by the lead alone, or, sharded under several processes, shard k by
    // process k mod R (ContainerWriteOptions::part_count), each reading the work files of the
    // matrices in its shards; the lead renames them and writes the index. Every process places
    // the tensors alike: same order, same sizes, same metadata (the statistics are the lead's).
    const bool parted = opt.shard_size > 0 && comm.size() > 1;
    std::string part_tag;
    if (parted) part_tag = comm.allgather(std::to_string(::getpid()))[0];
    if (!lead && !parted) {
      // The lead assembles the container; the others wait for its outcome.
      agree(comm, nullptr, "assembling the container");
      sum.compress_seconds = since(tc);
      sum.total_seconds = since(t0);
      return sum;
    }
    sum.compress_seconds = since(tc);
    if (lead)
      tick("compress", "done", "done", static_cast<int64_t>(experts.size()), sum.resumed_matrices,
           sum.loop.forward_tokens, sum.loop.forward_tokens);

    const int64_t n_done = static_cast<int64_t>(experts.size());
    const auto ta = clock::now();
    std::exception_ptr assemble_err;
    std::optional<ContainerWriter> writer;
    try {
      // ---- statistics, read back from the work files (a resumed run reports the same)
      json stats = json::object();  // block key -> stats JSON
      std::vector<std::string> block_order;
      if (lead) {
        std::map<std::string, BlockSummary> blocks;
        double zf_sum = 0;
        std::set<uint64_t> dictionaries;  // qmoe-v2 and qmoe-v3 dictionary ids
        for (size_t i = 0; i < experts.size(); ++i) {
          const auto& m = experts[i];
          const Cached c = load_cached(matrix_file(work, i), m);
          const std::string bk = block_key(m);
          if (!stats.contains(bk)) {
            block_order.push_back(bk);
            stats[bk] = {{"experts", ck->src->layout().num_experts},
                         {"zero_fraction", json::array()}};
            if (gptq) {
              stats[bk]["loss"] = json::array();
              stats[bk]["output_loss"] = json::array();
              stats[bk]["tokens"] = json::array();
              stats[bk]["fallback"] = json::array();
            }
            blocks[bk].block = bk;
          }
          json& js = stats[bk];
          js["zero_fraction"].push_back(round6(c.stats.zero_fraction));
          if (gptq) {
            js["loss"].push_back(round6(c.stats.loss));
            js["output_loss"].push_back(round6(c.stats.output_loss));
            js["tokens"].push_back(c.stats.tokens);
            if (c.stats.fallback) {
              js["fallback"].push_back(static_cast<int64_t>(js["zero_fraction"].size()) - 1);
              ++sum.fallback_matrices;
            }
          }
          if (c.stats.below_target) {  // written only when some matrix is
            js["below_target"].push_back(static_cast<int64_t>(js["zero_fraction"].size()) - 1);
            ++sum.below_target_matrices;
          }
          auto& b = blocks[bk];
          ++b.matrices;
          b.weights += m.numel();
          b.compressed_bytes += c.compressed_bytes;
          sum.expert_weights += m.numel();
          sum.expert_input_bytes += m.numel() * dtype_size(m.dtype);
          sum.expert_compressed_bytes += c.compressed_bytes;
          // A qmoe-v2 / qmoe-v3 dictionary is stored once per file that uses it; counted here
          // once.
          static_assert(v2::kTableBytes == v3::kTableBytes);
          if (c.dictionary && dictionaries.insert(c.dictionary->id).second)
            sum.expert_compressed_bytes += v2::kTableBytes;
          ++sum.codec_matrices[static_cast<size_t>(c.codec)];
          zf_sum += c.stats.zero_fraction;
        }
        sum.mean_zero_fraction = experts.empty() ? 0 : zf_sum / static_cast<double>(experts.size());
        for (const auto& k : block_order) sum.blocks.push_back(blocks[k]);
      }
      if (parted) {
        // The lead's statistics, in block order, to every process.
        json mine = json::array();
        if (lead)
          for (const auto& k : block_order) mine.push_back(json::array({k, stats[k].dump()}));
        const json all = json::parse(comm.allgather(lead ? mine.dump() : std::string("[]"))[0]);
        if (!lead) {
          for (const auto& e : all) {
            block_order.push_back(e[0].get<std::string>());
            stats[block_order.back()] = json::parse(e[1].get<std::string>());
          }
        }
      }

      // ---- assemble the container: every stored tensor, in name order
      if (opt.shard_size > 0 && lead) {
        // An earlier container in the output directory stops being one first: a run killed while
        // the writer renames its shards must not leave an old index next to a mix of old and new
        // shards.
        fs::remove(output / std::string(kIndexFileName), ec);
      }
      ContainerWriteOptions wo{.shard_size = opt.shard_size};
      if (parted) {
        wo.part_count = comm.size();
        wo.part_rank = comm.rank();
        wo.part_tag = part_tag;
      }
      writer.emplace(output, wo);
      writer->set_metadata(std::string(kMetaConfig), ck->config_text);
      writer->set_metadata(std::string(kMetaQuantizer), sum.quantizer);
      writer->set_metadata(std::string(kMetaInputBytes), std::to_string(plan.input_bytes));
      writer->set_metadata(std::string(kMetaSource),
                           fs::weakly_canonical(checkpoint).filename().string());
      writer->set_target(opt.target);
      {
        json o = {{"codec", opt.codec ? std::string(codec_name(*opt.codec)) : "auto"},
                  {"cast_bf16", opt.cast_bf16}};
        // (the default target, "any", adds nothing: the default output is unchanged)
        if (opt.target != Target::kAny) o["target"] = std::string(target_name(opt.target));
        if (gptq) {
          o["hessians"] = hessian_source(opt, sum.calibration_pairs);
          o["percdamp"] = opt.percdamp;
          o["blocksize"] = opt.blocksize;
          o["actorder"] = opt.actorder;
        }
        add_ternary_options(o, opt);
        writer->set_metadata(std::string(kMetaOptions), o.dump());
      }
      for (const auto& k : block_order)
        writer->set_metadata(std::string(kMetaStatsPrefix) + k, stats[k].dump());

      std::map<std::string, size_t> expert_index;
      for (size_t i = 0; i < experts.size(); ++i) expert_index[experts[i].name] = i;
      auto last_tick = clock::now();
      std::vector<std::byte> cast;
      for (const auto& [name, st] : ck->stored) {
        if (auto it = expert_index.find(name); it != expert_index.end()) {
          // Partitioned: the work file's data is read (and verified) only where it is written.
          const fs::path wf = matrix_file(work, it->second);
          const ExpertMatrix& m = experts[it->second];
          const Cached c = load_cached(wf, m, /*verify=*/!parted);
          writer->add_compressed(name, c.view, st.info->dtype, [&] {
            if (parted) verify_cached(c.file, wf, m);
          });
        } else {
          const TensorInfo& t = *st.info;
          const auto bytes = st.file->bytes(t);
          if (opt.cast_bf16 && (t.dtype == DType::kF32 || t.dtype == DType::kF16)) {
            const int64_t n = t.numel(), es = dtype_size(t.dtype);
            cast.resize(static_cast<size_t>(2 * n));
            float f[4096];
            for (int64_t i0 = 0; i0 < n; i0 += 4096) {  // widened a slice at a time
              const int64_t k = std::min<int64_t>(4096, n - i0);
              to_float(t.dtype,
                       bytes.subspan(static_cast<size_t>(i0 * es), static_cast<size_t>(k * es)), f);
              for (int64_t i = 0; i < k; ++i) {
                const uint16_t b = float_to_bf16(f[i]);
                std::memcpy(cast.data() + 2 * (i0 + i), &b, 2);
              }
            }
            writer->add_dense(name, DType::kBF16, t.shape, cast);
            std::vector<std::byte>().swap(cast);
          } else {
            writer->add_dense(name, t.dtype, t.shape, bytes);
          }
          release_pages(bytes);
        }
        if (lead && opt.progress && since(last_tick) > 0.2) {
          last_tick = clock::now();
          tick("assemble", "write", name, n_done, sum.resumed_matrices, 0, 0);
        }
      }
      if (parted) writer->finish_part();
    } catch (...) {
      assemble_err = std::current_exception();
    }
    if (parted) {
      // Every shard written (or the job stops here; each writer removes what it wrote).
      agree(comm, assemble_err, "writing the container's shards");
      if (!lead) {
        writer->keep_part();
        agree(comm, nullptr, "assembling the container");
        sum.assemble_seconds = since(ta);
        sum.total_seconds = since(t0);
        return sum;
      }
    }
    if (!assemble_err) {
      try {
        // The last call before the output is committed.
        tick("assemble", "write", "finish", n_done, sum.resumed_matrices, 0, 0);
        sum.files = writer->finish();
        // Shards of an earlier, differently sharded output in the same directory would confuse
        // readers.
        if (opt.shard_size > 0) {
          std::set<fs::path> mine(sum.files.begin(), sum.files.end());
          std::vector<fs::path> stale;
          for (const auto& e : fs::directory_iterator(output, ec))
            if (is_shard_name(e.path().filename().string()) && !mine.count(e.path()))
              stale.push_back(e.path());
          for (const auto& p : stale) fs::remove(p, ec);
        }
        for (const auto& f : sum.files) sum.output_bytes += static_cast<int64_t>(fs::file_size(f));
        // The work directory goes file by file, run.json last: a kill on the way leaves a
        // directory that --resume still accepts (and that the next run replaces).
        remove_work_dir(work);
        sum.assemble_seconds = since(ta);
        sum.total_seconds = since(t0);
      } catch (...) {
        assemble_err = std::current_exception();
      }
    }
    agree(comm, assemble_err, "assembling the container");
    tick("assemble", "done", "done", n_done, sum.resumed_matrices, 0, 0);
    return sum;
  } catch (...) {
    if (!lead) throw;  // the lead keeps or removes the work directory
    // A failed run leaves its work directory only when it holds finished matrices (then the error
    // says where, for --resume); otherwise nothing beside the output.
    const int64_t finished = work_files(work);
    std::string where;
    if (finished == 0) {
      remove_work_dir(work);
    } else {
      where = "; the finished work (" + std::to_string(finished) + " expert matrices, " +
              std::to_string(dir_bytes(work)) + " bytes) stays in " + work.string() +
              " for --resume (delete it to start over)";
    }
    try {
      throw;
    } catch (const PeerFailed& e) {
      throw PeerFailed(e.what() + where);
    } catch (const FormatError& e) {
      throw FormatError(e.what() + where);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(e.what() + where);
    } catch (const Error& e) {
      throw Error(e.what() + where);
    }
  }
}

}  // namespace qmoe::sw
