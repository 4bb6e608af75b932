#include "qmoe/core/error.h"

namespace qmoe {

std::string error_context(const std::string& file, const std::string& tensor,
                          const std::string& what) {
  std::string out = file;
  if (!tensor.empty()) {
    if (!out.empty()) out += ": ";
    out += "tensor '" + tensor + "'";
  }
  if (!what.empty()) {
    if (!out.empty()) out += ": ";
    out += what;
  }
  return out;
}

}  // namespace qmoe
