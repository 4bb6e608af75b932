#include "qmoe/switch/compress.h"

#include <fcntl.h>
#include <signal.h>
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

#include <omp.h>
#include <nlohmann/json.hpp>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/bf16.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/checkpoint.h"
#include "text_file.h"
#if defined(QMOE_SWITCH_HAVE_GPTQ)
#include "qmoe/gptq/gptq.h"
#endif

namespace qmoe::sw {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kWorkVersion = 1;
constexpr const char* kRunFile = "run.json";

using internal::read_text;

void write_text_atomic(const fs::path& p, const std::string& text) {
  const fs::path tmp = p.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f)
      throw Error(p.string() + ": cannot create " + tmp.string() + ": " + std::strerror(errno));
    f << text;
    f.flush();
    if (!f) throw Error(tmp.string() + ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, p, ec);
  if (ec) throw Error(p.string() + ": rename failed: " + ec.message());
}

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

// Starts reading a range from disk in the background (not counted as resident until touched).
void prefetch_pages(std::span<const std::byte> b) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data()) / page * page;
  const uintptr_t e = reinterpret_cast<uintptr_t>(b.data()) + b.size();
  if (e > p) ::madvise(reinterpret_cast<void*>(p), e - p, MADV_WILLNEED);
}

int64_t current_rss_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t size = 0, rss = 0;
  f >> size >> rss;
  return rss * ::sysconf(_SC_PAGESIZE);
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
  std::shared_ptr<const SwitchSource> src;
  std::vector<SafetensorsFile> shards;
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
  std::vector<std::string> shard_names;
  if (fs::exists(dir / "model.safetensors.index.json")) {
    ck->files.push_back(dir / "model.safetensors.index.json");
    const json idx = json::parse(read_text(dir / "model.safetensors.index.json"));
    std::set<std::string> s;
    for (auto& [k, v] : idx["weight_map"].items()) s.insert(v.get<std::string>());
    shard_names.assign(s.begin(), s.end());
  } else {
    shard_names.push_back("model.safetensors");
  }
  ck->shards.reserve(shard_names.size());
  for (const auto& s : shard_names) {
    ck->shards.push_back(SafetensorsFile::open(dir / s));
    ck->files.push_back(dir / s);
  }
  for (const auto& f : ck->shards)
    for (const auto& t : f.tensors()) ck->stored[t.name] = Stored{&f, &t};
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
  const int64_t levels = 4 * m.rows;
  const int64_t p5b = m.rows * p5::row_bytes(m.cols) + levels;
  const int64_t v1b =
      m.rows * 2 * ((m.cols + 1) / 2) + 4 * (m.rows + 1) + levels;  // one pair per code at worst
  // One symbol per code; bounds qmoe-v3 too (at worst one column of a pair of rows per code).
  const int64_t v2b = m.rows * 2 * m.cols + 4 * (m.rows + 1) + levels;
  if (codec && *codec == Codec::kV1) return v1b;
  if (codec && (*codec == Codec::kV2 || *codec == Codec::kV3)) return v2b;
  return p5b;
}

// ---- work directory ----------------------------------------------------------------------------

fs::path matrix_file(const fs::path& work, size_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "m%07zu.safetensors", i);
  return work / buf;
}

struct MatrixStats {
  Codec codec = Codec::kV1;
  int64_t compressed_bytes = 0;
  double zero_fraction = 0;
  double loss = 0, output_loss = 0;
  int64_t tokens = 0;
  bool fallback = false;
};

struct Cached {
  SafetensorsFile file;
  CompressedView view;
  MatrixStats stats;
  std::shared_ptr<const V2Dictionary> dictionary;  // qmoe-v2, qmoe-v3
};

Cached load_cached(const fs::path& p, const ExpertMatrix& m) {
  Cached c{SafetensorsFile::open(p), {}, {}, {}};
  const auto& md = c.file.metadata();
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
  c.stats.codec = v.codec;
  c.stats.compressed_bytes = v.compressed_bytes();
  c.stats.zero_fraction = std::stod(get("zero_fraction"));
  c.stats.loss = std::stod(get("loss"));
  c.stats.output_loss = std::stod(get("output_loss"));
  c.stats.tokens = std::stoll(get("tokens"));
  c.stats.fallback = get("fallback") == "1";
  return c;
}

void store_cached(const fs::path& p, const ExpertMatrix& m, const CompressedMatrix& cm,
                  const MatrixStats& s) {
  SafetensorsWriter w(p);
  w.set_metadata("name", m.name);
  w.set_metadata("rows", std::to_string(m.rows));
  w.set_metadata("cols", std::to_string(m.cols));
  w.set_metadata("codec", std::string(codec_name(cm.codec)));
  w.set_metadata("zero_fraction", num(s.zero_fraction));
  w.set_metadata("loss", num(s.loss));
  w.set_metadata("output_loss", num(s.output_loss));
  w.set_metadata("tokens", std::to_string(s.tokens));
  w.set_metadata("fallback", s.fallback ? "1" : "0");
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
  } else {
    w.add("packed", DType::kU8, {static_cast<int64_t>(cm.packed.size())},
          std::as_bytes(std::span(cm.packed)));
  }
  w.add("levels", DType::kU16, {static_cast<int64_t>(cm.levels.size())},
        std::as_bytes(std::span(cm.levels)));
  w.finish();
}

std::string fingerprint(const Checkpoint& ck, const CompressOptions& opt) {
  json files = json::array();
  for (const auto& f : ck.files) {
    const auto t = fs::last_write_time(f).time_since_epoch().count();
    files.push_back(
        {f.filename().string(), static_cast<int64_t>(fs::file_size(f)), static_cast<int64_t>(t)});
  }
  json j = {{"version", kWorkVersion},
            {"input", fs::weakly_canonical(ck.dir).string()},
            {"files", files},
            {"quantizer", opt.hessians ? "gptq" : "rtn"},
            {"codec", opt.codec ? std::string(codec_name(*opt.codec)) : "auto"},
            {"cast_bf16", opt.cast_bf16}};
  if (opt.hessians) {
    j["hessians"] = opt.hessians->fingerprint();
    j["percdamp"] = num(opt.percdamp);
    j["blocksize"] = opt.blocksize;
    j["actorder"] = opt.actorder;
  }
  return j.dump(2) + "\n";
}

std::string block_key(const ExpertMatrix& m) {
  return m.stack + ".block." + std::to_string(m.block);
}

// ---- one expert matrix
// ---------------------------------------------------------------------------

void compress_one(const Checkpoint& ck, const ExpertMatrix& m, const CompressOptions& opt,
                  int threads, const fs::path& out) {
  const Stored& st = ck.stored.at(m.name);
  const auto bytes = st.file->bytes(*st.info);
  CompressedMatrix cm;
  MatrixStats s;
  try {
    if (opt.hessians) {
#if defined(QMOE_SWITCH_HAVE_GPTQ)
      std::vector<float> owned;
      const float* w = nullptr;
      if (m.dtype == DType::kF32 &&
          reinterpret_cast<uintptr_t>(bytes.data()) % alignof(float) == 0) {
        w = reinterpret_cast<const float*>(bytes.data());
      } else {
        owned.resize(static_cast<size_t>(m.numel()));
        for (int64_t i = 0; i < m.numel(); ++i) {
          float f;
          if (m.dtype == DType::kF32) {
            std::memcpy(&f, bytes.data() + 4 * i, 4);
          } else {
            uint16_t h;
            std::memcpy(&h, bytes.data() + 2 * i, 2);
            f = m.dtype == DType::kBF16 ? bf16_to_float(h) : fp16_to_float(h);
          }
          owned[static_cast<size_t>(i)] = f;
        }
        w = owned.data();
      }
      int64_t tokens = 0;
      const std::vector<float> h = opt.hessians->hessian(m, tokens);
      GptqOptions g;
      g.grid = GptqGrid::kTernary;
      g.percdamp = opt.percdamp;
      g.blocksize = opt.blocksize;
      g.actorder = opt.actorder;
      g.threads = threads;
      CompressedExpert ce = compress_matrix(w, m.rows, m.cols, h.empty() ? nullptr : h.data(), g,
                                            EncodeOptions{.codec = opt.codec, .threads = threads});
      release_pages(bytes);
      cm = std::move(ce.matrix);
      s.zero_fraction = ce.zero_fraction;
      s.loss = ce.loss;
      s.output_loss = ce.output_loss;
      s.tokens = tokens;
      s.fallback = ce.status != GptqStatus::kOk;
#else
      throw Error("GPTQ is not available in this build");
#endif
    } else {
      const TernaryMatrix t = ternarize_rtn(bytes.data(), m.dtype, m.rows, m.cols);
      release_pages(bytes);
      cm = encode(t, EncodeOptions{.codec = opt.codec, .threads = threads});
      s.zero_fraction = t.zero_fraction();
    }
  } catch (const FormatError&) {
    throw;
  } catch (const std::exception& e) {
    throw FormatError(error_context(m.file, m.name, e.what()));
  }
  store_cached(out, m, cm, s);
}

// Runs matrices on `threads` workers; a matrix is admitted only while the estimated memory of the
// matrices in flight stays within the budget (one runs alone if it needs more by itself).
struct Pool {
  Pool(const Checkpoint& c, const std::vector<ExpertMatrix>& e, const std::vector<int64_t>& est,
       const CompressOptions& o, const fs::path& w, int64_t b, int t)
      : ck(c), experts(e), estimate(est), opt(o), work(w), budget(b), threads(t) {}
  const Checkpoint& ck;
  const std::vector<ExpertMatrix>& experts;
  const std::vector<int64_t>& estimate;
  const CompressOptions& opt;
  const fs::path& work;
  int64_t budget;
  int threads;

  std::mutex mu;
  std::condition_variable cv, progress_cv;
  size_t next = 0;
  int64_t in_use = 0;
  int active = 0;
  bool stop = false;
  std::exception_ptr error;
  std::atomic<int64_t> finished{0};
  std::string current;

  void run(const std::vector<size_t>& todo, const std::function<void()>& tick) {
    next = 0;
    in_use = 0;
    stop = false;
    const int nworkers =
        static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), todo.size()));
    if (nworkers == 0) return;
    // Threads inside one matrix when there are fewer matrices than threads (the bytes do not
    // depend on it: encode and GPTQ are bit-identical for any thread count).
    const int per_matrix = std::max(1, threads / nworkers);
    std::vector<std::thread> pool;
    active = nworkers;
    for (int k = 0; k < nworkers; ++k) {
      pool.emplace_back([&, per_matrix] {
        for (;;) {
          size_t i;
          int64_t need;
          {
            std::unique_lock lk(mu);
            cv.wait(lk, [&] {
              return stop || next >= todo.size() || in_use == 0 ||
                     in_use + estimate[todo[next]] <= budget;
            });
            if (stop || next >= todo.size()) break;
            i = todo[next++];
            need = estimate[i];
            in_use += need;
            current = block_key(experts[i]);
            if (next < todo.size()) {  // start reading the next matrix from disk
              const auto& nm = experts[todo[next]];
              const Stored& st = ck.stored.at(nm.name);
              prefetch_pages(st.file->bytes(*st.info));
            }
          }
          try {
            compress_one(ck, experts[i], opt, per_matrix, matrix_file(work, i));
          } catch (...) {
            std::lock_guard lk(mu);
            if (!error) error = std::current_exception();
            stop = true;
          }
          {
            std::lock_guard lk(mu);
            in_use -= need;
          }
          finished.fetch_add(1);
          cv.notify_all();
        }
        {
          std::lock_guard lk(mu);
          --active;
        }
        progress_cv.notify_all();
        cv.notify_all();
      });
    }
    {
      std::unique_lock lk(mu);
      while (active > 0) {
        progress_cv.wait_for(lk, std::chrono::milliseconds(200));
        if (!tick || stop) continue;
        lk.unlock();
        // A progress callback that throws stops the run: no new matrix starts, the ones in
        // flight finish (their work files stay for a resumed run), then the exception goes on.
        std::exception_ptr thrown;
        try {
          tick();
        } catch (...) {
          thrown = std::current_exception();
        }
        lk.lock();
        if (thrown) {
          if (!error) error = thrown;
          stop = true;
          cv.notify_all();
        }
      }
    }
    for (auto& t : pool) t.join();
    if (error) std::rethrow_exception(error);
  }
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

int64_t expert_memory_estimate(const ExpertMatrix& m, bool gptq) {
  const int64_t n = m.numel();
  // Input pages + symbols (1 byte/weight) + codes (v1 at worst ~1 byte/weight) + the work file.
  int64_t b = n * dtype_size(m.dtype) + n + n + n / 4 + 4 * m.rows;
  if (gptq) {
    // float32 copy of W, the Hessian (float, plus the float64 pages of the file it is read from),
    // and GPTQ's own scratch (its factor of H, working rows).
    b += 4 * n + 12 * m.cols * m.cols;
#if defined(QMOE_SWITCH_HAVE_GPTQ)
    b += gptq_workspace_bytes(m.rows, m.cols, GptqOptions{}, 1);
#else
    b += 4 * n + 4 * m.cols * m.cols;
#endif
  }
  return b;
}

CompressPlan plan_compression(const fs::path& checkpoint, const fs::path& output,
                              const CompressOptions& opt) {
  if (opt.threads < 0) throw InvalidArgument("compress: threads must be >= 0");
  if (opt.max_memory < 0) throw InvalidArgument("compress: max_memory must be >= 0");
  if (opt.shard_size < 0) throw InvalidArgument("compress: shard_size must be >= 0");
  const auto ck = open_checkpoint(checkpoint);
  CompressPlan plan;
  plan.experts = find_experts(*ck);
  plan.input_bytes = ck->bytes;
  if (opt.hessians) opt.hessians->validate(plan.experts);

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
  return plan;
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
  const CompressPlan plan = plan_compression(checkpoint, output, opt);
  const auto ck = open_checkpoint(checkpoint);
  const auto& experts = plan.experts;
  const bool gptq = opt.hessians != nullptr;
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();

  CompressSummary sum;
  sum.quantizer = gptq ? "gptq" : "rtn";
  sum.input_bytes = plan.input_bytes;
  sum.expert_matrices = static_cast<int64_t>(experts.size());
  sum.passthrough_tensors = plan.passthrough_tensors;

  // ---- work directory
  const fs::path work = work_dir_for(output);
  const std::string fp = fingerprint(*ck, opt);
  std::error_code ec;
  {
    // A work directory appears complete with its run.json or not at all: it is made under a
    // temporary name and renamed. Those of killed runs are removed.
    const fs::path parent = work.parent_path().empty() ? fs::path(".") : work.parent_path();
    cleanup_leftovers(parent, work.filename().string() + ".tmp.", opt);
  }
  if (fs::exists(work, ec)) {
    if (!fs::exists(work / kRunFile, ec))
      throw Error(
          error_context(work.string(), "", "exists and is not a qmoe work directory; remove it"));
    if (opt.resume) {
      if (read_text(work / kRunFile) != fp)
        throw Error(error_context(
            work.string(), "",
            "was made for another input or other options (see its run.json); remove it or run "
            "without --resume"));
    } else {
      if (opt.note) opt.note("starting afresh: removing the earlier work in " + work.string());
      fs::remove_all(work, ec);
      if (ec) throw Error(work.string() + ": cannot remove: " + ec.message());
    }
  }
  if (!fs::exists(work, ec)) {
    if (opt.resume && opt.note)
      opt.note("nothing to resume (no " + work.string() + "): starting afresh");
    const fs::path tmp = work.string() + ".tmp." + std::to_string(::getpid());
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp, ec);
    if (!fs::is_directory(tmp)) throw Error(tmp.string() + ": cannot create the work directory");
    write_text_atomic(tmp / kRunFile, fp);
    fs::rename(tmp, work, ec);
    if (ec) throw Error(work.string() + ": cannot create the work directory: " + ec.message());
  }
  cleanup_leftovers(work, "", opt);
  // Leftovers of an interrupted assembly: the writer's temporary files.
  {
    fs::path o = output;
    if (!o.has_filename()) o = o.parent_path();
    const fs::path parent = o.parent_path().empty() ? fs::path(".") : o.parent_path();
    cleanup_leftovers(parent, o.filename().string() + ".tmp.", opt);
    if (opt.shard_size > 0) cleanup_leftovers(o, "model", opt);
  }

  // ---- what is left to do
  std::vector<size_t> todo;
  std::vector<char> have(experts.size(), 0);
  for (size_t i = 0; i < experts.size(); ++i) {
    const fs::path p = matrix_file(work, i);
    if (fs::exists(p, ec)) {
      try {
        (void)load_cached(p, experts[i]);
        have[i] = 1;
        continue;
      } catch (const Error&) {
        fs::remove(p, ec);  // unreadable work file: do the matrix again
      }
    }
    todo.push_back(i);
  }
  sum.resumed_matrices = static_cast<int64_t>(experts.size() - todo.size());
  if (sum.resumed_matrices > 0 && opt.note)
    opt.note("resuming: " + std::to_string(sum.resumed_matrices) + " of " +
             std::to_string(experts.size()) + " expert matrices were finished by an earlier run");

  // ---- memory budget for the matrices in flight
  std::vector<int64_t> estimate(experts.size());
  int64_t largest = 0;
  for (size_t i = 0; i < experts.size(); ++i) {
    estimate[i] = expert_memory_estimate(experts[i], gptq);
    largest = std::max(largest, estimate[i]);
  }
  int64_t budget = std::numeric_limits<int64_t>::max();
  if (opt.max_memory > 0) {
    const int64_t reserve = int64_t{24} << 20;  // thread stacks, allocator slack, writer buffers
    budget = std::max<int64_t>(opt.max_memory - current_rss_bytes() - reserve, 0);
    if (budget < largest && opt.note)
      opt.note("the memory cap leaves " + std::to_string(budget) +
               " bytes for work, less than one expert matrix needs (" + std::to_string(largest) +
               "): matrices run one at a time and may exceed it");
    sum.memory_budget = budget;
  }

  // ---- compress
  const auto tc = clock::now();
  Pool pool(*ck, experts, estimate, opt, work, budget, threads);
  const int64_t total = static_cast<int64_t>(experts.size());
  auto tick = [&](const std::string& phase, const std::string& cur) {
    if (!opt.progress) return;
    CompressProgress p;
    p.done = sum.resumed_matrices + pool.finished.load();
    p.total = total;
    p.resumed = sum.resumed_matrices;
    p.seconds = since(tc);
    {
      std::lock_guard lk(pool.mu);
      p.current = cur.empty() ? pool.current : cur;
    }
    p.phase = phase;
    opt.progress(p);
  };
  if (opt.hessians) {
    // Block by block, in order: a calibrating provider needs each block's results before the next.
    std::map<std::pair<int, int64_t>, std::vector<size_t>> blocks;  // (stack, block) -> matrices
    for (size_t i = 0; i < experts.size(); ++i)
      blocks[{experts[i].stack == "encoder" ? 0 : 1, experts[i].block}].push_back(i);
    std::map<std::string, size_t> index;
    for (size_t i = 0; i < experts.size(); ++i) index[experts[i].name] = i;
    for (const auto& [key, members] : blocks) {
      const std::string stack = key.first == 0 ? "encoder" : "decoder";
      opt.hessians->begin_block(stack, key.second);
      std::vector<size_t> left;
      for (size_t i : members)
        if (!have[i]) left.push_back(i);
      pool.run(left, [&] { tick("compress", ""); });
      opt.hessians->end_block(stack, key.second, [&](const ExpertMatrix& m) {
        const size_t i = index.at(m.name);
        const Cached c = load_cached(matrix_file(work, i), experts[i]);
        CompressedMatrix cm;
        cm.codec = c.view.codec;
        cm.rows = c.view.rows;
        cm.cols = c.view.cols;
        cm.codes.assign(c.view.codes.begin(), c.view.codes.end());
        cm.row_offsets.assign(c.view.row_offsets.begin(), c.view.row_offsets.end());
        cm.packed.assign(c.view.packed.begin(), c.view.packed.end());
        cm.levels.assign(c.view.levels.begin(), c.view.levels.end());
        cm.dictionary = c.dictionary;
        return cm;
      });
    }
  } else {
    pool.run(todo, [&] { tick("compress", ""); });
  }
  sum.compress_seconds = since(tc);
  tick("compress", "done");

  // ---- statistics, read back from the work files (a resumed run reports the same)
  const auto ta = clock::now();
  std::map<std::string, json> stats;  // block key -> stats JSON
  std::map<std::string, BlockSummary> blocks;
  std::vector<std::string> block_order;
  double zf_sum = 0;
  std::set<uint64_t> dictionaries;  // qmoe-v2 and qmoe-v3 dictionary ids
  for (size_t i = 0; i < experts.size(); ++i) {
    const auto& m = experts[i];
    const Cached c = load_cached(matrix_file(work, i), m);
    const std::string bk = block_key(m);
    if (!stats.count(bk)) {
      block_order.push_back(bk);
      stats[bk] = {{"experts", ck->src->layout().num_experts}, {"zero_fraction", json::array()}};
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
    auto& b = blocks[bk];
    ++b.matrices;
    b.weights += m.numel();
    b.compressed_bytes += c.stats.compressed_bytes;
    sum.expert_weights += m.numel();
    sum.expert_input_bytes += m.numel() * dtype_size(m.dtype);
    sum.expert_compressed_bytes += c.stats.compressed_bytes;
    // A qmoe-v2 / qmoe-v3 dictionary is stored once per file that uses it; counted here once.
    static_assert(v2::kTableBytes == v3::kTableBytes);
    if (c.dictionary && dictionaries.insert(c.dictionary->id).second)
      sum.expert_compressed_bytes += v2::kTableBytes;
    (c.stats.codec == Codec::kV1   ? sum.v1_matrices
     : c.stats.codec == Codec::kV2 ? sum.v2_matrices
     : c.stats.codec == Codec::kV3 ? sum.v3_matrices
                                   : sum.p5_matrices) += 1;
    zf_sum += c.stats.zero_fraction;
  }
  sum.mean_zero_fraction = experts.empty() ? 0 : zf_sum / static_cast<double>(experts.size());
  for (const auto& k : block_order) sum.blocks.push_back(blocks[k]);

  // ---- assemble the container: every stored tensor, in name order
  if (opt.shard_size > 0) {
    // An earlier container in the output directory stops being one first: a run killed while the
    // writer renames its shards must not leave an old index next to a mix of old and new shards.
    fs::remove(output / std::string(kIndexFileName), ec);
  }
  ContainerWriter writer(output, ContainerWriteOptions{.shard_size = opt.shard_size});
  writer.set_metadata(std::string(kMetaConfig), ck->config_text);
  writer.set_metadata(std::string(kMetaQuantizer), sum.quantizer);
  writer.set_metadata(std::string(kMetaInputBytes), std::to_string(plan.input_bytes));
  writer.set_metadata(std::string(kMetaSource),
                      fs::weakly_canonical(checkpoint).filename().string());
  {
    json o = {{"codec", opt.codec ? std::string(codec_name(*opt.codec)) : "auto"},
              {"cast_bf16", opt.cast_bf16}};
    if (gptq) {
      o["hessians"] = opt.hessians->describe();
      o["percdamp"] = opt.percdamp;
      o["blocksize"] = opt.blocksize;
      o["actorder"] = opt.actorder;
    }
    writer.set_metadata(std::string(kMetaOptions), o.dump());
  }
  for (const auto& k : block_order)
    writer.set_metadata(std::string(kMetaStatsPrefix) + k, stats[k].dump());

  std::map<std::string, size_t> expert_index;
  for (size_t i = 0; i < experts.size(); ++i) expert_index[experts[i].name] = i;
  auto last_tick = clock::now();
  std::vector<std::byte> cast;
  for (const auto& [name, st] : ck->stored) {
    if (auto it = expert_index.find(name); it != expert_index.end()) {
      const Cached c = load_cached(matrix_file(work, it->second), experts[it->second]);
      writer.add_compressed(name, c.view, st.info->dtype);
    } else {
      const TensorInfo& t = *st.info;
      const auto bytes = st.file->bytes(t);
      if (opt.cast_bf16 && (t.dtype == DType::kF32 || t.dtype == DType::kF16)) {
        const int64_t n = t.numel();
        cast.resize(static_cast<size_t>(2 * n));
        for (int64_t i = 0; i < n; ++i) {
          float f;
          if (t.dtype == DType::kF32) {
            std::memcpy(&f, bytes.data() + 4 * i, 4);
          } else {
            uint16_t h;
            std::memcpy(&h, bytes.data() + 2 * i, 2);
            f = fp16_to_float(h);
          }
          const uint16_t b = float_to_bf16(f);
          std::memcpy(cast.data() + 2 * i, &b, 2);
        }
        writer.add_dense(name, DType::kBF16, t.shape, cast);
        std::vector<std::byte>().swap(cast);
      } else {
        writer.add_dense(name, t.dtype, t.shape, bytes);
      }
      release_pages(bytes);
    }
    if (opt.progress && since(last_tick) > 0.2) {
      last_tick = clock::now();
      tick("assemble", name);
    }
  }
  tick("assemble", "finish");  // the last call before the output is committed
  sum.files = writer.finish();
  // Shards of an earlier, differently sharded output in the same directory would confuse readers.
  if (opt.shard_size > 0) {
    std::set<fs::path> mine(sum.files.begin(), sum.files.end());
    std::vector<fs::path> stale;
    for (const auto& e : fs::directory_iterator(output, ec))
      if (is_shard_name(e.path().filename().string()) && !mine.count(e.path()))
        stale.push_back(e.path());
    for (const auto& p : stale) fs::remove(p, ec);
  }
  for (const auto& f : sum.files) sum.output_bytes += static_cast<int64_t>(fs::file_size(f));
  // Renamed first, so that a kill while removing never leaves a work directory without run.json
  // (the next run removes the renamed one).
  const fs::path doomed = work.string() + ".tmp." + std::to_string(::getpid());
  fs::rename(work, doomed, ec);
  fs::remove_all(ec ? work : doomed, ec);
  sum.assemble_seconds = since(ta);
  sum.total_seconds = since(t0);
  tick("assemble", "done");
  return sum;
}

}  // namespace qmoe::sw
