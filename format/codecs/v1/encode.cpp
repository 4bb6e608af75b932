// The qmoe-v1 encoder (format/SPEC.md 4.1.4): greedy longest match through a trie of the
// dictionary, each row on its own. Walk the trie pair by pair; when the current node has no child
// for the next pair, emit the node's entry and restart from the root with that pair; emit the last
// node at the end of the row. This is exactly QMoE's encoding, so streams are interchangeable with
// it.
#include <string>
#include <vector>

#include "encode_internal.h"
#include "qmoe/format/codecs/v1.h"
#include "qmoe/format/reference.h"

namespace qmoe {
namespace detail {
namespace {

// Trie of the v1 dictionary: child[node * 9 + pair] is the entry extending `node` by `pair`, or
// kNone. Node kRoot is the empty sequence. The dictionary is prefix-closed (a prefix is always
// more probable than its extension and popped first), so every entry hangs off its prefix.
// Entry 0 is the single pair (0,0): only the root can have it as a child, so 0 serves as "none".
struct V1Trie {
  static constexpr uint32_t kRoot = v1::kEntries;
  static constexpr uint16_t kNone = 0;
  std::vector<uint16_t> child;

  V1Trie() {
    std::vector<int32_t> links(static_cast<size_t>(v1::kEntries + 1) * 9, -1);
    const int32_t* table = v1_decode_table();
    for (uint32_t e = 0; e < v1::kEntries; ++e) {
      const uint32_t w[2] = {static_cast<uint32_t>(table[2 * e]),
                             static_cast<uint32_t>(table[2 * e + 1])};
      const int n = v1::entry_pairs(w[0]);
      int32_t node = kRoot;
      for (int k = 0; k < n && node >= 0; ++k) {
        const uint32_t word = w[k / v1::kPairsPerWord];
        const int j = k % v1::kPairsPerWord;
        const int pair = v1::pair_s0(word, j) + 3 * v1::pair_s1(word, j);
        int32_t& link = links[static_cast<size_t>(node) * 9 + pair];
        if (k + 1 == n) link = static_cast<int32_t>(e);
        node = link;
      }
      if (node != static_cast<int32_t>(e)) {
        throw Error("qmoe-v1 dictionary is not prefix-closed (entry " + std::to_string(e) + ")");
      }
    }
    child.resize(links.size());
    for (size_t i = 0; i < links.size(); ++i) {
      const bool root = i >= static_cast<size_t>(kRoot) * 9;
      if (root && links[i] < 0) throw Error("qmoe-v1 dictionary lacks a single pair");
      if (!root && links[i] == 0)
        throw Error("qmoe-v1 dictionary: entry 0 is not the root's (0,0)");
      child[i] = links[i] < 0 ? kNone : static_cast<uint16_t>(links[i]);
    }
  }

  static const V1Trie& get() {
    static const V1Trie trie;
    return trie;
  }
};

// Encodes one row of v1; calls sink(code) per codeword.
template <class Sink>
inline void encode_row_v1(const V1Trie& trie, const uint8_t* s, int64_t cols, Sink&& sink) {
  if (cols == 0) return;
  const uint16_t* child = trie.child.data();
  const int64_t full = cols / 2;
  // The first pair always starts at the root, whose children all exist.
  uint32_t node = child[V1Trie::kRoot * 9 + (cols >= 2 ? s[0] + 3u * s[1] : s[0])];
  auto step = [&](uint32_t pair) {
    const uint16_t next = child[node * 9 + pair];
    if (next == V1Trie::kNone) {
      sink(static_cast<uint16_t>(node));
      node = child[V1Trie::kRoot * 9 + pair];
    } else {
      node = next;
    }
  };
  for (int64_t p = 1; p < full; ++p) step(s[2 * p] + 3u * s[2 * p + 1]);
  if ((cols & 1) && full > 0) step(s[cols - 1]);
  sink(static_cast<uint16_t>(node));
}

}  // namespace

CompressedMatrix encode_v1(const TernaryMatrix& t, const EncodeOptions& opt) {
  const V1Trie& trie = V1Trie::get();
  return encode_codes(t, opt.threads, Codec::kV1, [&](int64_t r, auto&& sink) {
    encode_row_v1(trie, t.symbols.data() + r * t.cols, t.cols, sink);
  });
}

}  // namespace detail

int64_t v1_code_count(const TernaryMatrix& t, int threads) {
  detail::check_symbols(t);
  const detail::V1Trie& trie = detail::V1Trie::get();
  int64_t total = 0;
  detail::ThreadCount tc(threads);
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < t.rows; ++r) {
    int64_t n = 0;
    detail::encode_row_v1(trie, t.symbols.data() + r * t.cols, t.cols, [&](uint16_t) { ++n; });
    total += n;
  }
  return total;
}

}  // namespace qmoe
