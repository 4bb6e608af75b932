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
inline constexpr const char* kCodecChoices = "qmoe-v1, qmoe-v2, qmoe-v3, qmoe-g4, qmoe-p5 or auto";
// Help of --codec and --target (encode, transcode, compress).
inline constexpr const char* kCodecHelp =
    "qmoe-v1 (QMoE's dictionary), qmoe-v2 (a dictionary fitted to the matrix: smaller), qmoe-v3 "
    "(qmoe-v2 with rows coded in pairs), qmoe-g4 (gap tokens over groups of 4 rows: the smallest "
    "at QMoE's sparsity, and the fastest on CPUs with AVX-512 VBMI/VNNI), qmoe-p5, or auto "
    "(default): the codec of --target, or qmoe-p5 where that is smaller (dense matrices). qmoe-v3 "
    "and qmoe-g4 are CPU codecs: the CUDA decoder converts them to qmoe-v2 when it uploads them";
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
