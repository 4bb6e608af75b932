// qmoe-v2's reference decoding and validation (format/SPEC.md 4.3.2, 4.3.3, 4.3.5).
#include <string_view>

#include "codecs/fitted.h"
#include "codecs/ops.h"
#include "qmoe/format/codecs/v2.h"

namespace qmoe::internal {
namespace {

// A qmoe-v2 entry as decode_fitted(), check_fitted() and validate_entries() see it.
struct V2Layout {
  static constexpr std::string_view kName = "qmoe-v2";
  static constexpr int kSlots = v2::kSlots;
  static constexpr bool kPairs = false;
  static int width(uint32_t e) { return v2::entry_width(e); }
  static bool used(uint32_t e, int j) { return v2::slot_symbol(e, j) != 0; }
  static int col(uint32_t e, int j) { return v2::slot_col(e, j); }
  static int symbol(uint32_t e, int j, int /*half*/) { return v2::slot_symbol(e, j); }
  // The raw column field of slot j (0 when the slot is unused), a slot both low and high, and the
  // reserved bits.
  static uint32_t col_field(uint32_t e, int j) { return static_cast<uint32_t>(v2::slot_col(e, j)); }
  static bool both_kinds(uint32_t e, int j) { return v2::slot_symbol(e, j) == 3; }
  static constexpr std::string_view kBothKinds = " is both low and high";
  static bool reserved(uint32_t e) { return ((e >> 24) & 3u) != 0; }
  static constexpr std::string_view kReserved = "reserved bits 24..25 are set";
};

struct V2 {
  // One symbol per code at worst, the row offsets and the levels.
  static int64_t max_bytes(int64_t rows, int64_t cols) {
    return rows * 2 * cols + 4 * (rows + 1) + 4 * rows;
  }
  static constexpr auto check_sizes = check_code_sizes;
  static constexpr auto slice = slice_codes;
  template <class Emit>
  static void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
    decode_fitted<V2Layout>(m, r, 0, false, what, emit);
  }
  static void check_row(const CompressedView& m, int64_t r, std::string_view what) {
    check_fitted<V2Layout>(m, r, false, what);
  }
  static constexpr auto check_dictionary = validate_entries<V2Layout>;
};

}  // namespace

extern constinit const CodecOps kV2Ops = ops_of<V2>();

}  // namespace qmoe::internal
