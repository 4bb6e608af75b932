// qmoe-v1's reference decoding and validation (format/SPEC.md 4.1.3, 4.1.5).
#include <algorithm>

#include "codecs/ops.h"
#include "qmoe/format/codecs/v1.h"
#include "qmoe/format/reference.h"

namespace qmoe::internal {
namespace {

struct V1 {
  // One pair of symbols per code at worst, the row offsets and the levels.
  static int64_t max_bytes(int64_t rows, int64_t cols) {
    return rows * 2 * ((cols + 1) / 2) + 4 * (rows + 1) + 4 * rows;
  }
  static constexpr auto check_sizes = check_code_sizes;
  static constexpr auto slice = slice_codes;

  template <class Emit>
  static void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
    const int32_t* table = v1_decode_table();
    const int64_t pairs_needed = v1::row_pairs(m.cols);
    int64_t pair = 0;
    for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
      const uint16_t code = m.codes[i];
      const uint32_t w[2] = {static_cast<uint32_t>(table[2 * code]),
                             static_cast<uint32_t>(table[2 * code + 1])};
      const int n = v1::entry_pairs(w[0]);
      if (pair + n > pairs_needed) {
        row_too_long(what, r, m.cols);
      }
      for (int k = 0; k < n; ++k) {
        const uint32_t word = w[k / v1::kPairsPerWord];
        const int j = k % v1::kPairsPerWord;
        const int64_t col = 2 * (pair + k);
        emit(col, v1::pair_s0(word, j));
        const int s1 = v1::pair_s1(word, j);
        if (col + 1 < m.cols) {
          emit(col + 1, s1);
        } else if (s1 != 0) {
          row_nonzero_past_end(what, r);
        }
      }
      pair += n;
    }
    if (pair != pairs_needed) {
      row_too_short(what, r, std::min<int64_t>(2 * pair, m.cols), m.cols);
    }
  }

  // decode_row()'s checks a codeword at a time: the entries' pairs cover the row's pairs exactly;
  // an odd width's half pair has s1 = 0.
  static void check_row(const CompressedView& m, int64_t r, std::string_view what) {
    const int32_t* table = v1_decode_table();
    const int64_t pairs_needed = v1::row_pairs(m.cols);
    int64_t pair = 0;
    for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
      const uint16_t code = m.codes[i];
      const int n = v1::entry_pairs(static_cast<uint32_t>(table[2 * code]));
      if (pair + n > pairs_needed) {
        row_too_long(what, r, m.cols);
      }
      if ((m.cols & 1) != 0 && pair + n == pairs_needed) {
        const int k = n - 1;  // the entry's last pair is the row's half pair
        const auto word = static_cast<uint32_t>(table[2 * code + k / v1::kPairsPerWord]);
        if (v1::pair_s1(word, k % v1::kPairsPerWord) != 0) {
          row_nonzero_past_end(what, r);
        }
      }
      pair += n;
    }
    if (pair != pairs_needed) {
      row_too_short(what, r, std::min<int64_t>(2 * pair, m.cols), m.cols);
    }
  }
};

}  // namespace

extern constinit const CodecOps kV1Ops = ops_of<V1>();

}  // namespace qmoe::internal
