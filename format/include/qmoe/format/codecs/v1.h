// qmoe-v1, QMoE's dictionary code (format/SPEC.md section 4.1): its bit layout, shared by host
// and device code. codec_layout.h includes every codec's layout; no std containers here, the CUDA
// kernels include it.
//
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
#pragma once

#include <cstdint>

#include "qmoe/core/bf16.h"

namespace qmoe::v1 {

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

}  // namespace qmoe::v1
