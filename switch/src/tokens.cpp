#include "qmoe/switch/tokens.h"

#include <cstring>

#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"

namespace qmoe::sw {

std::span<const int32_t> TokenPairs::encoder(int64_t i) const {
  const auto b = encoder_offsets[static_cast<size_t>(i)],
             e = encoder_offsets[static_cast<size_t>(i) + 1];
  return std::span<const int32_t>(encoder_ids)
      .subspan(static_cast<size_t>(b), static_cast<size_t>(e - b));
}

std::span<const int32_t> TokenPairs::decoder(int64_t i) const {
  const auto b = decoder_offsets[static_cast<size_t>(i)],
             e = decoder_offsets[static_cast<size_t>(i) + 1];
  return std::span<const int32_t>(decoder_targets)
      .subspan(static_cast<size_t>(b), static_cast<size_t>(e - b));
}

void TokenPairs::add(std::span<const int32_t> enc, std::span<const int32_t> dec) {
  if (encoder_offsets.empty()) encoder_offsets.push_back(0);
  if (decoder_offsets.empty()) decoder_offsets.push_back(0);
  encoder_ids.insert(encoder_ids.end(), enc.begin(), enc.end());
  decoder_targets.insert(decoder_targets.end(), dec.begin(), dec.end());
  encoder_offsets.push_back(static_cast<int64_t>(encoder_ids.size()));
  decoder_offsets.push_back(static_cast<int64_t>(decoder_targets.size()));
}

TokenPairs TokenPairs::slice(int64_t begin, int64_t end) const {
  if (begin < 0 || end < begin || end > num_pairs())
    throw InvalidArgument("TokenPairs::slice: [" + std::to_string(begin) + ", " +
                          std::to_string(end) + ") outside [0, " + std::to_string(num_pairs()) +
                          ")");
  TokenPairs r;
  for (int64_t i = begin; i < end; ++i) r.add(encoder(i), decoder(i));
  if (r.encoder_offsets.empty()) r.encoder_offsets = r.decoder_offsets = {0};
  return r;
}

void TokenPairs::validate(int64_t vocab_size, const std::string& what) const {
  if (encoder_offsets.empty() && decoder_offsets.empty() && encoder_ids.empty() &&
      decoder_targets.empty())
    return;  // default-constructed: no pairs
  auto check_offsets = [&](const std::vector<int64_t>& off, size_t n, const char* name) {
    if (off.empty() || off.front() != 0)
      throw FormatError(error_context(what, name, "offsets must start at 0"));
    for (size_t i = 1; i < off.size(); ++i)
      if (off[i] < off[i - 1])
        throw FormatError(error_context(what, name, "offsets decrease at " + std::to_string(i)));
    if (static_cast<size_t>(off.back()) != n)
      throw FormatError(error_context(
          what, name,
          "last offset " + std::to_string(off.back()) + " but " + std::to_string(n) + " ids"));
  };
  check_offsets(encoder_offsets, encoder_ids.size(), "encoder_offsets");
  check_offsets(decoder_offsets, decoder_targets.size(), "decoder_offsets");
  if (encoder_offsets.size() != decoder_offsets.size())
    throw FormatError(
        error_context(what, "decoder_offsets", "pair count differs from encoder_offsets"));
  for (int64_t i = 0; i < num_pairs(); ++i)
    if (encoder(i).empty())
      throw FormatError(error_context(what, "encoder_offsets",
                                      "pair " + std::to_string(i) + " has no encoder tokens"));
  if (vocab_size > 0) {
    for (size_t i = 0; i < encoder_ids.size(); ++i)
      if (encoder_ids[i] < 0 || encoder_ids[i] >= vocab_size)
        throw FormatError(error_context(what, "encoder_ids",
                                        "id " + std::to_string(encoder_ids[i]) + " at " +
                                            std::to_string(i) + " outside [0, " +
                                            std::to_string(vocab_size) + ")"));
    for (size_t i = 0; i < decoder_targets.size(); ++i)
      if (decoder_targets[i] != -100 &&
          (decoder_targets[i] < 0 || decoder_targets[i] >= vocab_size))
        throw FormatError(error_context(what, "decoder_targets",
                                        "id " + std::to_string(decoder_targets[i]) + " at " +
                                            std::to_string(i) + " outside [0, " +
                                            std::to_string(vocab_size) + ") and not -100"));
  }
}

TokenPairs TokenPairs::load(const std::filesystem::path& path, int64_t vocab_size) {
  const auto f = SafetensorsFile::open(path);
  const std::string file = path.string();
  auto fmt = f.metadata().find("format");
  if (fmt == f.metadata().end() || fmt->second != "qmoe-tokens")
    throw FormatError(
        error_context(file, "", "not a qmoe token file (metadata format != \"qmoe-tokens\")"));
  auto ver = f.metadata().find("version");
  if (ver == f.metadata().end() || ver->second != "1")
    throw FormatError(error_context(file, "", "unsupported token file version (expected \"1\")"));
  auto get = [&](const char* name, DType dt) -> const TensorInfo& {
    const TensorInfo* t = f.find(name);
    if (!t) throw FormatError(error_context(file, name, "missing tensor"));
    if (t->shape.size() != 1)
      throw FormatError(error_context(file, name, "must be one-dimensional"));
    if (t->dtype != dt)
      throw FormatError(error_context(file, name,
                                      "dtype " + std::string(dtype_name(t->dtype)) + ", expected " +
                                          std::string(dtype_name(dt))));
    return *t;
  };
  TokenPairs p;
  auto copy32 = [&](const char* n, std::vector<int32_t>& out) {
    auto s = f.as<int32_t>(get(n, DType::kI32), DType::kI32);
    out.assign(s.begin(), s.end());
  };
  auto copy64 = [&](const char* n, std::vector<int64_t>& out) {
    auto s = f.as<int64_t>(get(n, DType::kI64), DType::kI64);
    out.assign(s.begin(), s.end());
  };
  copy32("encoder_ids", p.encoder_ids);
  copy64("encoder_offsets", p.encoder_offsets);
  copy32("decoder_targets", p.decoder_targets);
  copy64("decoder_offsets", p.decoder_offsets);
  p.validate(vocab_size, file);
  return p;
}

void TokenPairs::save(const std::filesystem::path& path) const {
  validate(0, path.string());
  SafetensorsWriter w(path);
  w.set_metadata("format", "qmoe-tokens");
  w.set_metadata("version", "1");
  auto add = [&](const char* name, DType dt, const void* data, size_t n) {
    w.add(name, dt, {static_cast<int64_t>(n)},
          std::span<const std::byte>(static_cast<const std::byte*>(data),
                                     n * static_cast<size_t>(dtype_size(dt))));
  };
  add("encoder_ids", DType::kI32, encoder_ids.data(), encoder_ids.size());
  add("encoder_offsets", DType::kI64, encoder_offsets.data(), encoder_offsets.size());
  add("decoder_targets", DType::kI32, decoder_targets.data(), decoder_targets.size());
  add("decoder_offsets", DType::kI64, decoder_offsets.data(), decoder_offsets.size());
  w.finish();
}

}  // namespace qmoe::sw
