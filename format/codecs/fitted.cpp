#include "codecs/fitted.h"

namespace qmoe::internal {

void lone_row_nonzero(std::string_view what, int64_t r) {
  fail(what, "row " + std::to_string(r) +
                 " is the last of an odd height; its pair's second row must be zero");
}

void bad_entry(std::string_view what, int64_t r, std::string_view codec, uint16_t code,
               const std::string& why) {
  fail(what, "row " + std::to_string(r) + ": " + std::string(codec) + " dictionary entry " +
                 std::to_string(code) + why);
}

}  // namespace qmoe::internal
