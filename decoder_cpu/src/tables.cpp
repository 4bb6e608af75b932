// Per-dictionary tables of the CPU kernels (layout in kernels.h), derived from the decode tables.
#include <array>
#include <string>
#include <vector>

#include "kernels.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe::cpu::detail {
namespace {

// v1_perm holds columns and widths in 5-bit fields.
static_assert(2 * v1::kMaxPairs <= 31);

struct TableStore {
  std::vector<uint64_t> v1_list;
  std::vector<uint32_t> v1_perm;
  // Rows of 8 and 16 int32 read as whole vectors: aligned so that no row straddles two cache lines
  // (a heap vector's alignment varies between runs, and so did the p5 kernel's time, by 45%).
  alignas(64) std::array<int32_t, 64 * 2 * 4> v1_slot_masks{};
  std::vector<uint8_t> p5_list;
  alignas(64) std::array<int32_t, 256 * 16> p5_lanes{};
  Tables view;

  TableStore() : v1_list(v1::kEntries), v1_perm(v1::kEntries), p5_list(256 * 16, 0) {
    const int32_t* table = v1_decode_table();
    for (int e = 0; e < v1::kEntries; ++e) {
      const uint32_t w[2] = {static_cast<uint32_t>(table[2 * e]),
                             static_cast<uint32_t>(table[2 * e + 1])};
      const int pairs = v1::entry_pairs(w[0]);
      uint64_t lo_cols = 0, hi_cols = 0;  // packed column bytes
      int n_lo = 0, n_hi = 0;
      uint32_t perm = static_cast<uint32_t>(2 * pairs) << 27;
      for (int k = 0; k < pairs; ++k) {
        const uint32_t word = w[k / v1::kPairsPerWord];
        const int j = k % v1::kPairsPerWord;
        const int sym[2] = {v1::pair_s0(word, j), v1::pair_s1(word, j)};
        for (int h = 0; h < 2; ++h) {
          const int col = 2 * k + h;
          if (sym[h] == 0) continue;
          if (n_lo + n_hi == 3) {
            throw Error("qmoe-v1 dictionary entry " + std::to_string(e) +
                        " has more than 3 non-zero symbols; the CPU kernels assume at most 3");
          }
          const int slot = n_lo + n_hi;
          perm |= static_cast<uint32_t>(col) << (5 * slot);
          perm |= uint32_t{1} << (15 + slot + (sym[h] == 2 ? 3 : 0));
          if (sym[h] == 1) {
            lo_cols |= static_cast<uint64_t>(col) << (8 * n_lo++);
          } else {
            hi_cols |= static_cast<uint64_t>(col) << (8 * n_hi++);
          }
        }
      }
      v1_perm[e] = perm;
      v1_list[e] = lo_cols | (static_cast<uint64_t>(n_lo | (2 * pairs) << 2) << 24) |
                   (hi_cols << 32) | (static_cast<uint64_t>(n_hi) << 56);
    }
    for (int b = 0; b <= p5::kMaxByte; ++b) {
      uint8_t* rec = &p5_list[16 * b];
      int v = b;
      for (int i = 0; i < p5::kSymbolsPerByte; ++i, v /= 3) {
        if (v % 3 == 1) rec[rec[5]++] = static_cast<uint8_t>(i);
        if (v % 3 == 2) rec[8 + rec[13]++] = static_cast<uint8_t>(i);
        if (v % 3 != 0) p5_lanes[16 * b + (v % 3 == 1 ? i : 8 + i)] = -1;
      }
    }
    view.v1_list = v1_list.data();
    for (int kinds = 0; kinds < 64; ++kinds) {  // the v1_perm kind bits 15..20
      for (int j = 0; j < 3; ++j) {
        if ((kinds >> j) & 1) v1_slot_masks[8 * kinds + j] = -1;
        if ((kinds >> (3 + j)) & 1) v1_slot_masks[8 * kinds + 4 + j] = -1;
      }
    }
    view.v1_slot_masks = v1_slot_masks.data();
    view.v1_perm = v1_perm.data();
    view.p5_list = p5_list.data();
    view.p5_lanes = p5_lanes.data();
  }
};

}  // namespace

const Tables& tables() {
  static const TableStore store;
  return store.view;
}

}  // namespace qmoe::cpu::detail
