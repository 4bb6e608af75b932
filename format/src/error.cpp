#include "qmoe/format/error.h"

namespace qmoe {

std::string error_context(const std::string& file, const std::string& tensor, const std::string& what) {
  std::string s = file;
  if (!tensor.empty()) s += (s.empty() ? "" : ": ") + std::string("tensor '") + tensor + "'";
  if (!what.empty()) s += (s.empty() ? "" : ": ") + what;
  return s;
}

}  // namespace qmoe
