// qmoe-v3's reference decoding and validation (format/SPEC.md 4.4.2, 4.4.3, 4.4.5).
#include <string>
#include <string_view>
#include <vector>

#include "codecs/fitted.h"
#include "codecs/ops.h"
#include "qmoe/format/codecs/v3.h"

namespace qmoe::internal {
namespace {

// A qmoe-v3 entry as decode_fitted(), check_fitted() and validate_entries() see it.
struct V3Layout {
  static constexpr std::string_view kName = "qmoe-v3";
  static constexpr int kSlots = v3::kSlots;
  static constexpr bool kPairs = true;
  static int width(uint32_t e) { return v3::entry_width(e); }
  // Any of slot j's four kind bits (8 + j, 11 + j, 14 + j, 17 + j).
  static bool used(uint32_t e, int j) { return ((e >> (v3::kSymShift + j)) & 0x249u) != 0; }
  static int col(uint32_t e, int j) { return v3::slot_col(e, j); }
  static int symbol(uint32_t e, int j, int half) { return v3::slot_symbol(e, j, half); }
  static uint32_t col_field(uint32_t e, int j) {
    return j == 0 ? (e >> v3::kFirstShift) & 31u : (e >> (4 * (j - 1))) & 15u;
  }
  static bool both_kinds(uint32_t e, int j) {
    const uint32_t bits = v3::slot_bits(e, j);
    return (bits & 3u) == 3u || (bits & 12u) == 12u;
  }
  static constexpr std::string_view kBothKinds = " is both low and high in one row";
  static bool reserved(uint32_t e) { return ((e >> 25) & 1u) != 0; }
  static constexpr std::string_view kReserved = "reserved bit 25 is set";
};

struct V3 {
  // One column of a row pair per code at worst: no more than qmoe-v2's one symbol per code.
  static int64_t max_bytes(int64_t rows, int64_t cols) {
    return rows * 2 * cols + 4 * (rows + 1) + 4 * rows;
  }
  static void check_sizes(const CompressedView& m, std::string_view what) {
    check_code_sizes(m, what);
    for (int64_t r = 1; r < m.rows; r += 2) {
      if (m.row_offsets[r] != m.row_offsets[r + 1]) {
        fail(what, "row " + std::to_string(r) +
                       " has codes; a qmoe-v3 pair's codes are its even row's range");
      }
    }
  }
  template <class Emit>
  static void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
    // Row r is one half of pair r / 2; the pair's stream is checked whole either way, so both of
    // its rows report the same errors.
    const int64_t pr = r - (r & 1);
    decode_fitted<V3Layout>(m, pr, static_cast<int>(r & 1), pr + 1 == m.rows, what, emit);
  }
  // A pair's stream is checked once, at its even row.
  static void check_row(const CompressedView& m, int64_t r, std::string_view what) {
    if ((r & 1) == 0) check_fitted<V3Layout>(m, r, r + 1 == m.rows, what);
  }
  static constexpr auto check_dictionary = validate_entries<V3Layout>;
  static void slice(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>& offsets,
                    CompressedView& v) {
    check_slice_units(m, r0, r1, "pairs", "pair");
    slice_codes(m, r0, r1, offsets, v);
  }
};

}  // namespace

extern constinit const CodecOps kV3Ops = ops_of<V3>();

}  // namespace qmoe::internal
