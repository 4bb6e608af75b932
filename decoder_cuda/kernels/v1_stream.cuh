// Warp-cooperative reading of one qmoe-v1 row: the warp holds a chunk of 32*kCodesPerLane
// codewords, lane i owning codes i, i+32, i+64, ... of the chunk, each with its table entry and
// the index of its first pair in the row (a warp prefix sum over the entry lengths). The codes of
// the next chunk are loaded while the current one is consumed, so every warp keeps two chunks of
// DRAM reads in flight.
#pragma once

#include "common.cuh"

namespace qmoe::cuda::kern {

inline constexpr int kCodesPerLane = 4;
inline constexpr int kChunkCodes = 32 * kCodesPerLane;
inline constexpr uint32_t kNoCode = 0xffffffffu;

struct V1Chunk {
  uint32_t w0[kCodesPerLane];  // table words of the lane's codes (0 past the row's end)
  uint32_t w1[kCodesPerLane];
  int32_t first_pair[kCodesPerLane];  // index in the row of the entry's first pair
  int32_t end_pair;                   // one past the last pair of the chunk (warp-uniform)
};

// Codes [base, base + kChunkCodes) of a row ending at code `end`; kNoCode past the end.
QMOE_DEV void v1_load_codes(const uint16_t* codes, int32_t base, int32_t end, int lane,
                            uint32_t (&c)[kCodesPerLane]) {
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    const int32_t i = base + 32 * k + lane;
    c[k] = i < end ? static_cast<uint32_t>(ldg(codes + i)) : kNoCode;  // 64 B coalesced per k
  }
}

// Looks up the chunk's entries and numbers their pairs from `pair_base`.
QMOE_DEV void v1_decode_chunk(const uint2* table, const uint32_t (&c)[kCodesPerLane],
                              int32_t pair_base, int lane, V1Chunk& ch) {
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    uint2 e{0u, 0u};
    if (c[k] != kNoCode) e = ldg(table + c[k]);  // 8-byte entry; hot entries stay in L1
    ch.w0[k] = e.x;
    ch.w1[k] = e.y;
  }
  QMOE_UNROLL
  for (int k = 0; k < kCodesPerLane; ++k) {
    const int n = static_cast<int>(v1::entry_pairs(ch.w0[k]));
    const int incl = warp_inclusive_sum(n, lane);
    ch.first_pair[k] = pair_base + incl - n;
    pair_base += __shfl_sync(kFullMask, incl, 31);  // lane 31 holds the sub-chunk's total
  }
  ch.end_pair = pair_base;
}

// Bit mask selecting, in a table word, the symbol fields of pairs [ja, jb) (0 <= ja <= jb <= 7).
QMOE_DEV uint32_t v1_pair_range_mask(int ja, int jb) {
  const uint32_t below_end = jb >= 7 ? 0xffffffffu : ((1u << (4 + 4 * jb)) - 1u);
  const uint32_t below_begin = (1u << (4 + 4 * ja)) - 1u;
  return below_end & ~below_begin;
}

// Mask with bit 4+2t set iff symbol t (0..13) of the word is non-zero.
QMOE_DEV uint32_t v1_nonzero_symbols(uint32_t w) {
  return (w | (w >> 1)) & 0x55555550u;
}

}  // namespace qmoe::cuda::kern
