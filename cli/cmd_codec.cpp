// qmoe encode | transcode | decode | verify | dictionary
#include <regex.h>

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "command.h"
#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/format/reference.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/checkpoint.h"
#include "util.h"

namespace qmoe::cli {
namespace {

// The float types the encoder ternarizes and decode writes (F64 is not one).
bool is_encodable_dtype(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

// A POSIX extended regular expression that must match a whole tensor name.
class NameFilter {
 public:
  explicit NameFilter(const std::string& pattern) {
    const std::string anchored = "^(" + pattern + ")$";
    if (const int rc = regcomp(&re_, anchored.c_str(), REG_EXTENDED | REG_NOSUB); rc != 0) {
      char msg[256];
      regerror(rc, &re_, msg, sizeof msg);
      throw InvalidArgument("--tensors: invalid regular expression '" + pattern + "': " + msg);
    }
  }
  ~NameFilter() { regfree(&re_); }
  NameFilter(const NameFilter&) = delete;
  NameFilter& operator=(const NameFilter&) = delete;
  bool matches(const std::string& name) const {
    return regexec(&re_, name.c_str(), 0, nullptr, 0) == 0;
  }

 private:
  regex_t re_;
};

// ---- encode -------------------------------------------------------------------------------------
struct EncodeArgs {
  std::string input, output, tensors = ".*", codec = "auto", target = "any";
  int threads = 0;
  std::string shard_size = "0";
};

int run_encode(const EncodeArgs& a) {
  Stopwatch clock;
  const auto in = SafetensorsFile::open(a.input);
  const NameFilter select(a.tensors);
  const std::optional<Codec> codec = parse_codec_option(a.codec);
  const Target target = parse_target_option(a.target);
  ContainerWriter out(a.output, {.shard_size = parse_bytes(a.shard_size)});
  out.set_target(target);
  // The input's own metadata is kept, except the keys the container defines itself; a source
  // "format" (e.g. "pt") is kept as "source_format".
  for (const auto& [k, v] : in.metadata()) {
    if (k == "format")
      out.set_metadata("source_format", v);
    else if (k != "format_version" && k.rfind("qmoe.", 0) != 0)
      out.set_metadata(k, v);
  }
  out.set_metadata("quantizer", "rtn");
  int64_t n_compressed = 0, weights = 0, in_bytes = 0, out_bytes = 0;
  for (const auto& t : in.tensors()) {
    const bool pick = t.shape.size() == 2 && is_encodable_dtype(t.dtype) && select.matches(t.name);
    if (!pick) {
      out.add_dense(t.name, t.dtype, t.shape, in.bytes(t));
      continue;
    }
    const auto tern = ternarize_rtn(in.bytes(t).data(), t.dtype, t.shape[0], t.shape[1]);
    const auto m = encode(tern, {.codec = codec, .target = target, .threads = a.threads});
    out.add_compressed(t.name, m.view(), t.dtype);
    ++n_compressed;
    weights += t.numel();
    in_bytes += t.nbytes();
    out_bytes += m.view().compressed_bytes();
    std::printf("%-60s %6lld x %-6lld %s  zeros %5.1f%%  %.3f bits/weight\n", t.name.c_str(),
                static_cast<long long>(t.shape[0]), static_cast<long long>(t.shape[1]),
                std::string(codec_name(m.codec)).c_str(), 100.0 * tern.zero_fraction(),
                m.view().bits_per_weight());
  }
  const auto files = out.finish();
  const double secs = clock.seconds();
  std::printf(
      "encoded %lld matrices (%lld weights, round-to-nearest ternary): %s -> %s, %.3f bits/weight, "
      "%.1f M weights/s; wrote %zu file(s) to %s\n",
      static_cast<long long>(n_compressed), static_cast<long long>(weights),
      human_bytes(static_cast<double>(in_bytes)).c_str(),
      human_bytes(static_cast<double>(out_bytes)).c_str(),
      weights ? 8.0 * static_cast<double>(out_bytes) / static_cast<double>(weights) : 0.0,
      static_cast<double>(weights) / secs / 1e6, files.size(), a.output.c_str());
  return 0;
}

Registrar encode_cmd("encode", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<EncodeArgs>();
  app.description(
      "Ternarize (round to nearest) and encode the 2-D float tensors of a safetensors file");
  app.add_option("input", a->input, "input .safetensors file")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("-o,--output", a->output,
                 "output container (a directory when --shard-size is given)")
      ->required();
  app.add_option("--tensors", a->tensors,
                 "POSIX extended regular expression matching the whole names of the tensors to "
                 "compress (default: all 2-D float tensors)");
  app.add_option("--codec", a->codec, codec_help());
  app.add_option("--target", a->target, kTargetHelp);
  app.add_option("--threads", a->threads, "threads (0 = all)");
  app.add_option("--shard-size", a->shard_size,
                 "shard the output at about this size (e.g. 2G); 0 = one file");
  return [a] { return run_encode(*a); };
});

// A container's user metadata (everything but the keys the format defines) into `out`.
template <class Writer>
void copy_user_metadata(const Container& c, Writer& out) {
  for (const auto& [k, v] : c.metadata()) {
    if (k.rfind("qmoe.", 0) != 0 && k != "format" && k != "format_version") out.set_metadata(k, v);
  }
}

// ---- transcode ----------------------------------------------------------------------------------
struct TranscodeArgs {
  std::string input, output, codec = "auto", target;
  int threads = 0;
  std::string shard_size = "0";
};

// Every compressed matrix of a container in another codec (the same symbols and levels), every
// dense tensor and the user metadata copied.
int run_transcode(const TranscodeArgs& a) {
  Stopwatch clock;
  const std::optional<Codec> codec = parse_codec_option(a.codec);
  const auto c = Container::open(a.input);
  // The target: --target, else the input's, else "any".
  const Target target =
      !a.target.empty() ? parse_target_option(a.target) : c.target().value_or(Target::kAny);
  ContainerWriter out(a.output, {.shard_size = parse_bytes(a.shard_size)});
  out.set_target(target);
  copy_user_metadata(c, out);
  for (const auto& d : c.dense()) out.add_dense(d.name, d.dtype, d.shape, d.bytes);
  int64_t in_bytes = 0, out_bytes = 0, weights = 0;
  for (const auto& e : c.compressed()) {
    const auto m = transcode(e.view, {.codec = codec, .target = target, .threads = a.threads});
    out.add_compressed(e.name, m.view(), e.original_dtype);
    in_bytes += e.view.compressed_bytes();
    out_bytes += m.view().compressed_bytes();
    weights += e.view.rows * e.view.cols;
  }
  const auto files = out.finish();
  auto bpw = [&](int64_t b) {
    return weights ? 8.0 * static_cast<double>(b) / static_cast<double>(weights) : 0.0;
  };
  std::printf(
      "transcoded %zu matrices to %s (target %s): %.4f -> %.4f bits/weight (codes, offsets and "
      "levels), %.1f s; wrote %zu file(s) to %s\n",
      c.compressed().size(), a.codec.c_str(), std::string(target_name(target)).c_str(),
      bpw(in_bytes), bpw(out_bytes), clock.seconds(), files.size(), a.output.c_str());
  return 0;
}

Registrar transcode_cmd("transcode", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<TranscodeArgs>();
  app.description(
      "Re-encode every compressed matrix of a container in another codec (same weights), e.g. "
      "qmoe-v1 to the smaller qmoe-v2 or back, or for another device: --target cpu (qmoe-g4) or "
      "gpu (qmoe-v2)");
  app.add_option("input", a->input, "container file, index JSON or directory")->required();
  app.add_option("-o,--output", a->output,
                 "output container (a directory when --shard-size is given)")
      ->required();
  app.add_option("--codec", a->codec, codec_help());
  app.add_option("--target", a->target,
                 std::string(kTargetHelp) + "; default: the input's target, else any");
  app.add_option("--threads", a->threads, "threads (0 = all)");
  app.add_option("--shard-size", a->shard_size,
                 "shard the output at about this size (e.g. 2G); 0 = one file");
  return [a] { return run_transcode(*a); };
});

// ---- decode -------------------------------------------------------------------------------------
struct DecodeArgs {
  std::string input, output, dtype = "BF16";
};

int run_decode(const DecodeArgs& a) {
  auto dtype = dtype_from_name(a.dtype);
  if (!dtype || !is_encodable_dtype(*dtype))
    throw InvalidArgument("--dtype must be F32, F16 or BF16");
  const auto c = Container::open(a.input);
  SafetensorsWriter out(a.output);
  copy_user_metadata(c, out);
  for (const auto& d : c.dense()) out.add(d.name, d.dtype, d.shape, d.bytes);
  std::vector<float> dense;
  std::vector<std::byte> bytes;
  for (const auto& e : c.compressed()) {
    const auto& v = e.view;
    dense.resize(static_cast<size_t>(v.rows * v.cols));
    decode_ref(v, dense.data());
    bytes.resize(dense.size() * static_cast<size_t>(dtype_size(*dtype)));
    if (*dtype == DType::kF32) {
      std::memcpy(bytes.data(), dense.data(), bytes.size());
    } else {
      auto* p = reinterpret_cast<uint16_t*>(bytes.data());
      for (size_t i = 0; i < dense.size(); ++i)
        p[i] = *dtype == DType::kBF16 ? float_to_bf16(dense[i]) : float_to_fp16(dense[i]);
    }
    out.add(e.name, *dtype, {v.rows, v.cols}, bytes);
  }
  out.finish();
  std::printf("decoded %zu compressed and %zu dense tensors to %s (%s)\n", c.compressed().size(),
              c.dense().size(), a.output.c_str(), std::string(dtype_name(*dtype)).c_str());
  return 0;
}

Registrar decode_cmd("decode", [](CLI::App& app) -> std::function<int()> {
  auto a = std::make_shared<DecodeArgs>();
  app.description("Expand a qmoe container back to a dense safetensors file");
  app.add_option("input", a->input, "container file, index JSON or directory")->required();
  app.add_option("-o,--output", a->output, "output .safetensors file")->required();
  app.add_option("--dtype", a->dtype, "dtype of the decoded matrices: BF16 (default), F16 or F32");
  return [a] { return run_decode(*a); };
});

// ---- verify -------------------------------------------------------------------------------------
int run_verify(const std::string& input) {
  Stopwatch clock;
  try {
    const auto c = Container::open(input, {.verify_checksums = true, .validate_codes = true});
    int64_t weights = 0;
    for (const auto& e : c.compressed()) weights += e.view.rows * e.view.cols;
    // A container that carries a Switch config (qmoe compress writes it): the config's bounds and
    // every shape it implies, checked against the tensors as eval would.
    std::string model;
    if (c.metadata().count("config.json") != 0) {
      (void)sw::SwitchSource::open(c, input);
      model = "; its Switch config and every tensor shape the config implies checked";
    }
    const std::string header = c.format_version() >= 2
                                   ? "header checksums, "
                                   : "format_version 1: the headers carry no checksum, so their "
                                     "shapes and metadata are checked for consistency only; ";
    std::printf(
        "%s: OK (%zu compressed matrices, %lld weights, %zu dense tensors, %zu file(s); %stensor "
        "checksums, offsets, codes and levels checked in %.2f s%s)\n",
        input.c_str(), c.compressed().size(), static_cast<long long>(weights), c.dense().size(),
        c.files().size(), header.c_str(), clock.seconds(), model.c_str());
    return 0;
  } catch (const FormatError& e) {
    std::printf("%s: FAILED: %s\n", input.c_str(), e.what());
    return 1;
  }
}

Registrar verify_cmd("verify", [](CLI::App& app) -> std::function<int()> {
  auto input = std::make_shared<std::string>();
  app.description(
      "Check a container completely: header and tensor checksums, offsets, codes, levels, and "
      "the Switch config it carries (qmoe compress stores one) against its tensors (exit 0 when "
      "sound, 1 otherwise)");
  app.add_option("input", *input, "container file, index JSON or directory")->required();
  return [input] { return run_verify(*input); };
});

// ---- dictionary ---------------------------------------------------------------------------------
Registrar dictionary_cmd("dictionary", [](CLI::App& app) -> std::function<int()> {
  auto codec = std::make_shared<std::string>("qmoe-v1");
  auto out = std::make_shared<std::string>();
  auto p0 = std::make_shared<double>(0.0);
  auto max_width = std::make_shared<int>(v2::kMaxWidth);
  app.description(
      "Write a dictionary: the qmoe-v1 decode table (65536 x 2 int32), or the qmoe-v2 or qmoe-v3 "
      "dictionary the encoder builds for a zero fraction (65536 uint32 entry words); little "
      "endian");
  app.add_option("--codec", *codec, "qmoe-v1, qmoe-v2 or qmoe-v3");
  app.add_option("--p0", *p0, "qmoe-v2, qmoe-v3: the zero fraction to fit (0 < p0 < 1)");
  const CLI::Option* width_opt = app.add_option(
      "--max-width", *max_width,
      "qmoe-v2: the longest entry, in symbols (1..63); qmoe-v3 entries are always up to 63 "
      "columns");
  app.add_option("--out", *out, "output file")->required();
  return [codec, out, p0, max_width, width_opt] {
    if (*codec == "qmoe-v2" || *codec == "qmoe-v3") {
      const bool v3 = *codec == "qmoe-v3";
      if (*p0 == 0.0) throw InvalidArgument(*codec + ": --p0 is required");
      if (v3 && width_opt->count() > 0)
        throw InvalidArgument(
            "qmoe-v3: --max-width does not apply (the qmoe-v3 dictionary's entries are up to 63 "
            "columns wide; --max-width is for qmoe-v2)");
      const auto d = v3 ? v3_dictionary(*p0) : v2_dictionary(*p0, *max_width);
      static_assert(v2::kTableBytes == v3::kTableBytes);
      write_file_atomic(*out, {reinterpret_cast<const char*>(d->entries.data()),
                               static_cast<size_t>(v2::kTableBytes)});
      if (v3) {
        std::printf("wrote the qmoe-v3 dictionary for p0 %.17g (id %s, %lld bytes) to %s\n", *p0,
                    hex64(d->id).c_str(), static_cast<long long>(v3::kTableBytes), out->c_str());
      } else {
        std::printf(
            "wrote the qmoe-v2 dictionary for p0 %.17g, entries of at most %d symbols (id %s, "
            "%lld bytes) to %s\n",
            *p0, *max_width, hex64(d->id).c_str(), static_cast<long long>(v2::kTableBytes),
            out->c_str());
      }
      return 0;
    }
    if (*codec != "qmoe-v1")
      throw InvalidArgument("codec '" + *codec +
                            "' has no dictionary (qmoe-v1, qmoe-v2 or qmoe-v3)");
    write_file_atomic(*out, {reinterpret_cast<const char*>(v1_decode_table()),
                             static_cast<size_t>(v1::kTableBytes)});
    std::printf("wrote the qmoe-v1 decode table (%lld bytes) to %s\n",
                static_cast<long long>(v1::kTableBytes), out->c_str());
    return 0;
  };
});

}  // namespace
}  // namespace qmoe::cli
