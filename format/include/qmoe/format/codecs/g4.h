// qmoe-g4, 4-bit gap tokens over groups of 4 rows (format/SPEC.md section 4.5): its bit layout,
// shared by host and device code. codec_layout.h includes every codec's layout; no std containers
// here, the CUDA kernels include it.
//
// Rows in groups of 4 (the last group completed by zero padding rows); the symbol of row 4g + j,
// column c is at position 4c + j of group g. A token t <= 14 stands for t zero symbols and one
// non-zero symbol, t = 15 for 15 zero symbols; the zeros after a group's last non-zero symbol take
// no tokens. One kind bit per non-zero symbol: 0 = low (1), 1 = high (2). Tokens are two per byte
// (low nibble first), kind bits eight per byte (low bit first), all groups back to back; the
// group offsets give each group's first token and first kind bit (format/SPEC.md section 4.5).
// ~0.66 bits per weight at P(0) = 0.885, no dictionary.
#pragma once

#include <cstdint>

#include "qmoe/core/bf16.h"

namespace qmoe::g4 {

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

}  // namespace qmoe::g4
