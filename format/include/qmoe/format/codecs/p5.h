// qmoe-p5, plain base-3 packing, the fallback for dense rows (format/SPEC.md section 4.2): its bit
// layout, shared by host and device code. codec_layout.h includes every codec's layout; no std
// containers here, the CUDA kernels include it.
//
// Five symbols per byte: byte = s0 + 3*s1 + 9*s2 + 27*s3 + 81*s4 (<= 242), symbol i of the byte
// is column 5*b + i of the row. Rows are ceil(cols/5) bytes; padding symbols are 0.
// Bits per weight: 8/5 = 1.6, independent of the data.
#pragma once

#include <cstdint>

#include "qmoe/core/bf16.h"

namespace qmoe::p5 {

inline constexpr int kSymbolsPerByte = 5;
inline constexpr int kMaxByte = 242;
QMOE_HD int64_t row_bytes(int64_t cols) {
  return (cols + 4) / 5;
}

}  // namespace qmoe::p5
