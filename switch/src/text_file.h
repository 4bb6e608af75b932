// Small file helpers shared by the switch/ sources (not installed).
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "qmoe/format/error.h"

namespace qmoe::sw::internal {

// The whole file as bytes; FormatError naming the file when it cannot be opened.
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FormatError(error_context(p.string(), "", "cannot open file"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace qmoe::sw::internal
