// Per-dictionary tables of the CPU kernels (layout in kernels.h), derived from the decode tables.
#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe::cpu::detail {
namespace {

// A list record (Tables::v1_list layout) from columns and symbols of one codeword.
uint64_t list_record(const int* cols, const int* syms, int n, int width) {
  uint64_t lo_cols = 0, hi_cols = 0;
  int n_lo = 0, n_hi = 0;
  for (int i = 0; i < n; ++i) {
    if (syms[i] == 1) lo_cols |= static_cast<uint64_t>(cols[i]) << (8 * n_lo++);
    if (syms[i] == 2) hi_cols |= static_cast<uint64_t>(cols[i]) << (8 * n_hi++);
  }
  return lo_cols | (static_cast<uint64_t>(n_lo | width << 2) << 24) | (hi_cols << 32) |
         (static_cast<uint64_t>(n_hi) << 56);
}

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
      int cols[3], syms[3], n = 0;
      uint32_t perm = static_cast<uint32_t>(2 * pairs) << 27;
      for (int k = 0; k < pairs; ++k) {
        const uint32_t word = w[k / v1::kPairsPerWord];
        const int j = k % v1::kPairsPerWord;
        const int sym[2] = {v1::pair_s0(word, j), v1::pair_s1(word, j)};
        for (int h = 0; h < 2; ++h) {
          const int col = 2 * k + h;
          if (sym[h] == 0) continue;
          if (n == 3) {
            throw Error("qmoe-v1 dictionary entry " + std::to_string(e) +
                        " has more than 3 non-zero symbols; the CPU kernels assume at most 3");
          }
          perm |= static_cast<uint32_t>(col) << (5 * n);
          perm |= uint32_t{1} << (15 + n + (sym[h] == 2 ? 3 : 0));
          cols[n] = col;
          syms[n++] = sym[h];
        }
      }
      v1_perm[e] = perm;
      v1_list[e] = list_record(cols, syms, n, 2 * pairs);
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

// Derived tables are cached per dictionary id (XXH3-64). XXH3 is not collision-resistant against
// a crafted input, and tables that do not match a matrix's dictionary would let its rows run past
// their input, so an entry also keeps the dictionary it was built from: the first time a
// dictionary address is seen for an id, its contents are compared (256 KiB, once per address), and
// a different dictionary with the same id gets tables of its own. An address seen before is
// trusted (comparing on every call would cost ~10% of a Switch-sized matvec): a different
// dictionary with the same id, placed later at that very address, would not be detected.
// T is what is derived (built by T::build(dictionary)); one cache per T.
template <class T>
const T& cached(const uint32_t* dictionary, uint64_t id) {
  struct Store {
    std::vector<uint32_t> source;
    std::vector<const uint32_t*> seen;  // addresses whose contents equal `source`
    T derived;
  };
  static std::mutex mu;
  static std::multimap<uint64_t, std::unique_ptr<Store>> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto [lo, hi] = cache.equal_range(id);
  for (auto it = lo; it != hi; ++it) {
    Store& t = *it->second;
    bool same = std::find(t.seen.begin(), t.seen.end(), dictionary) != t.seen.end();
    if (!same && std::memcmp(t.source.data(), dictionary, v2::kTableBytes) == 0) {
      t.seen.push_back(dictionary);
      same = true;
    }
    if (same) return t.derived;
  }
  auto t = std::make_unique<Store>();
  t->source.assign(dictionary, dictionary + v2::kEntries);
  t->seen.push_back(dictionary);
  t->derived = T::build(dictionary);
  return cache.emplace(id, std::move(t))->second->derived;
}

struct V2Derived {
  std::vector<uint64_t> list;
  std::vector<uint32_t> perm;  // empty unless every entry keeps within v2::kSpan columns

  static V2Derived build(const uint32_t* dictionary) {
    V2Derived t;
    t.list.resize(v2::kEntries);
    t.perm.resize(v2::kEntries);
    bool windowed = true;
    for (int e = 0; e < v2::kEntries; ++e) {
      const uint32_t w = dictionary[e];
      int cols[v2::kSlots], syms[v2::kSlots], n = 0;
      for (int j = 0; j < v2::kSlots; ++j) {
        if (v2::slot_symbol(w, j) == 0) continue;
        cols[n] = v2::slot_col(w, j);
        syms[n++] = v2::slot_symbol(w, j);
      }
      t.list[e] = list_record(cols, syms, n, v2::entry_width(w));
      uint32_t p = static_cast<uint32_t>(v2::entry_width(w)) << 26;
      if (n > 0) {
        if (cols[n - 1] - cols[0] >= v2::kSpan) windowed = false;
        p |= static_cast<uint32_t>(cols[0]) << 10;
        for (int j = 1; j < n; ++j)
          p |= static_cast<uint32_t>((cols[j] - cols[0]) & 31) << (5 * (j - 1));
        for (int j = 0; j < n; ++j) p |= 1u << (16 + j + (syms[j] == 2 ? 3 : 0));
      }
      t.perm[e] = p;
    }
    if (!windowed) t.perm.clear();
    return t;
  }
};

struct V3Derived {
  std::vector<uint64_t> list;  // 2 per codeword

  static V3Derived build(const uint32_t* dictionary) {
    V3Derived t;
    t.list.resize(2 * static_cast<size_t>(v3::kEntries));
    for (int e = 0; e < v3::kEntries; ++e) {
      const uint32_t w = dictionary[e];
      for (int row = 0; row < 2; ++row) {
        int cols[v3::kSlots], syms[v3::kSlots], n = 0;
        for (int j = 0; j < v3::kSlots; ++j) {
          const int sym = v3::slot_symbol(w, j, row);
          if (sym == 0) continue;
          cols[n] = v3::slot_col(w, j);
          syms[n++] = sym;
        }
        t.list[2 * static_cast<size_t>(e) + static_cast<size_t>(row)] =
            list_record(cols, syms, n, v3::entry_width(w));
      }
    }
    return t;
  }
};

}  // namespace

V2Tables v2_tables(const uint32_t* dictionary, uint64_t id) {
  const V2Derived& t = cached<V2Derived>(dictionary, id);
  return {t.list.data(), t.perm.empty() ? nullptr : t.perm.data()};
}

const uint64_t* v3_list_table(const uint32_t* dictionary, uint64_t id) {
  return cached<V3Derived>(dictionary, id).list.data();
}

const Tables& tables() {
  static const TableStore store;
  return store.view;
}

}  // namespace qmoe::cpu::detail
