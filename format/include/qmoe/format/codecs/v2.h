// qmoe-v2, a dictionary fitted to the matrix and stored in the file (format/SPEC.md section 4.3):
// its bit layout, shared by host and device code. codec_layout.h includes every codec's layout; no
// std containers here, the CUDA kernels include it.
//
// Each row is an independent stream of uint16 codewords, as in qmoe-v1, but codeword c stands for
// entry c of a 65536-entry dictionary stored with the matrix (format/SPEC.md section 4.3): a run of
// 1..63 *symbols* (not pairs) with at most 3 non-zero ones. The encoder builds the dictionary for
// the matrix's share of zeros; ~0.64-0.68 bits per weight at P(0) = 0.885 (entropy 0.630).
//
// Entry word (uint32), the non-zero symbols as up to three slots in column order:
//   bits 6j..6j+5 (j = 0..2) : column of slot j within the entry (0 when the slot is unused)
//   bit 18 + j               : slot j holds a low symbol (1)
//   bit 21 + j               : slot j holds a high symbol (2)
//   bits 24..25              : 0
//   bits 26..31              : width, the number of symbols the entry covers (1..63)
// Used slots come first and have strictly increasing columns below the width.
#pragma once

#include <cstdint>

#include "qmoe/core/bf16.h"

namespace qmoe::v2 {

inline constexpr int kEntries = 65536;
inline constexpr int kMaxWidth = 63;
inline constexpr int kSlots = 3;
inline constexpr int kColBits = 6;
inline constexpr int kLowShift = 18;
inline constexpr int kHighShift = 21;
inline constexpr int kWidthShift = 26;
inline constexpr int64_t kTableBytes = int64_t{kEntries} * 4;
// The qmoe encoder keeps the non-zero symbols of every entry within this many consecutive columns
// (slot 2's column - slot 0's column < kSpan); the AVX-512 kernel relies on it where a dictionary
// has the property. Any well-formed dictionary decodes.
inline constexpr int kSpan = 32;

QMOE_HD int entry_width(uint32_t e) {
  return static_cast<int>(e >> kWidthShift);
}
QMOE_HD int slot_col(uint32_t e, int j) {
  return static_cast<int>((e >> (kColBits * j)) & 63u);
}
// 0 = unused, 1 = low, 2 = high (3 = both: invalid).
QMOE_HD int slot_symbol(uint32_t e, int j) {
  return static_cast<int>(((e >> (kLowShift + j)) & 1u) | (((e >> (kHighShift + j)) & 1u) << 1));
}

}  // namespace qmoe::v2
