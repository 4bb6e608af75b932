// Small helpers shared by the subcommands.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qmoe/format/matrix.h"

namespace qmoe::cli {

// "1.23 MB"-style size (powers of 1000).
std::string human_bytes(double bytes);
// Parses "123", "64M", "1.5G", "2GiB" into bytes; throws InvalidArgument.
int64_t parse_bytes(const std::string& s);
// The value of a --codec option: a codec name, or "auto" (nullopt: the encoder's automatic
// choice). Throws InvalidArgument naming the codecs for anything else.
std::optional<Codec> parse_codec_option(const std::string& name);
// Help of --codec (encode, transcode, compress), from the codec table (qmoe/format/codec.h).
std::string codec_help();
// "3 qmoe-v1, 0 qmoe-v2, ...": a count per codec, in the table's order.
std::string codec_counts(std::span<const int64_t> counts);
inline constexpr const char* kTargetHelp =
    "where the output will run, for --codec auto: any (default: qmoe-v1, QMoE-compatible and read "
    "natively by the CPU and GPU decoders), cpu (qmoe-g4) or gpu (qmoe-v2); cpu and gpu are "
    "recorded in the file (\"qmoe.target\")";
// The value of a --target option (InvalidArgument naming the choices for anything else).
Target parse_target_option(const std::string& name);

class Stopwatch {
 public:
  Stopwatch() : t0_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace qmoe::cli
