// qmoe-v3, a fitted dictionary over the columns of two rows (format/SPEC.md section 4.4): its bit
// layout, shared by host and device code. codec_layout.h includes every codec's layout; no std
// containers here, the CUDA kernels include it.
//
// Rows are coded in pairs (2p, 2p + 1): the stream of a pair is the sequence of its *columns*, a
// column being the two symbols (row 2p, row 2p + 1), and each uint16 codeword stands for an entry
// of a 65536-entry dictionary stored with the matrix (format/SPEC.md section 4.4): a run of 1..63
// columns whose non-zero columns (at most 3) lie within 16 consecutive columns. A matrix of odd
// height pairs its last row with a row of zeros. The pair's codes are the even row's range of
// row_offsets; an odd row's range is empty. ~0.69 bits per weight at P(0) = 0.885, 1.02 at 0.80.
// A single-token CPU kernel reads one 16-column window of the input per codeword (qmoe-v2 needs
// two).
//
// Entry word (uint32), the non-zero columns as up to three slots in column order:
//   bits 0..3                : column of slot 1 minus column of slot 0 (0 when unused)
//   bits 4..7                : column of slot 2 minus column of slot 0 (0 when unused)
//   bit 8 + 6r + j           : slot j (j = 0..2) holds a low symbol (1) in row r (r = 0, 1)
//   bit 11 + 6r + j          : slot j holds a high symbol (2) in row r
//                              (a slot with none of its 4 bits set is unused)
//   bits 20..24              : column of slot 0 within the entry (0 when unused)
//   bit 25                   : 0
//   bits 26..31              : width, the number of columns the entry covers (1..63)
// Used slots come first, with strictly increasing columns below the width; a used slot has a
// non-zero symbol in at least one row and at most one of low/high per row. Each row's 6 kind bits
// are laid out as a qmoe-v2 entry's (low bits of slots 0..2, then their high bits), so a kernel can
// index one mask table with either row's bits.
#pragma once

#include <cstdint>

#include "qmoe/core/bf16.h"

namespace qmoe::v3 {

inline constexpr int kEntries = 65536;
inline constexpr int kMaxWidth = 63;
inline constexpr int kSlots = 3;
inline constexpr int kSpan = 16;     // slot 2's column - slot 0's column < kSpan (4-bit field)
inline constexpr int kSymShift = 8;  // row r's kind bits: kSymShift + 6r .. + 5
inline constexpr int kFirstShift = 20;
inline constexpr int kWidthShift = 26;
inline constexpr int64_t kTableBytes = int64_t{kEntries} * 4;

QMOE_HD int entry_width(uint32_t e) {
  return static_cast<int>(e >> kWidthShift);
}
// The 4 kind bits of slot j: bit 0 = row 0 low, bit 1 = row 0 high, bit 2 = row 1 low, bit 3 =
// row 1 high; 0 = unused.
QMOE_HD uint32_t slot_bits(uint32_t e, int j) {
  const uint32_t k = e >> (kSymShift + j);
  return (k & 1u) | ((k >> 2) & 2u) | ((k >> 4) & 4u) | ((k >> 6) & 8u);
}
// Column of slot j within the entry.
QMOE_HD int slot_col(uint32_t e, int j) {
  const int first = static_cast<int>((e >> kFirstShift) & 31u);
  return j == 0 ? first : first + static_cast<int>((e >> (4 * (j - 1))) & 15u);
}
// Symbol of row `row` (0 or 1) in slot j: 0, 1 (low), 2 (high) or 3 (both bits: invalid).
QMOE_HD int slot_symbol(uint32_t e, int j, int row) {
  return static_cast<int>((slot_bits(e, j) >> (2 * row)) & 3u);
}

}  // namespace qmoe::v3
