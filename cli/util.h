// Small helpers shared by the subcommands.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
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
// The codecs --codec accepts, for help texts and messages.
inline constexpr const char* kCodecChoices = "qmoe-v1, qmoe-v2, qmoe-v3, qmoe-p5 or auto";
// Peak resident set size of this process in bytes (from /proc/self/status VmHWM).
int64_t peak_rss_bytes();
// Writes `data` to `path` atomically (temporary file in the same folder, then rename).
void write_file_atomic(const std::filesystem::path& path, const void* data, size_t size);

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
