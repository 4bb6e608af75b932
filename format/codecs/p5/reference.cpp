// qmoe-p5's reference decoding and validation (format/SPEC.md 4.2.3, 4.2.5).
#include <algorithm>
#include <string>
#include <vector>

#include "codecs/ops.h"
#include "qmoe/format/codecs/p5.h"

namespace qmoe::internal {
namespace {

[[noreturn]] void byte_too_large(std::string_view what, int64_t r, int v) {
  fail(what, "row " + std::to_string(r) + " has packed byte " + std::to_string(v) + " > 242");
}

[[noreturn]] void padding_nonzero(std::string_view what, int64_t r) {
  fail(what, "row " + std::to_string(r) + " has a non-zero padding symbol");
}

struct P5 {
  // The packed bytes and the levels, whatever the symbols.
  static int64_t max_bytes(int64_t rows, int64_t cols) {
    return rows * p5::row_bytes(cols) + 4 * rows;
  }
  static void check_sizes(const CompressedView& m, std::string_view what) {
    const uint64_t want =
        static_cast<uint64_t>(m.rows) * static_cast<uint64_t>(p5::row_bytes(m.cols));
    if (m.packed.size() != want) {
      fail(what, "packed data holds " + std::to_string(m.packed.size()) + " bytes, expected " +
                     std::to_string(want));
    }
  }

  static void slice(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>&,
                    CompressedView& v) {
    const int64_t rb = p5::row_bytes(m.cols);
    v.packed = m.packed.subspan(static_cast<size_t>(r0 * rb), static_cast<size_t>((r1 - r0) * rb));
  }

  template <class Emit>
  static void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
    const int64_t nb = p5::row_bytes(m.cols), full = m.cols / p5::kSymbolsPerByte;
    const uint8_t* row = m.packed.data() + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      int v = row[b];
      if (v > p5::kMaxByte) byte_too_large(what, r, v);
      if (b < full) {  // no padding
        for (int i = 0; i < p5::kSymbolsPerByte; ++i, v /= 3) emit(5 * b + i, v % 3);
        continue;
      }
      for (int i = 0; i < p5::kSymbolsPerByte; ++i, v /= 3) {
        const int64_t col = 5 * b + i;
        if (col < m.cols) {
          emit(col, v % 3);
        } else if (v % 3 != 0) {
          padding_nonzero(what, r);
        }
      }
    }
  }

  // decode_row()'s checks without decoding, in its order: the bytes, then the padding symbols,
  // which only the last byte has.
  static void check_row(const CompressedView& m, int64_t r, std::string_view what) {
    const int64_t nb = p5::row_bytes(m.cols);
    const uint8_t* row = m.packed.data() + r * nb;
    uint8_t largest = 0;
    for (int64_t b = 0; b < nb; ++b) largest = std::max(largest, row[b]);
    if (largest > p5::kMaxByte) {
      for (int64_t b = 0; b < nb; ++b) {
        if (row[b] > p5::kMaxByte) byte_too_large(what, r, row[b]);
      }
    }
    const int64_t kept = m.cols % p5::kSymbolsPerByte;  // columns of the last byte in the row
    if (kept != 0) {
      int padding = row[nb - 1];
      for (int64_t i = 0; i < kept; ++i) padding /= 3;
      if (padding != 0) padding_nonzero(what, r);
    }
  }
};

}  // namespace

extern constinit const CodecOps kP5Ops = ops_of<P5>();

}  // namespace qmoe::internal
