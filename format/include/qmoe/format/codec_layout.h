// Bit layouts of every qmoe codec, shared by host and device code. format/SPEC.md is the
// normative description; this header is its executable form. No std containers here: the CUDA
// kernels include it.
//
// Symbols: 0 = zero, 1 = the row's low level (lo <= 0), 2 = the row's high level (hi >= 0).
#pragma once

#include <cstdint>

#include "qmoe/format/bf16.h"

namespace qmoe {

// ---- qmoe-v1: QMoE's dictionary code --------------------------------------------------------
// Each row is an independent stream of uint16 codewords. Codeword c stands for entry c of a fixed
// 65536-entry dictionary; an entry is a run of 1..14 *pairs* of symbols (a pair = the symbols of
// an even column and the following odd column). Bits per weight: 16 / (2 * mean pairs per code);
// ~0.74 at P(0) = 0.885.
//
// Decode table: 2 x int32 per entry (words 2e, 2e+1), 524288 bytes.
//   bits 0..3 of both words : number of pairs of the entry (1..14)
//   word k, pair j (j=0..6) : pair 7k+j; bits 4+4j..5+4j = s0 (even column),
//                             bits 6+4j..7+4j = s1 (odd column); unused slots are 0.
// A row of odd width ends with a half pair whose s1 is 0 and is not part of the matrix.
namespace v1 {
inline constexpr int kEntries = 65536;
inline constexpr int kMaxPairs = 14;
inline constexpr int kPairsPerWord = 7;
inline constexpr int kTableWords = 2 * kEntries;
inline constexpr int64_t kTableBytes = int64_t{kTableWords} * 4;
static_assert(kTableBytes == 524288);

// Number of pairs in the entry whose first table word is w0.
QMOE_HD int entry_pairs(uint32_t w0) {
  return static_cast<int>(w0 & 0xfu);
}
// Symbol s0 (even column) / s1 (odd column) of pair j (0..6) of a table word.
QMOE_HD int pair_s0(uint32_t word, int j) {
  return static_cast<int>((word >> (4 + 4 * j)) & 3u);
}
QMOE_HD int pair_s1(uint32_t word, int j) {
  return static_cast<int>((word >> (6 + 4 * j)) & 3u);
}
// Number of pairs a row of `cols` symbols is coded as.
QMOE_HD int64_t row_pairs(int64_t cols) {
  return (cols + 1) / 2;
}
}  // namespace v1

// ---- qmoe-v2: a dictionary fitted to the matrix, stored in the file ---------------------------
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
namespace v2 {
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
}  // namespace v2

// ---- qmoe-v3: a fitted dictionary over the columns of two rows -------------------------------
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
namespace v3 {
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
}  // namespace v3

// ---- qmoe-g4: 4-bit gap tokens over groups of 4 rows -----------------------------------------
// Rows in groups of 4 (the last group completed by zero padding rows); the symbol of row 4g + j,
// column c is at position 4c + j of group g. A token t <= 14 stands for t zero symbols and one
// non-zero symbol, t = 15 for 15 zero symbols; the zeros after a group's last non-zero symbol take
// no tokens. One kind bit per non-zero symbol: 0 = low (1), 1 = high (2). Tokens are two per byte
// (low nibble first), kind bits eight per byte (low bit first), all groups back to back; the
// group offsets give each group's first token and first kind bit (format/SPEC.md section 4.5).
// ~0.66 bits per weight at P(0) = 0.885, no dictionary.
namespace g4 {
inline constexpr int kRows = 4;       // rows per group
inline constexpr int kEscape = 15;    // the token of 15 zero symbols
inline constexpr int kMaxZeros = 14;  // zero symbols before a non-zero one, in one token

QMOE_HD int64_t groups(int64_t rows) {
  return (rows + kRows - 1) / kRows;
}
// Token i of a token stream (nibble i: byte i / 2, low nibble when i is even).
QMOE_HD int token(const uint8_t* tokens, int64_t i) {
  return (tokens[i >> 1] >> (4 * (i & 1))) & 15;
}
// Kind bit k of a kind stream (bit k % 8 of byte k / 8): 1 = high.
QMOE_HD int kind_bit(const uint8_t* kinds, int64_t k) {
  return (kinds[k >> 3] >> (k & 7)) & 1;
}
}  // namespace g4

// ---- qmoe-p5: plain base-3 packing, the fallback for dense rows ------------------------------
// Five symbols per byte: byte = s0 + 3*s1 + 9*s2 + 27*s3 + 81*s4 (<= 242), symbol i of the byte
// is column 5*b + i of the row. Rows are ceil(cols/5) bytes; padding symbols are 0.
// Bits per weight: 8/5 = 1.6, independent of the data.
namespace p5 {
inline constexpr int kSymbolsPerByte = 5;
inline constexpr int kMaxByte = 242;
QMOE_HD int64_t row_bytes(int64_t cols) {
  return (cols + 4) / 5;
}
}  // namespace p5

// Value of symbol s given the row's levels (as float).
QMOE_HD float symbol_value(int s, float lo, float hi) {
  return s == 1 ? lo : (s == 2 ? hi : 0.0f);
}

}  // namespace qmoe
