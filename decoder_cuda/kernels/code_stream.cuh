// Warp-cooperative reading of one row of a dictionary-coded matrix (qmoe-v1 or qmoe-v2): the warp
// holds a chunk of 32*kCodesPerLane codewords, lane i owning codes i, i+32, i+64, ... of the
// chunk, each with its entry word and the column of its first symbol (a warp prefix sum over the
// entry widths). The codes of the next chunk are loaded while the current one is consumed, so
// every warp keeps two chunks of DRAM reads in flight.
//
// Both codecs are read through qmoe-v2 entry words (codec_layout.h): a qmoe-v2 matrix's own
// dictionary, or the qmoe-v1 dictionary in that layout (v1_entry_words()). An entry word holds
// the entry's width and up to three non-zero symbols as (column, kind) slots, 4 bytes per entry,
// so a codeword costs one 4-byte table load and at most three multiply-adds.
#pragma once

#include "common.cuh"

namespace qmoe::cuda::kern {

inline constexpr int kCodesPerLane = 4;
inline constexpr int kChunkCodes = 32 * kCodesPerLane;
inline constexpr uint32_t kNoCode = 0xffffffffu;

struct Chunk {
  uint32_t e[kCodesPerLane];         // entry words of the lane's codes (0 past the row's end)
  int32_t first_col[kCodesPerLane];  // column in the row of the entry's first symbol
  int32_t end_col;                   // one past the chunk's last column (warp-uniform)
};

// Codes [base, base + kChunkCodes) of a row ending at code `end`; kNoCode past the end.
QMOE_DEV void load_codes(const uint16_t* codes, int32_t base, int32_t end, int lane,
                         uint32_t (&c)[kCodesPerLane]) {
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    const int32_t i = base + 32 * k + lane;
    c[k] = i < end ? static_cast<uint32_t>(ldg(codes + i)) : kNoCode;  // 64 B coalesced per k
  }
}

// Looks up the chunk's entries and numbers their columns from `col_base`. An entry word of 0
// (past the row's end) has width 0 and no slots.
QMOE_DEV void decode_chunk(const uint32_t* entries, const uint32_t (&c)[kCodesPerLane],
                           int32_t col_base, int lane, Chunk& ch) {
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    ch.e[k] = c[k] != kNoCode ? ldg(entries + c[k]) : 0u;  // hot entries stay in L1
  }
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    const int n = v2::entry_width(ch.e[k]);
    const int incl = warp_inclusive_sum(n, lane);
    ch.first_col[k] = col_base + incl - n;
    col_base += __shfl_sync(kFullMask, incl, 31);  // lane 31 holds the sub-chunk's total
  }
  ch.end_col = col_base;
}

}  // namespace qmoe::cuda::kern
