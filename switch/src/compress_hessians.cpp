// Hessians for `qmoe compress --hessians FILE`: accumulator files of gptq/hessian.h, read lazily.
#include "qmoe/format/error.h"
#include "qmoe/switch/compress.h"

namespace qmoe::sw {

std::unique_ptr<HessianProvider> open_hessian_file(const std::filesystem::path& path) {
  throw Error(path.string() + ": Hessian files are not available in this build (GPTQ reader not built)");
}

}  // namespace qmoe::sw
