// Which codecs the CUDA kernels read. Host-only header (no CUDA headers).
//
// The kernels read entry words in the qmoe-v2 layout (format/SPEC.md section 6.2): qmoe-v1 (its
// dictionary written in that layout), qmoe-v2 and, on the dense path only, qmoe-p5. A qmoe-v3
// matrix codes its rows in pairs with entry words of another layout (section 15): it is decoded
// on the CPU only, and must be transcoded to qmoe-v2 for the GPU. MatrixDev carries no codec, so
// the raw launch functions (launch.h) cannot tell; every entry point that receives a
// CompressedView (DeviceMatrix, emulated::host_matrix) calls require_gpu_codec() first.
#pragma once

#include <string>
#include <string_view>

#include "qmoe/format/error.h"
#include "qmoe/format/matrix.h"

namespace qmoe::cuda {

// Whether the CUDA kernels read matrices of codec `c` (everything but qmoe-v3).
constexpr bool gpu_supports(Codec c) {
  return c == Codec::kV1 || c == Codec::kV2 || c == Codec::kP5;
}

// Throws InvalidArgument, whose message starts with `what`, unless the CUDA kernels read `m`'s
// codec; for qmoe-v3 the message says how to convert the matrix.
inline void require_gpu_codec(const CompressedView& m, std::string_view what) {
  if (gpu_supports(m.codec)) return;
  const std::string prefix = what.empty() ? std::string() : std::string(what) + ": ";
  if (m.codec == Codec::kV3) {
    throw InvalidArgument(prefix +
                          "a qmoe-v3 matrix is decoded on the CPU only (the CUDA kernels do not "
                          "read qmoe-v3); transcode it to qmoe-v2 for the GPU (qmoe transcode "
                          "--codec qmoe-v2, or qmoe.transcode(m, codec=\"qmoe-v2\"))");
  }
  throw InvalidArgument(prefix + "codec " + std::to_string(static_cast<int>(m.codec)) +
                        " is not read by the CUDA kernels");
}

}  // namespace qmoe::cuda
