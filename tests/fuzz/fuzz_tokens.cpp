// libFuzzer target: token files (format/TOKENS.md) as `qmoe eval` and calibration read
// them, then run through a small Switch model. TokenPairs::load must either succeed or throw
// qmoe::Error; pairs it accepts must run through the forward pass and the loss of a model with
// that vocabulary without a crash, and give a finite loss (the model's weights are finite) when
// any target is scored.
//
// Input: byte 0 bit 0 = 1: the rest is the file, byte for byte. Else the input describes the
// file, which the target writes (so most inputs are well-formed safetensors files and reach the
// token checks):
//   byte 0: bit 1 encoder_ids stored as I64, bit 2 offsets stored as I32, bit 3 metadata version
//           "2", bit 4 decoder_offsets stored 2-D, bit 5 one of the four tensors left out (byte 1
//           picks it), bit 6 one offset replaced by a raw int64 from the input, bit 7 an extra
//           tensor (ignored by readers);
//   byte 1: bits 0-1 the tensor left out, bit 2 load without the vocabulary bound, bits 3-4 the
//           offset replaced (encoder or decoder, first or last);
//   then up to 16 pairs: a byte of encoder length (0..31), a byte of target length (0..31), and
//   one byte per id: 255 is -100, anything else b % (vocab + 4) - 2 (ids just outside the
//   vocabulary included); with bit 6, the 8 bytes of the raw offset come first.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "fuzz_files.h"
#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/forward.h"
#include "qmoe/switch/generate.h"
#include "qmoe/switch/model.h"
#include "qmoe/switch/tokens.h"

namespace {

constexpr int64_t kVocab = 48;

// A small model, generated once per process.
const qmoe::sw::SwitchModel& model() {
  static const qmoe::sw::SwitchModel m = [] {
    qmoe::sw::GenerateOptions o;
    o.vocab_size = kVocab;
    o.d_model = 8;
    o.d_ff = 16;
    o.d_kv = 4;
    o.num_heads = 2;
    o.num_layers = o.num_decoder_layers = 2;
    o.num_experts = 4;
    o.threads = 1;
    const auto dir = qmoe::fuzz::scratch_dir() / "model";
    std::filesystem::create_directories(dir);
    qmoe::sw::generate_checkpoint(dir, o);
    return qmoe::sw::SwitchModel::load(dir);
  }();
  return m;
}

template <class T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

void write_structured(const std::filesystem::path& path, const uint8_t* data, size_t size) {
  const uint8_t f0 = data[0], f1 = size > 1 ? data[1] : 0;
  size_t p = 2;
  int64_t raw_offset = 0;
  if ((f0 & 64) != 0 && p + 8 <= size) {
    std::memcpy(&raw_offset, data + p, 8);
    p += 8;
  }
  std::vector<int32_t> enc, dec;
  std::vector<int64_t> enc_off{0}, dec_off{0};
  auto id = [&](uint8_t b) {
    return b == 255 ? int32_t{-100} : static_cast<int32_t>(b % (kVocab + 4)) - 2;
  };
  for (int pair = 0; pair < 16 && p + 2 <= size; ++pair) {
    const size_t ne = data[p] & 31, nd = data[p + 1] & 31;
    p += 2;
    for (size_t i = 0; i < ne && p < size; ++i) enc.push_back(id(data[p++]));
    for (size_t i = 0; i < nd && p < size; ++i) dec.push_back(id(data[p++]));
    enc_off.push_back(static_cast<int64_t>(enc.size()));
    dec_off.push_back(static_cast<int64_t>(dec.size()));
  }
  if ((f0 & 64) != 0) {
    auto& off = (f1 & 8) != 0 ? dec_off : enc_off;
    ((f1 & 16) != 0 ? off.back() : off.front()) = raw_offset;
  }
  qmoe::SafetensorsWriter w(path);
  w.set_metadata("format", "qmoe-tokens");
  w.set_metadata("version", (f0 & 8) != 0 ? "2" : "1");
  const int skip = (f0 & 32) != 0 ? (f1 & 3) : -1;
  auto ids = [&](const char* name, const std::vector<int32_t>& v, bool wide) {
    if (wide) {
      const std::vector<int64_t> w64(v.begin(), v.end());
      w.add(name, qmoe::DType::kI64, {static_cast<int64_t>(v.size())}, bytes_of(w64));
    } else {
      w.add(name, qmoe::DType::kI32, {static_cast<int64_t>(v.size())}, bytes_of(v));
    }
  };
  auto offsets = [&](const char* name, const std::vector<int64_t>& v, bool two_d) {
    const std::vector<int64_t> shape = two_d
                                           ? std::vector<int64_t>{1, static_cast<int64_t>(v.size())}
                                           : std::vector<int64_t>{static_cast<int64_t>(v.size())};
    if ((f0 & 4) != 0) {
      const std::vector<int32_t> v32(v.begin(), v.end());
      w.add(name, qmoe::DType::kI32, shape, bytes_of(v32));
    } else {
      w.add(name, qmoe::DType::kI64, shape, bytes_of(v));
    }
  };
  if (skip != 0) ids("encoder_ids", enc, (f0 & 2) != 0);
  if (skip != 1) offsets("encoder_offsets", enc_off, false);
  if (skip != 2) ids("decoder_targets", dec, false);
  if (skip != 3) offsets("decoder_offsets", dec_off, (f0 & 16) != 0);
  if ((f0 & 128) != 0)
    w.add("notes", qmoe::DType::kU8, {3}, bytes_of(std::vector<uint8_t>{1, 2, 3}));
  w.finish();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const qmoe::sw::SwitchModel& m = model();
  const auto path = qmoe::fuzz::scratch_dir() / "tokens.safetensors";
  if ((data[0] & 1) != 0) {
    qmoe::fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  } else {
    write_structured(path, data, size);
  }
  const bool bounded = size < 2 || (data[1] & 4) == 0;
  std::optional<qmoe::sw::TokenPairs> pairs;
  try {
    pairs = qmoe::sw::TokenPairs::load(path, bounded ? kVocab : 0);
  } catch (const qmoe::Error&) {
    return 0;
  }
  unsigned sum = 0;
  for (int64_t i = 0; i < pairs->num_pairs(); ++i) {
    for (int32_t t : pairs->encoder(i)) sum += static_cast<unsigned>(t);
    for (int32_t t : pairs->decoder(i)) sum += static_cast<unsigned>(t);
  }
  if (!bounded) {
    // Without the bound the ids are unchecked: the model must not see them.
    try {
      pairs->validate(kVocab, path.string());
    } catch (const qmoe::FormatError&) {
      return 0;
    }
  }
  if (pairs->num_pairs() > 0) {
    (void)pairs->slice(0, pairs->num_pairs() / 2 + 1);
    for (const int64_t capacity : {0, 2}) {
      qmoe::sw::ForwardOptions fo;
      fo.expert_capacity = capacity;
      const qmoe::sw::LossResult r = qmoe::sw::cross_entropy(m, *pairs, fo);
      if (r.targets > 0 && !std::isfinite(r.mean())) __builtin_trap();
      sum += static_cast<unsigned>(r.targets);
    }
  }
  if (sum == 0xdeadbeefu) __builtin_trap();  // keeps the reads from being optimised away
  return 0;
}
