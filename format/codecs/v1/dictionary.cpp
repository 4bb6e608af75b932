// Construction of the qmoe-v1 dictionary (format/SPEC.md 4.1.2).
//
// The entries are the 65536 most probable non-empty sequences of up to 14 symbol pairs under
// i.i.d. symbols with P(0) = 0.885, P(1) = P(2) = (1 - 0.885)/2, in the order in which a best-first
// expansion from the empty sequence pops them. The order is part of the format (codeword = index),
// so the probabilities are computed with exactly the floating-point operations the spec names and
// ties are broken by the lexicographically smaller sequence of pair values.
#include <array>
#include <cstring>
#include <queue>
#include <string>
#include <vector>

#include "qmoe/format/codecs/v1.h"
#include "qmoe/format/codecs/v2.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe {
namespace {

struct Candidate {
  double key;  // -probability, so that the smallest key is the most probable sequence
  uint8_t len;
  std::array<uint8_t, v1::kMaxPairs> pairs;  // pair value s0 + 3*s1

  // Lexicographic order on (key, sequence); a proper prefix sorts first.
  bool operator>(const Candidate& o) const {
    if (key != o.key) return key > o.key;
    const int n = len < o.len ? len : o.len;
    for (int i = 0; i < n; ++i) {
      if (pairs[i] != o.pairs[i]) return pairs[i] > o.pairs[i];
    }
    return len > o.len;
  }
};

std::vector<int32_t> build_v1_table() {
  // P(1) = P(2) = (1 - 0.885) / 2 evaluated in double (0.057499999999999996, one ulp below the
  // literal 0.0575): the reference table was built with this value, and it decides the order of
  // sequences whose probabilities differ only in the last bit.
  const double p_zero = 0.885;
  const double p_level = (1.0 - p_zero) / 2.0;
  const double p_symbol[3] = {p_zero, p_level, p_level};
  double p_pair[9];
  for (int s1 = 0; s1 < 3; ++s1) {
    for (int s0 = 0; s0 < 3; ++s0) p_pair[s0 + 3 * s1] = (1.0 * p_symbol[s1]) * p_symbol[s0];
  }

  std::vector<Candidate> storage;
  storage.reserve(9 * v1::kEntries + 16);
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap(std::greater<>{},
                                                                              std::move(storage));
  heap.push(Candidate{-1.0, 0, {}});

  std::vector<int32_t> table(v1::kTableWords, 0);
  int recorded = 0;
  while (recorded < v1::kEntries) {
    if (heap.empty()) throw Error("qmoe-v1 dictionary construction ran out of candidates");
    const Candidate c = heap.top();
    heap.pop();
    if (c.len > 0) {
      uint32_t w[2] = {c.len, c.len};
      for (int i = 0; i < c.len; ++i) {
        const uint32_t s0 = c.pairs[i] % 3;
        const uint32_t s1 = c.pairs[i] / 3;
        const int word = i / v1::kPairsPerWord;
        const int j = i % v1::kPairsPerWord;
        w[word] |= (s0 << (4 + 4 * j)) | (s1 << (6 + 4 * j));
      }
      std::memcpy(&table[2 * recorded], w, sizeof w);
      ++recorded;
    }
    if (c.len < v1::kMaxPairs) {
      for (uint8_t v = 0; v < 9; ++v) {
        Candidate next = c;
        next.key = c.key * p_pair[v];
        next.pairs[c.len] = v;
        next.len = static_cast<uint8_t>(c.len + 1);
        heap.push(next);
      }
    }
  }
  return table;
}

}  // namespace

const int32_t* v1_decode_table() {
  static const std::vector<int32_t> table = build_v1_table();
  return table.data();
}

namespace {

std::vector<uint32_t> build_v1_entry_words() {
  const int32_t* table = v1_decode_table();
  std::vector<uint32_t> words(v1::kEntries);
  for (int e = 0; e < v1::kEntries; ++e) {
    const uint32_t w[2] = {static_cast<uint32_t>(table[2 * e]),
                           static_cast<uint32_t>(table[2 * e + 1])};
    const int pairs = v1::entry_pairs(w[0]);
    uint32_t out = static_cast<uint32_t>(2 * pairs) << v2::kWidthShift;
    int slot = 0;
    for (int k = 0; k < pairs; ++k) {
      const uint32_t word = w[k / v1::kPairsPerWord];
      const int j = k % v1::kPairsPerWord;
      const int sym[2] = {v1::pair_s0(word, j), v1::pair_s1(word, j)};
      for (int h = 0; h < 2; ++h) {
        if (sym[h] == 0) continue;
        if (slot == v2::kSlots) {
          throw Error("qmoe-v1 dictionary entry " + std::to_string(e) +
                      " has more than 3 non-zero symbols");
        }
        out |= static_cast<uint32_t>(2 * k + h) << (v2::kColBits * slot);
        out |= 1u << ((sym[h] == 2 ? v2::kHighShift : v2::kLowShift) + slot);
        ++slot;
      }
    }
    words[e] = out;
  }
  return words;
}

}  // namespace

const uint32_t* v1_entry_words() {
  static const std::vector<uint32_t> words = build_v1_entry_words();
  return words.data();
}

}  // namespace qmoe
