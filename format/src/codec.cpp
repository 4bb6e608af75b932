#include "qmoe/format/codec.h"

namespace qmoe {

std::optional<Codec> codec_from_name(std::string_view s) {
  for (const CodecTraits& t : kCodecs) {
    if (t.name == s) return t.codec;
  }
  return std::nullopt;
}

std::string codec_names(std::string_view sep) {
  std::string out;
  for (const CodecTraits& t : kCodecs) {
    if (!out.empty()) out += sep;
    out += t.name;
  }
  return out;
}

std::string_view target_name(Target t) {
  switch (t) {
    case Target::kAny:
      return "any";
    case Target::kCpu:
      return "cpu";
    case Target::kGpu:
      return "gpu";
  }
  return "unknown";
}

std::optional<Target> target_from_name(std::string_view s) {
  for (Target t : {Target::kAny, Target::kCpu, Target::kGpu}) {
    if (target_name(t) == s) return t;
  }
  return std::nullopt;
}

Codec auto_codec(Target target) {
  for (const CodecTraits& t : kCodecs) {
    if (t.auto_for == target) return t.codec;
  }
  return Codec::kV1;
}

}  // namespace qmoe
