#include "util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "qmoe/format/error.h"
#include "qmoe/format/file.h"

namespace qmoe::cli {

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB"};
  int u = 0;
  while (std::fabs(bytes) >= 1000.0 && u < 4) {
    bytes /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

std::optional<Codec> parse_codec_option(const std::string& name) {
  if (name == "auto") return std::nullopt;
  if (auto c = codec_from_name(name)) return c;
  throw InvalidArgument("unknown codec '" + name + "' (" + codec_names() + " or auto)");
}

std::string codec_help() {
  std::string help, converted;
  for (const CodecTraits& t : kCodecs) {
    help += std::string(t.name) + " (" + std::string(t.summary) + "), ";
    if (!t.gpu_native)
      converted += std::string(converted.empty() ? "" : " and ") + std::string(t.name);
  }
  return help +
         "or auto (default): the codec of --target, or qmoe-p5 where that is smaller (dense "
         "matrices). " +
         converted +
         " are CPU codecs: the CUDA decoder converts them to qmoe-v2 when it uploads them";
}

std::string codec_counts(std::span<const int64_t> counts) {
  std::string out;
  for (const CodecTraits& t : kCodecs) {
    out += (out.empty() ? "" : ", ") + std::to_string(counts[static_cast<size_t>(t.codec)]) + " " +
           std::string(t.name);
  }
  return out;
}

Target parse_target_option(const std::string& name) {
  if (auto t = target_from_name(name)) return *t;
  throw InvalidArgument("unknown target '" + name + "' (any, cpu or gpu)");
}

int64_t parse_bytes(const std::string& s) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    throw InvalidArgument("not a size: '" + s + "'");
  }
  std::string unit = s.substr(pos);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double mul = 1;
  if (unit.empty() || unit == "B")
    mul = 1;
  else if (unit == "K" || unit == "KB")
    mul = 1e3;
  else if (unit == "M" || unit == "MB")
    mul = 1e6;
  else if (unit == "G" || unit == "GB")
    mul = 1e9;
  else if (unit == "T" || unit == "TB")
    mul = 1e12;
  else if (unit == "KIB")
    mul = 1024.0;
  else if (unit == "MIB")
    mul = 1024.0 * 1024;
  else if (unit == "GIB")
    mul = 1024.0 * 1024 * 1024;
  else if (unit == "TIB")
    mul = 1024.0 * 1024 * 1024 * 1024;
  else
    throw InvalidArgument("unknown size unit in '" + s + "'");
  if (!(v >= 0) || v * mul > 9e18) throw InvalidArgument("size out of range: '" + s + "'");
  return static_cast<int64_t>(v * mul);
}

}  // namespace qmoe::cli
