// Which codecs the CUDA kernels read. Host-only header (no CUDA headers).
//
// The kernels read entry words in the qmoe-v2 layout (format/SPEC.md section 4.3.2): qmoe-v1 (its
// dictionary written in that layout), qmoe-v2 and, on the dense path only, qmoe-p5. The CPU's
// codecs, qmoe-v3 (rows coded in pairs, entry words of another layout, section 4.4) and qmoe-g4
// (gap tokens, section 4.5), are not read by the kernels: DeviceMatrix converts them to qmoe-v2 on
// the host when it uploads them (a container written for the CPU runs on the GPU as it is); the
// raw paths, which hand out pointers into the caller's matrix (launch.h, emulated::host_matrix),
// refuse them with require_gpu_codec().
#pragma once

#include <string>
#include <string_view>

#include "qmoe/format/error.h"
#include "qmoe/format/matrix.h"

namespace qmoe::cuda {

// Whether the CUDA kernels read matrices of codec `c` as they are (CodecTraits::gpu_native:
// qmoe-v1, qmoe-v2, qmoe-p5).
constexpr bool gpu_supports(Codec c) {
  return codec_traits(c).gpu_native;
}

// Throws InvalidArgument, whose message starts with `what`, unless the CUDA kernels read `m`'s
// codec as it is; the message says how to convert the matrix.
inline void require_gpu_codec(const CompressedView& m, std::string_view what) {
  if (gpu_supports(m.codec)) return;
  const std::string prefix = what.empty() ? std::string() : std::string(what) + ": ";
  const std::string name(codec_name(m.codec));
  throw InvalidArgument(prefix + "the CUDA kernels do not read " + name +
                        " (a CPU codec); DeviceMatrix converts it to qmoe-v2 on upload, or "
                        "transcode it first (qmoe transcode --codec qmoe-v2 or --target gpu, "
                        "or qmoe.transcode(m, codec=\"qmoe-v2\"))");
}

}  // namespace qmoe::cuda
