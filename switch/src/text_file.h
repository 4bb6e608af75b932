// Small file helpers shared by the switch/ sources (not installed).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "qmoe/format/file.h"

namespace qmoe::sw::internal {

// Bound on the JSON files of a checkpoint (config.json, model.safetensors.index.json): an index
// of a trillion-weight model is a few MiB; this keeps a hostile file from exhausting memory.
inline constexpr int64_t kMaxJsonFileBytes = int64_t{256} << 20;

// The whole file as bytes; FormatError naming the file when it is not a regular file (a named
// pipe would block), cannot be read, or is larger than kMaxJsonFileBytes.
inline std::string read_text(const std::filesystem::path& p) {
  return read_regular_file(p, kMaxJsonFileBytes);
}

}  // namespace qmoe::sw::internal
