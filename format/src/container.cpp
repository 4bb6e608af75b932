// The qmoe container on top of safetensors: tensor groups, dictionary, checksums, shards and
// index. format/SPEC.md section 2, "The container", is the normative description; the reader checks
// every rule listed there under "Errors a reader must raise" before open() returns.
#include "qmoe/format/container.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "file_internal.h"
#include "matrix_internal.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/format/reference.h"

namespace qmoe {

namespace internal {
// Defined in safetensors.cpp.
nlohmann::json parse_json_checked(std::string_view text, const std::string& context);
std::optional<int64_t> json_size(const nlohmann::json& j);
}  // namespace internal

namespace {

constexpr std::string_view kMatrixKeyPrefix = "qmoe.matrix.";
constexpr std::string_view kChecksumKeyPrefix = "qmoe.xxh3.";
constexpr std::string_view kReservedPrefix = "qmoe.";
// An index lists every stored tensor once; 256 MiB is far beyond any real one (a trillion-weight
// model has a few hundred thousand tensors) and keeps a hostile file from exhausting memory.
constexpr int64_t kMaxIndexBytes = int64_t{256} << 20;

bool starts_with(std::string_view s, std::string_view p) {
  return s.substr(0, p.size()) == p;
}

// A stored name is a group member when its last dot-separated part starts with "qmoe_".
bool is_member_name(std::string_view name) {
  const size_t dot = name.rfind('.');
  return dot != std::string_view::npos && starts_with(name.substr(dot + 1), "qmoe_");
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// The tensor name of a fitted dictionary (qmoe-v2, qmoe-v3): the codec's prefix and the id.
std::string dictionary_tensor(Codec codec, const std::string& id_hex) {
  return std::string(codec_traits(codec).dictionary_tensor) + id_hex;
}

// The codec whose fitted dictionaries `name` is named like, if any.
std::optional<Codec> fitted_dictionary_codec(std::string_view name) {
  for (const CodecTraits& t : kCodecs) {
    if (t.has_fitted_dictionary() && starts_with(name, t.dictionary_tensor)) return t.codec;
  }
  return std::nullopt;
}

bool is_dictionary_name(std::string_view name) {
  for (const CodecTraits& t : kCodecs) {
    if (t.dictionary == DictionaryKind::kBuiltin && name == t.dictionary_tensor) return true;
  }
  return fitted_dictionary_codec(name).has_value();
}

// A member's stored name suffix and dtype, and the shape it must have for a rows x cols matrix
// (empty: 1-D of any length).
struct MemberSpec {
  std::string_view suffix;
  DType dtype;
  std::vector<int64_t> shape;
};
MemberSpec member_spec(Member m, int64_t rows, int64_t cols) {
  switch (m) {
    case Member::kCodes:
      return {kCodesSuffix, DType::kU16, {}};
    case Member::kRowOffsets:
      return {kRowOffsetsSuffix, DType::kI32, {rows + 1}};
    case Member::kPacked:
      return {kPackedSuffix, DType::kU8, {rows, p5::row_bytes(cols)}};
    case Member::kGroupOffsets:
      return {kGroupOffsetsSuffix, DType::kI32, {g4::groups(rows) + 1, 2}};
    case Member::kTokens:
      return {kTokensSuffix, DType::kU8, {}};
    case Member::kKinds:
      return {kKindsSuffix, DType::kU8, {}};
    case Member::kLevels:
      return {kLevelsSuffix, DType::kBF16, {rows, 2}};
  }
  return {};
}

// Points the member of `v` at a stored tensor whose dtype has been checked.
void set_member(CompressedView& v, Member member, const SafetensorsFile& f, const TensorInfo& t) {
  switch (member) {
    case Member::kCodes:
      v.codes = f.as<uint16_t>(t, DType::kU16);
      return;
    case Member::kRowOffsets:
      v.row_offsets = f.as<int32_t>(t, DType::kI32);
      return;
    case Member::kPacked:
      v.packed = f.as<uint8_t>(t, DType::kU8);
      return;
    case Member::kGroupOffsets:
      v.group_offsets = f.as<int32_t>(t, DType::kI32);
      return;
    case Member::kTokens:
      v.tokens = f.as<uint8_t>(t, DType::kU8);
      return;
    case Member::kKinds:
      v.kinds = f.as<uint8_t>(t, DType::kU8);
      return;
    case Member::kLevels:
      v.levels = f.as<uint16_t>(t, DType::kBF16);
      return;
  }
}

std::string matrix_json(const CompressedView& m, DType original) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  j["codec"] = codec_name(m.codec);
  j["shape"] = {m.rows, m.cols};
  j["dtype"] = dtype_name(original);
  if (m.has_dictionary()) j["dictionary"] = hex64(m.dictionary_id);
  return j.dump();
}

std::span<const std::byte> v1_table_bytes() {
  return {reinterpret_cast<const std::byte*>(v1_decode_table()),
          static_cast<size_t>(v1::kTableBytes)};
}

}  // namespace

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string checksum_hex(std::span<const std::byte> bytes) {
  return hex64(XXH3_64bits(bytes.data(), bytes.size()));
}

// ---- reader ------------------------------------------------------------------------------------

struct Container::Impl {
  std::filesystem::path index_path;  // empty when not sharded
  int format_version = 0;
  std::vector<SafetensorsFile> shards;
  std::map<std::string, std::string> metadata;
  std::vector<CompressedEntry> compressed;
  std::vector<DenseEntry> dense;
  std::map<std::string, size_t, std::less<>> compressed_index;
  std::map<std::string, size_t, std::less<>> dense_index;
  struct Stored {
    size_t shard;
    std::string name;
    std::string checksum;
  };
  std::vector<Stored> stored;  // every stored tensor, for checksums

  // Checks the structure of shard `shard_idx` (everything but the passes over tensor data, which
  // open() runs afterwards for all shards at once) and appends its entries.
  void load_shard(size_t shard_idx);
};

namespace {

struct MatrixDecl {
  Codec codec;
  int64_t rows;
  int64_t cols;
  DType dtype;
  std::string dictionary;  // qmoe-v2, qmoe-v3: the dictionary's id, 16 lowercase hex digits
};

bool is_lower_hex64(const std::string& s) {
  if (s.size() != 16) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char ch) { return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'); });
}

// The format_version of a file's (or index's) metadata: 1 or 2, or 0 when missing or another.
int parse_format_version(const std::map<std::string, std::string>& md) {
  const auto ver = md.find("format_version");
  if (ver == md.end()) return 0;
  for (int v = kMinFormatVersion; v <= kFormatVersion; ++v) {
    if (ver->second == std::to_string(v)) return v;
  }
  return 0;
}

std::string supported_versions() {
  std::string s;
  for (int v = kMinFormatVersion; v <= kFormatVersion; ++v) {
    s += (s.empty() ? "\"" : v == kFormatVersion ? " and \"" : ", \"") + std::to_string(v) + "\"";
  }
  return s;
}

MatrixDecl parse_matrix_decl(const std::string& file, const std::string& name,
                             const std::string& text) {
  const std::string ctx = error_context(file, name, "qmoe.matrix metadata");
  const nlohmann::json j = internal::parse_json_checked(text, ctx);
  auto fail = [&](const std::string& what) { return FormatError(ctx + ": " + what); };
  const std::optional<Codec> named = j.is_object() && j.contains("codec") && j["codec"].is_string()
                                         ? codec_from_name(j["codec"].get<std::string>())
                                         : std::nullopt;
  const bool fitted = named && codec_traits(*named).has_fitted_dictionary();
  if (!j.is_object() || j.size() != (fitted ? 4u : 3u) || !j.contains("codec") ||
      !j.contains("shape") || !j.contains("dtype") || (fitted && !j.contains("dictionary"))) {
    throw fail(fitted ? "a " + j["codec"].get<std::string>() +
                            " entry must be an object with exactly \"codec\", \"shape\", "
                            "\"dtype\" and \"dictionary\""
                      : std::string("must be an object with exactly \"codec\", \"shape\" and "
                                    "\"dtype\""));
  }
  const auto& c = j["codec"];
  const auto codec = c.is_string() ? codec_from_name(c.get<std::string>()) : std::nullopt;
  if (!codec) throw fail("unknown codec " + c.dump());
  std::string dictionary;
  if (fitted) {
    const auto& d = j["dictionary"];
    if (!d.is_string() || !is_lower_hex64(d.get<std::string>()))
      throw fail("dictionary must be 16 lowercase hex digits, not " + d.dump());
    dictionary = d.get<std::string>();
  }
  const auto& s = j["shape"];
  if (!s.is_array() || s.size() != 2) throw fail("shape must be [rows, cols]");
  const auto r = internal::json_size(s[0]);
  const auto cl = internal::json_size(s[1]);
  if (!r || !cl) throw fail("shape entries must be non-negative integers");
  // rows + 1 row offsets are int32, and rows * cols weights must be addressable.
  if (*r > std::numeric_limits<int32_t>::max() - 1) throw fail("too many rows");
  if (*r != 0 && *cl > std::numeric_limits<int64_t>::max() / 8 / *r)
    throw fail("rows * cols overflows");
  const auto& d = j["dtype"];
  const auto dtype = d.is_string() ? dtype_from_name(d.get<std::string>()) : std::nullopt;
  if (!dtype || !is_float_dtype(*dtype))
    throw fail("dtype must be one of F16, BF16, F32, F64, not " + d.dump());
  return {*codec, *r, *cl, *dtype, dictionary};
}

}  // namespace

void Container::Impl::load_shard(size_t shard_idx) {
  Impl& c = *this;
  const SafetensorsFile& f = c.shards[shard_idx];
  const std::string file = f.path().string();
  const auto& md = f.metadata();
  auto fail = [&](const std::string& tensor, const std::string& what) {
    return FormatError(error_context(file, tensor, what));
  };

  const auto fmt = md.find("format");
  if (fmt == md.end() || fmt->second != kFormatName) {
    throw fail("", "not a qmoe container (__metadata__ \"format\" is " +
                       (fmt == md.end() ? std::string("missing") : "\"" + fmt->second + "\"") +
                       ", expected \"qmoe\")");
  }
  const int version = parse_format_version(md);
  if (version == 0) {
    const auto ver = md.find("format_version");
    throw fail("", "unsupported format_version " +
                       (ver == md.end() ? std::string("(missing)") : "\"" + ver->second + "\"") +
                       "; this reader reads " + supported_versions());
  }
  if (shard_idx == 0) {
    c.format_version = version;
  } else if (version != c.format_version) {
    throw fail("", "format_version \"" + std::to_string(version) + "\" differs from the " +
                       std::to_string(c.format_version) + " of the container's other files");
  }
  // Version 2: the header checksum covers every metadata entry and every tensor entry, so a
  // damaged shape, offset, declaration or checksum key is caught before anything else is used.
  if (version >= 2) {
    const auto hk = md.find(std::string(kHeaderChecksumKey));
    if (hk == md.end()) {
      throw fail("", "no header checksum (__metadata__ \"" + std::string(kHeaderChecksumKey) +
                         "\"), which format_version 2 requires");
    }
    if (!is_lower_hex64(hk->second)) {
      throw fail("", "header checksum \"" + hk->second + "\" is not 16 lowercase hex digits");
    }
    const std::string got = hex64(header_digest(md, f.tensors(), kHeaderChecksumKey));
    if (got != hk->second) {
      throw fail("", "header checksum mismatch: stored " + hk->second + ", computed " + got +
                         " (the header's tensor entries or metadata were altered)");
    }
  }

  // Metadata keys: matrix declarations and checksums; other "qmoe." keys are reserved.
  std::map<std::string, MatrixDecl> matrices;
  std::map<std::string, std::string> checksums;
  for (const auto& [key, value] : md) {
    if (starts_with(key, kMatrixKeyPrefix)) {
      const std::string name = key.substr(kMatrixKeyPrefix.size());
      matrices.emplace(name, parse_matrix_decl(file, name, value));
    } else if (starts_with(key, kChecksumKeyPrefix)) {
      const std::string name = key.substr(kChecksumKeyPrefix.size());
      if (f.find(name) == nullptr)
        throw fail(name, "has a checksum in __metadata__ but is not in the file");
      if (!is_lower_hex64(value))
        throw fail(name, "checksum \"" + value + "\" is not 16 lowercase hex digits");
      checksums.emplace(name, value);
    } else if (version >= 2 && key == kHeaderChecksumKey) {
      continue;  // checked above
    } else if (key == kTargetKey) {
      if (!target_from_name(value)) {
        throw fail("", "__metadata__ \"" + key + "\" is \"" + value +
                           "\", expected \"cpu\", \"gpu\" or \"any\"");
      }
    } else if (starts_with(key, kReservedPrefix)) {
      throw fail("", "unknown reserved __metadata__ key \"" + key + "\"");
    }
  }

  // Dictionary: required where a qmoe-v1 matrix is, and always exactly the generated table.
  const bool needs_dictionary = std::any_of(
      matrices.begin(), matrices.end(), [](const auto& m) { return m.second.codec == Codec::kV1; });
  const std::string dict_name(kV1DictionaryTensor);
  if (const TensorInfo* d = f.find(dict_name)) {
    if (d->dtype != DType::kI32 || d->shape != std::vector<int64_t>{v1::kEntries, 2}) {
      throw fail(dict_name, "must be I32 [65536, 2], is " + std::string(dtype_name(d->dtype)) +
                                " " + shape_str(d->shape));
    }
    const auto got = f.bytes(*d);
    const auto want = v1_table_bytes();
    if (std::memcmp(got.data(), want.data(), want.size()) != 0) {
      size_t i = 0;
      while (got[i] == want[i]) ++i;
      throw fail(dict_name,
                 "differs from the qmoe-v1 dictionary at entry " + std::to_string(i / 8));
    }
  } else if (needs_dictionary) {
    throw fail(dict_name, "is missing; the file holds qmoe-v1 matrices");
  }

  // qmoe-v2 and qmoe-v3 dictionaries: each one a matrix of the file refers to, checked once.
  std::map<std::string, std::pair<std::span<const uint32_t>, uint64_t>> fitted_dicts;
  for (const auto& entry : matrices) {
    const Codec codec = entry.second.codec;
    if (!codec_traits(codec).has_fitted_dictionary()) continue;
    const std::string dname = dictionary_tensor(codec, entry.second.dictionary);
    if (fitted_dicts.count(dname) != 0) continue;
    const std::string cname(codec_name(codec));
    const TensorInfo* d = f.find(dname);
    if (d == nullptr)
      throw fail(entry.first, "its " + cname + " dictionary '" + dname + "' is missing");
    if (d->dtype != DType::kU32 || d->shape != std::vector<int64_t>{v2::kEntries}) {
      throw fail(dname, "must be U32 [65536], is " + std::string(dtype_name(d->dtype)) + " " +
                            shape_str(d->shape));
    }
    const auto words = f.as<uint32_t>(*d, DType::kU32);
    validate_dictionary(codec, words, error_context(file, dname, ""));
    const uint64_t id = v2_dictionary_id(words);
    if (hex64(id) != entry.second.dictionary) {
      throw fail(dname, "its XXH3-64 is " + hex64(id) + ", not the id in its name");
    }
    fitted_dicts.emplace(dname, std::make_pair(words, id));
  }

  // Tensor groups.
  std::set<std::string> claimed;
  for (const auto& entry : matrices) {
    const std::string& name = entry.first;  // not a structured binding: lambdas below capture it
    const MatrixDecl& decl = entry.second;
    if (name.empty() || starts_with(name, kReservedPrefix) || is_member_name(name)) {
      throw fail(name, "reserved or empty matrix name");
    }
    if (c.compressed_index.count(name) != 0)
      throw fail(name, "compressed matrix appears twice in the container");
    auto member = [&](std::string_view suffix, DType dtype,
                      const std::vector<int64_t>& shape) -> const TensorInfo& {
      const std::string mname = name + std::string(suffix);
      const TensorInfo* t = f.find(mname);
      if (t == nullptr) throw fail(name, "group member '" + mname + "' is missing");
      if (t->dtype != dtype || (!shape.empty() && t->shape != shape)) {
        throw fail(mname, "must be " + std::string(dtype_name(dtype)) + " " +
                              (shape.empty() ? std::string("[n]") : shape_str(shape)) + ", is " +
                              std::string(dtype_name(t->dtype)) + " " + shape_str(t->shape));
      }
      claimed.insert(mname);
      return *t;
    };
    CompressedEntry e;
    e.name = name;
    e.original_dtype = decl.dtype;
    e.original_shape = {decl.rows, decl.cols};
    e.shard = file;
    e.view.codec = decl.codec;
    e.view.rows = decl.rows;
    e.view.cols = decl.cols;
    for (const Member mb : codec_traits(decl.codec).members()) {
      const MemberSpec spec = member_spec(mb, decl.rows, decl.cols);
      const TensorInfo& t = member(spec.suffix, spec.dtype, spec.shape);
      if (spec.shape.empty() && t.shape.size() != 1)
        throw fail(t.name, "must be 1-D, is " + shape_str(t.shape));
      if (mb == Member::kCodes && t.shape[0] > std::numeric_limits<int32_t>::max()) {
        throw fail(t.name, "holds more codes than int32 row offsets can address");
      }
      set_member(e.view, mb, f, t);
    }
    if (codec_traits(decl.codec).has_fitted_dictionary()) {
      const auto& d = fitted_dicts.at(dictionary_tensor(decl.codec, decl.dictionary));
      e.view.dictionary = d.first;
      e.view.dictionary_id = d.second;
    }
    c.compressed_index.emplace(name, c.compressed.size());
    c.compressed.push_back(std::move(e));
  }

  // Every stored tensor: classify, require a checksum, optionally verify it.
  for (const TensorInfo& t : f.tensors()) {
    const std::optional<Codec> dict_codec = fitted_dictionary_codec(t.name);
    if (dict_codec && fitted_dicts.count(t.name) == 0) {
      throw fail(t.name, std::string(codec_name(*dict_codec)) +
                             " dictionary used by no matrix of its file");
    }
    if (starts_with(t.name, kReservedPrefix) && !is_dictionary_name(t.name)) {
      throw fail(t.name, "unknown reserved tensor name (\"qmoe.\" prefix)");
    }
    if (is_member_name(t.name) && claimed.count(t.name) == 0) {
      throw fail(t.name,
                 "looks like a group member but belongs to no qmoe.matrix entry of its codec");
    }
    const auto ck = checksums.find(t.name);
    if (ck == checksums.end())
      throw fail(t.name, "has no checksum (qmoe.xxh3." + t.name + ") in __metadata__");
    c.stored.push_back({shard_idx, t.name, ck->second});
    if (is_dictionary_name(t.name) || claimed.count(t.name) != 0) continue;
    if (c.dense_index.count(t.name) != 0)
      throw fail(t.name, "tensor appears twice in the container");
    c.dense_index.emplace(t.name, c.dense.size());
    c.dense.push_back(DenseEntry{t.name, t.dtype, t.shape, f.bytes(t), file});
  }
}

namespace {

// Below this many bytes of work a pass runs on the calling thread: waking a team of threads
// costs more than hashing or checking a small file (milliseconds on a busy machine).
constexpr int64_t kParallelBytes = int64_t{1} << 20;

// Runs fn(0 .. n-1) on all threads (on one when `bytes` of work are few); returns the message of
// the FormatError thrown for the smallest index, or "" when none threw. Tensors are large and
// few, hence dynamic scheduling.
template <class Fn>
std::string parallel_errors(size_t n, int64_t bytes, const Fn& fn) {
  std::vector<std::string> errors(n);
  const auto count = static_cast<int64_t>(n);
#pragma omp parallel for schedule(dynamic, 1) if (count > 1 && bytes >= kParallelBytes)
  for (int64_t i = 0; i < count; ++i) {
    try {
      fn(static_cast<size_t>(i));
    } catch (const FormatError& e) {
      errors[static_cast<size_t>(i)] = e.what();
    }
  }
  for (auto& e : errors) {
    if (!e.empty()) return std::move(e);
  }
  return {};
}

void check_global_metadata(const std::string& file, const std::map<std::string, std::string>& md) {
  const auto fmt = md.find("format");
  if (fmt == md.end() || fmt->second != kFormatName) {
    throw FormatError(error_context(
        file, "", "not a qmoe container index (metadata \"format\" is not \"qmoe\")"));
  }
  if (parse_format_version(md) == 0) {
    throw FormatError(error_context(
        file, "",
        "unsupported format_version in the index; this reader reads " + supported_versions()));
  }
  if (const auto t = md.find(std::string(kTargetKey));
      t != md.end() && !target_from_name(t->second)) {
    throw FormatError(error_context(file, "",
                                    "metadata \"" + t->first + "\" is \"" + t->second +
                                        "\", expected \"cpu\", \"gpu\" or \"any\""));
  }
}

// Shard k of n ("model-XXXXX-of-YYYYY.safetensors", 1-based) as written, or nullopt.
std::optional<std::pair<size_t, size_t>> parse_shard_name(const std::string& s) {
  unsigned long long k = 0, n = 0;
  if (std::sscanf(s.c_str(), "model-%llu-of-%llu.safetensors", &k, &n) != 2 || k < 1 || k > n ||
      n > (1ull << 32)) {
    return std::nullopt;
  }
  char canonical[96];  // the spelling the writer uses, and no other
  std::snprintf(canonical, sizeof canonical, "model-%05llu-of-%05llu.safetensors", k, n);
  if (s != canonical) return std::nullopt;
  return std::make_pair(static_cast<size_t>(k), static_cast<size_t>(n));
}

}  // namespace

Container Container::open(const std::filesystem::path& path, const ContainerOpenOptions& opt) {
  auto impl = std::make_shared<Impl>();
  std::filesystem::path single;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    if (std::filesystem::exists(path / kIndexFileName, ec)) {
      impl->index_path = path / kIndexFileName;
    } else if (std::filesystem::exists(path / kSingleFileName, ec)) {
      single = path / kSingleFileName;
    } else {
      throw FormatError(error_context(path.string(), "",
                                      "directory holds neither " + std::string(kIndexFileName) +
                                          " nor " + std::string(kSingleFileName)));
    }
  } else if (path.extension() == ".json") {
    impl->index_path = path;
  } else {
    single = path;
  }

  if (impl->index_path.empty()) {
    impl->shards.push_back(SafetensorsFile::open(single));
    impl->load_shard(0);
    for (const auto& [k, v] : impl->shards[0].metadata()) {
      if (!starts_with(k, kReservedPrefix) || k == kTargetKey) impl->metadata.emplace(k, v);
    }
  } else {
    const std::string ifile = impl->index_path.string();
    const nlohmann::json idx =
        internal::parse_json_checked(read_regular_file(impl->index_path, kMaxIndexBytes), ifile);
    if (!idx.is_object()) throw FormatError(error_context(ifile, "", "index is not a JSON object"));
    if (const auto m = idx.find("metadata"); m != idx.end() && !m->is_null()) {
      if (!m->is_object())
        throw FormatError(error_context(ifile, "", "\"metadata\" is not an object"));
      for (const auto& [k, v] : m->items()) {
        if (!v.is_string())
          throw FormatError(
              error_context(ifile, "", "metadata value of \"" + k + "\" is not a string"));
        impl->metadata.emplace(k, v.get<std::string>());
      }
    }
    check_global_metadata(ifile, impl->metadata);
    for (const auto& [k, v] : impl->metadata) {
      if (starts_with(k, kReservedPrefix) && k != kTargetKey)
        throw FormatError(error_context(ifile, "", "reserved metadata key \"" + k + "\""));
    }
    const auto wm = idx.find("weight_map");
    if (wm == idx.end() || !wm->is_object()) {
      throw FormatError(error_context(ifile, "", "missing or non-object \"weight_map\""));
    }
    std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> tensors
    for (const auto& [tensor, shard] : wm->items()) {
      if (!shard.is_string())
        throw FormatError(error_context(ifile, tensor, "weight_map value is not a string"));
      const std::string s = shard.get<std::string>();
      // Shards are plain file names beside the index: no directories, so an index cannot point
      // a reader elsewhere on the machine.
      if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos ||
          s.find('\0') != std::string::npos) {
        throw FormatError(
            error_context(ifile, tensor, "shard name \"" + s + "\" is not a plain file name"));
      }
      by_shard[s].push_back(tensor);
    }
    // The index is the only file without a checksum of its own; everything it says is checked
    // against the shards' (checksummed) headers instead: the shards are exactly shards 1..n of n,
    // each lists exactly the shard's tensors, and each shard's global and user metadata equals
    // the index's. An index that lists nothing cannot vouch for any shard.
    if (by_shard.empty()) {
      throw FormatError(error_context(
          ifile, "", "\"weight_map\" is empty: a sharded container lists at least one tensor"));
    }
    size_t shard_count = 0;
    std::set<size_t> numbers;
    for (const auto& [shard, tensors] : by_shard) {
      const auto kn = parse_shard_name(shard);
      if (!kn) {
        throw FormatError(
            error_context(ifile, tensors.front(),
                          "shard name \"" + shard + "\" is not model-XXXXX-of-YYYYY.safetensors"));
      }
      if (shard_count != 0 && kn->second != shard_count) {
        throw FormatError(error_context(ifile, tensors.front(),
                                        "shard \"" + shard + "\" counts " +
                                            std::to_string(kn->second) + " shards, others " +
                                            std::to_string(shard_count)));
      }
      shard_count = kn->second;
      numbers.insert(kn->first);
    }
    if (numbers.size() != shard_count) {
      size_t k = 1;
      while (numbers.count(k) != 0) ++k;
      char name[96];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k, shard_count);
      throw FormatError(error_context(ifile, "",
                                      "no tensor is listed for shard " + std::string(name) +
                                          " (shard " + std::to_string(k) + " of " +
                                          std::to_string(shard_count) + ")"));
    }
    const std::filesystem::path dir = impl->index_path.parent_path();
    for (const auto& [shard, tensors] : by_shard) {
      const std::filesystem::path sp = dir / shard;
      if (!std::filesystem::exists(sp, ec)) {
        throw FormatError(error_context(ifile, tensors.front(),
                                        "shard '" + shard + "' is missing (" + sp.string() + ")"));
      }
      const size_t k = impl->shards.size();
      impl->shards.push_back(SafetensorsFile::open(sp));
      const SafetensorsFile& f = impl->shards.back();
      for (const auto& [key, value] : f.metadata()) {
        if (starts_with(key, kReservedPrefix) && key != kTargetKey) continue;
        const auto it = impl->metadata.find(key);
        if (it == impl->metadata.end() || it->second != value) {
          throw FormatError(
              error_context(sp.string(), "",
                            "metadata \"" + key + "\" differs from the index's (" + ifile + ")"));
        }
      }
      for (const auto& [key, value] : impl->metadata) {
        if (f.metadata().count(key) == 0) {
          throw FormatError(error_context(
              sp.string(), "", "metadata \"" + key + "\" of the index (" + ifile + ") is missing"));
        }
      }
      for (const std::string& t : tensors) {
        if (f.find(t) == nullptr) {
          throw FormatError(
              error_context(ifile, t, "listed for shard '" + shard + "' but absent from it"));
        }
      }
      {
        const std::set<std::string> listed(tensors.begin(), tensors.end());
        for (const TensorInfo& t : f.tensors()) {
          if (listed.count(t.name) == 0 && !is_dictionary_name(t.name)) {
            throw FormatError(
                error_context(sp.string(), t.name, "is not listed in the index for this shard"));
          }
        }
      }
      impl->load_shard(k);
    }
  }

  // A logical name is either compressed or dense, never both.
  for (const auto& [name, i] : impl->dense_index) {
    if (impl->compressed_index.count(name) != 0) {
      throw FormatError(error_context(impl->dense[i].shard, name,
                                      "is both a dense tensor and a compressed matrix"));
    }
  }
  // The passes over the data (checksums, then codes) run in parallel over tensors; the error
  // reported is the first in container order, so the message does not depend on thread timing.
  if (opt.verify_checksums) {
    const Impl& ci = *impl;
    int64_t bytes = 0;
    for (const auto& st : ci.stored) bytes += ci.shards[st.shard].find(st.name)->nbytes();
    const auto errors = parallel_errors(ci.stored.size(), bytes, [&](size_t i) {
      const auto& s = ci.stored[i];
      const SafetensorsFile& f = ci.shards[s.shard];
      const std::string got = checksum_hex(f.bytes(*f.find(s.name)));
      if (got != s.checksum) {
        throw FormatError(
            error_context(f.path().string(), s.name,
                          "checksum mismatch: stored " + s.checksum + ", computed " + got));
      }
    });
    if (!errors.empty()) throw FormatError(errors);
  }
  if (opt.validate_codes) {
    const Impl& ci = *impl;
    int64_t bytes = 0;
    for (const auto& e : ci.compressed) bytes += e.view.compressed_bytes();
    const auto errors = parallel_errors(ci.compressed.size(), bytes, [&](size_t i) {
      const CompressedEntry& e = ci.compressed[i];
      // The file's qmoe-v2 and qmoe-v3 dictionaries were checked once each by load_shard().
      validate_codes(e.view, error_context(e.shard, e.name, ""));
    });
    if (!errors.empty()) throw FormatError(errors);
  }
  Container c;
  c.impl_ = std::move(impl);
  return c;
}

std::optional<Target> Container::target() const {
  const auto t = impl_->metadata.find(std::string(kTargetKey));
  return t == impl_->metadata.end() ? std::nullopt : target_from_name(t->second);
}

const std::map<std::string, std::string>& Container::metadata() const {
  return impl_->metadata;
}

int Container::format_version() const {
  return impl_->format_version;
}

std::vector<std::string> Container::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->compressed.size() + impl_->dense.size());
  for (const auto& e : impl_->compressed) out.push_back(e.name);
  for (const auto& e : impl_->dense) out.push_back(e.name);
  std::sort(out.begin(), out.end());
  return out;
}

const CompressedEntry* Container::find_compressed(std::string_view name) const {
  const auto it = impl_->compressed_index.find(name);
  return it == impl_->compressed_index.end() ? nullptr : &impl_->compressed[it->second];
}

const DenseEntry* Container::find_dense(std::string_view name) const {
  const auto it = impl_->dense_index.find(name);
  return it == impl_->dense_index.end() ? nullptr : &impl_->dense[it->second];
}

const std::vector<CompressedEntry>& Container::compressed() const {
  return impl_->compressed;
}
const std::vector<DenseEntry>& Container::dense() const {
  return impl_->dense;
}

std::vector<std::filesystem::path> Container::files() const {
  std::vector<std::filesystem::path> out;
  if (!impl_->index_path.empty()) out.push_back(impl_->index_path);
  for (const auto& s : impl_->shards) out.push_back(s.path());
  return out;
}

std::vector<std::string> Container::mismatched_checksums() const {
  const auto& stored = impl_->stored;
  std::vector<char> mismatch(stored.size(), 0);
  const auto count = static_cast<int64_t>(stored.size());
  int64_t bytes = 0;
  for (const auto& s : stored) bytes += impl_->shards[s.shard].find(s.name)->nbytes();
#pragma omp parallel for schedule(dynamic, 1) if (count > 1 && bytes >= kParallelBytes)
  for (int64_t i = 0; i < count; ++i) {
    const auto& s = stored[static_cast<size_t>(i)];
    const SafetensorsFile& f = impl_->shards[s.shard];
    mismatch[static_cast<size_t>(i)] = checksum_hex(f.bytes(*f.find(s.name))) != s.checksum;
  }
  std::vector<std::string> bad;
  for (size_t i = 0; i < stored.size(); ++i) {
    if (mismatch[i]) bad.push_back(stored[i].name);
  }
  return bad;
}

// ---- writer ------------------------------------------------------------------------------------

namespace {

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k, n);
  return buf;
}

struct StoredTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
};

}  // namespace

struct ContainerWriter::Impl {
  std::filesystem::path out;
  ContainerWriteOptions opt;
  bool sharded = false;
  bool finished = false;
  std::map<std::string, std::string> user_metadata;
  std::optional<Target> target;
  std::set<std::string, std::less<>> names;  // logical names and stored names

  // The open file (shard): `open`; `cur` is its writer when this process writes it.
  bool open = false;
  std::unique_ptr<SafetensorsWriter> cur;
  int64_t cur_bytes = 0;
  std::set<std::string> cur_dictionaries;  // dictionary tensors the open file holds
  bool cur_empty = true;
  // Sharded only: closed shards under intermediate names, renamed by finish(), and their marks
  // for the fault handler of file.h.
  std::vector<std::filesystem::path> closed;
  std::vector<internal::TempFileMark> closed_marks;
  std::vector<std::pair<std::string, size_t>> weight_map;  // stored name -> shard number (0-based)
  bool any_closed = false;
  bool part_finished = false;  // finish_part() done
  bool kept = false;           // keep_part(): the shards are the finishing process's

  ~Impl() {
    cur.reset();  // removes its temporary file
    if (!finished && !kept) {
      // Partitioned: the shards of every process, as far as this one got (another process's
      // file that does not exist is no error).
      for (const auto& p : closed) ::unlink(p.c_str());
    }
  }

  // Partitioned writing: whether this process writes shard k.
  bool mine(size_t k) const {
    return static_cast<int>(k % static_cast<size_t>(opt.part_count)) == opt.part_rank;
  }

  std::filesystem::path intermediate(size_t k) const {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu.safetensors.partial.", k + 1);
    return out / (buf + (opt.part_tag.empty() ? std::to_string(::getpid()) : opt.part_tag));
  }

  void open_file() {
    if (!sharded || mine(closed.size())) {
      cur = std::make_unique<SafetensorsWriter>(sharded ? intermediate(closed.size()) : out);
      cur->set_header_checksum_key(std::string(kHeaderChecksumKey));
    }
    open = true;
    cur_bytes = 0;
    cur_dictionaries.clear();
    cur_empty = true;
  }

  void put_global_metadata(SafetensorsWriter& w) const {
    w.set_metadata("format", std::string(kFormatName));
    w.set_metadata("format_version", std::to_string(kFormatVersion));
    if (target) w.set_metadata(std::string(kTargetKey), std::string(target_name(*target)));
    for (const auto& [k, v] : user_metadata) w.set_metadata(k, v);
  }

  void close_shard() {
    closed.push_back(intermediate(closed.size()));
    if (cur) {
      put_global_metadata(*cur);
      cur->finish();
      closed_marks.emplace_back(closed.back().string());
      cur.reset();
    }
    open = false;
    any_closed = true;
  }

  void put(const StoredTensor& t) {
    if (cur) {
      cur->add(t.name, t.dtype, t.shape, t.bytes);
      cur->set_metadata(std::string(kChecksumKeyPrefix) + t.name, checksum_hex(t.bytes));
    }
    cur_bytes += static_cast<int64_t>(t.bytes.size());
    cur_empty = false;
    // A dictionary may be in several shards, so it cannot have one weight_map entry; every
    // shard that needs it holds it, which is all a reader has to know.
    if (sharded && !is_dictionary_name(t.name)) weight_map.emplace_back(t.name, closed.size());
  }

  // Adds a group of tensors that must share a file, plus the dictionary it needs (if any) where
  // the file does not hold it yet. `check` runs first when this process writes the group.
  void add_group(const std::vector<StoredTensor>& group, const StoredTensor* dictionary,
                 const std::string& matrix_key, const std::string& matrix_value,
                 const std::function<void()>& check = {}) {
    if (part_finished)
      throw InvalidArgument(error_context(out.string(), "", "writer already finished"));
    int64_t bytes = 0;
    for (const auto& t : group) bytes += static_cast<int64_t>(t.bytes.size());
    auto missing = [&] { return dictionary && cur_dictionaries.count(dictionary->name) == 0; };
    if (sharded && open && !cur_empty) {
      const int64_t extra = missing() ? static_cast<int64_t>(dictionary->bytes.size()) : 0;
      if (cur_bytes + bytes + extra > opt.shard_size) close_shard();
    }
    if (!open) open_file();
    if (cur && check) check();
    if (missing()) {
      put(*dictionary);
      cur_dictionaries.insert(dictionary->name);
    }
    for (const auto& t : group) put(t);
    if (cur && !matrix_key.empty()) cur->set_metadata(matrix_key, matrix_value);
  }

  void check_name(const std::string& name) {
    const std::string file = out.string();
    if (finished) throw InvalidArgument(error_context(file, name, "writer already finished"));
    if (name.empty() || name == "__metadata__" || starts_with(name, kReservedPrefix) ||
        is_member_name(name)) {
      throw InvalidArgument(error_context(file, name, "reserved or empty tensor name"));
    }
    if (names.count(name) != 0)
      throw InvalidArgument(error_context(file, name, "duplicate tensor name"));
  }
};

ContainerWriter::ContainerWriter(std::filesystem::path out, ContainerWriteOptions opt)
    : impl_(std::make_unique<Impl>()) {
  if (opt.shard_size < 0) throw InvalidArgument("ContainerWriter: shard_size must be >= 0");
  if (opt.part_count < 1 || opt.part_rank < 0 || opt.part_rank >= opt.part_count)
    throw InvalidArgument("ContainerWriter: part_rank must be in [0, part_count)");
  if (opt.part_count > 1 && opt.shard_size == 0)
    throw InvalidArgument("ContainerWriter: partitioned writing needs a sharded container");
  impl_->out = std::move(out);
  impl_->opt = opt;
  impl_->sharded = opt.shard_size > 0;
  if (impl_->sharded) {
    std::error_code ec;
    std::filesystem::create_directories(impl_->out, ec);
    if (!std::filesystem::is_directory(impl_->out)) {
      throw InvalidArgument(
          error_context(impl_->out.string(), "", "cannot create the output directory"));
    }
  }
}

ContainerWriter::~ContainerWriter() = default;

void ContainerWriter::set_metadata(std::string key, std::string value) {
  Impl& w = *impl_;
  if (w.finished)
    throw InvalidArgument(error_context(w.out.string(), "", "writer already finished"));
  if (key == "format" || key == "format_version" || starts_with(key, kReservedPrefix)) {
    throw InvalidArgument(
        error_context(w.out.string(), "", "metadata key \"" + key + "\" is reserved"));
  }
  if (w.any_closed) {
    throw InvalidArgument(error_context(
        w.out.string(), "", "set_metadata(\"" + key + "\") after the first shard was written"));
  }
  w.user_metadata[std::move(key)] = std::move(value);
}

void ContainerWriter::set_target(Target target) {
  Impl& w = *impl_;
  if (w.finished)
    throw InvalidArgument(error_context(w.out.string(), "", "writer already finished"));
  if (w.any_closed) {
    throw InvalidArgument(
        error_context(w.out.string(), "", "set_target() after the first shard was written"));
  }
  // "any" is the meaning of a file without the key (SPEC 2.2): not written.
  if (target == Target::kAny) {
    w.target.reset();
  } else {
    w.target = target;
  }
}

void ContainerWriter::add_dense(std::string name, DType dtype, std::vector<int64_t> shape,
                                std::span<const std::byte> data) {
  impl_->check_name(name);
  impl_->add_group({{name, dtype, std::move(shape), data}}, nullptr, {}, {});
  impl_->names.insert(std::move(name));
}

void ContainerWriter::add_compressed(std::string name, const CompressedView& m,
                                     DType original_dtype,
                                     const std::function<void()>& check_source) {
  Impl& w = *impl_;
  w.check_name(name);
  if (!is_float_dtype(original_dtype)) {
    throw InvalidArgument(
        error_context(w.out.string(), name, "original dtype must be F16, BF16, F32 or F64"));
  }
  if (m.rows > std::numeric_limits<int32_t>::max() - 1) {
    throw InvalidArgument(error_context(w.out.string(), name, "too many rows"));
  }
  auto check = [&] {
    if (check_source) check_source();
    try {
      validate(m, error_context(w.out.string(), name, ""));
    } catch (const FormatError& e) {
      throw InvalidArgument(e.what());
    }
  };
  const CodecTraits& traits = codec_traits(m.codec);
  std::vector<StoredTensor> group;
  for (const Member mb : traits.members()) {
    const std::span<const std::byte> bytes = internal::member_bytes(m, mb);
    MemberSpec spec = member_spec(mb, m.rows, m.cols);
    if (spec.shape.empty())
      spec.shape = {static_cast<int64_t>(bytes.size() / dtype_size(spec.dtype))};
    group.push_back({name + std::string(spec.suffix), spec.dtype, std::move(spec.shape), bytes});
  }
  std::optional<StoredTensor> dictionary;
  if (traits.dictionary == DictionaryKind::kBuiltin) {
    dictionary = StoredTensor{
        std::string(traits.dictionary_tensor), DType::kI32, {v1::kEntries, 2}, v1_table_bytes()};
  } else if (traits.has_fitted_dictionary()) {
    dictionary = StoredTensor{dictionary_tensor(m.codec, hex64(m.dictionary_id)),
                              DType::kU32,
                              {v2::kEntries},
                              std::as_bytes(m.dictionary)};
  }
  w.add_group(group, dictionary ? &*dictionary : nullptr, std::string(kMatrixKeyPrefix) + name,
              matrix_json(m, original_dtype), check);
  w.names.insert(std::move(name));
}

std::vector<std::filesystem::path> ContainerWriter::finish() {
  Impl& w = *impl_;
  if (w.finished)
    throw InvalidArgument(error_context(w.out.string(), "", "writer already finished"));
  if (!w.sharded) {
    if (!w.open) w.open_file();
    w.put_global_metadata(*w.cur);
    w.cur->finish();
    w.cur.reset();
    w.finished = true;
    return {w.out};
  }
  if (w.weight_map.empty()) {
    // A reader refuses an index that lists nothing (it could not tell which shards belong to
    // it), so there is no empty sharded container.
    throw InvalidArgument(error_context(
        w.out.string(), "",
        "a sharded container needs at least one tensor (write an empty one as a single file)"));
  }
  if (w.opt.part_count > 1 && !w.part_finished) {
    throw InvalidArgument(
        error_context(w.out.string(), "", "partitioned writing: finish_part() before finish()"));
  }
  if (w.open) w.close_shard();
  const size_t n = w.closed.size();
  std::vector<std::filesystem::path> files;
  for (size_t k = 0; k < n; ++k) files.push_back(w.out / shard_name(k + 1, n));

  nlohmann::json index = nlohmann::json::object();
  nlohmann::json md = nlohmann::json::object();
  md["format"] = kFormatName;
  md["format_version"] = std::to_string(kFormatVersion);
  if (w.target) md[std::string(kTargetKey)] = std::string(target_name(*w.target));
  for (const auto& [k, v] : w.user_metadata) md[k] = v;
  index["metadata"] = std::move(md);
  nlohmann::json wm = nlohmann::json::object();
  for (const auto& [t, k] : w.weight_map) wm[t] = shard_name(k + 1, n);
  index["weight_map"] = std::move(wm);
  std::string text;
  try {
    text = index.dump(2) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(
        error_context(w.out.string(), "", std::string("cannot encode the index: ") + e.what()));
  }

  const std::filesystem::path index_path = w.out / kIndexFileName;
  const std::string tmp = index_path.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) throw Error(internal::io_error(tmp, "cannot create"));
  internal::TempFileMark tmp_mark(tmp);
  try {
    internal::write_all(fd, text.data(), text.size(), tmp);
    if (::fsync(fd) != 0) throw Error(internal::io_error(tmp, "fsync failed"));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const std::string msg = internal::io_error(tmp, "close failed");
    ::unlink(tmp.c_str());
    throw Error(msg);
  }
  // Shards first, the index last: a reader never sees an index whose shards are not all there.
  // On failure the shards already renamed are removed again: nothing stays under a final name.
  auto undo = [&](size_t renamed) {
    for (size_t k = 0; k < renamed; ++k) ::unlink(files[k].c_str());
    ::unlink(tmp.c_str());
  };
  for (size_t k = 0; k < n; ++k) {
    if (::rename(w.closed[k].c_str(), files[k].c_str()) != 0) {
      const std::string msg = internal::io_error(files[k].string(), "rename failed");
      undo(k);
      throw Error(msg);
    }
  }
  if (::rename(tmp.c_str(), index_path.c_str()) != 0) {
    const std::string msg = internal::io_error(index_path.string(), "rename failed");
    undo(n);
    throw Error(msg);
  }
  tmp_mark.release();
  w.closed_marks.clear();
  w.finished = true;
  files.push_back(index_path);
  return files;
}

void ContainerWriter::finish_part() {
  Impl& w = *impl_;
  if (w.finished || w.part_finished)
    throw InvalidArgument(error_context(w.out.string(), "", "writer already finished"));
  if (w.opt.part_count < 2)
    throw InvalidArgument(error_context(w.out.string(), "", "finish_part() without a partition"));
  if (w.open) w.close_shard();
  w.part_finished = true;
}

void ContainerWriter::keep_part() {
  Impl& w = *impl_;
  if (!w.part_finished)
    throw InvalidArgument(error_context(w.out.string(), "", "keep_part() before finish_part()"));
  w.kept = true;  // (an interrupt still removes them: the job stops anyway)
}

}  // namespace qmoe
