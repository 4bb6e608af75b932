// Ternarization (round to nearest) and encoding of ternary matrices into qmoe codecs.
#pragma once

#include <cstdint>
#include <optional>

#include "qmoe/format/dtype.h"
#include "qmoe/format/matrix.h"

namespace qmoe {

// Round-to-nearest ternarization, per row (QMoE's quant.py): lo = min(row, 0), hi = max(row, 0),
// both rounded to bf16; a row with lo = hi = 0 gets lo = -1, hi = +1. A weight w becomes 2 (hi)
// if w > hi/2, 1 (lo) if w < lo/2, else 0. The thresholds use the bf16-rounded levels.
// `data` is rows*cols elements of `dtype` (kF32, kF16 or kBF16), row-major with row stride
// `ld` elements (ld = cols when 0). Throws InvalidArgument for other dtypes or non-finite weights.
TernaryMatrix ternarize_rtn(const void* data, DType dtype, int64_t rows, int64_t cols,
                            int64_t ld = 0);
inline TernaryMatrix ternarize_rtn(const float* w, int64_t rows, int64_t cols) {
  return ternarize_rtn(w, DType::kF32, rows, cols);
}

struct EncodeOptions {
  // Codec to use; nullopt picks the smaller of qmoe-v1 and qmoe-p5 (ties: qmoe-v1).
  std::optional<Codec> codec;
  // OpenMP threads (0 = the OpenMP default). The output is identical for any value.
  int threads = 0;
};

// Encodes a ternary matrix. qmoe-v1 uses greedy longest match through a trie of the dictionary,
// each row separately (bit-compatible with QMoE's encoder). Throws InvalidArgument if a symbol is
// not 0, 1 or 2, or if a v1 matrix would need more than 2^31-1 codes.
CompressedMatrix encode(const TernaryMatrix& t, const EncodeOptions& opt = {});

// Number of v1 codes each row needs, without storing them (for choosing a codec cheaply).
int64_t v1_code_count(const TernaryMatrix& t, int threads = 0);

}  // namespace qmoe
