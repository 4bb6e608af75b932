// Construction of qmoe-v2 dictionaries (format/SPEC.md section 4.3.4) and their trees.
//
// A qmoe-v2 dictionary is the leaf set of a Tunstall tree over single symbols: with i.i.d.
// symbols, P(0) = p0 and P(1) = P(2) = p1 = (1 - p0) / 2, grow a complete ternary tree by
// splitting its most probable splittable leaf until it has 65535 leaves. A node may be split
// while it is shorter than max_width, holds fewer than 3 non-zero symbols, and its first non-zero
// symbol (if any) is fewer than 32 columns back, so that the non-zero symbols of every entry lie
// within 32 consecutive columns (v2::kSpan: the AVX-512 kernel reads them with one two-register
// permute). That costs 0.6% of size at P(0) = 0.885, 5% at 0.95. A codeword is a leaf, so a parse
// never stops early and never looks ahead; the expected codeword length is the sum of the
// probabilities of the inner nodes, which is what the splitting order maximises.
//
// A string of n symbols with k non-zero ones has probability p0^(n-k) p1^k, so the inner nodes are
// the 32767 most probable splittable strings (the root included): every prefix of a splittable
// string is splittable, at least as probable and ordered first below, so the set is a tree. All
// strings of one (n, k) class are equally probable; the construction orders classes, never
// single strings, which keeps it exact and fast.
#include "codebook.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "qmoe/format/codecs/v2.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe::detail {
namespace {

struct StringClass {
  double prob;
  int n;  // symbols
  int k;  // non-zero symbols
};

// Whether a string (as an entry word) may be split: its children keep the non-zero symbols within
// v2::kSpan columns.
bool splittable(uint32_t e) {
  return v2::slot_symbol(e, 0) == 0 || v2::entry_width(e) - v2::slot_col(e, 0) < v2::kSpan;
}

// Calls fn(entry_word) for the strings of class (n, k) in the canonical order: the columns of the
// non-zero symbols as an increasing tuple, tuples in lexicographic order; for each tuple, the
// kinds in the order of the number whose bit j is 1 when slot j is high. Stops when fn returns
// false.
template <class Fn>
void for_each_string(int n, int k, Fn&& fn) {
  int cols[3] = {0, 1, 2};
  for (;;) {
    for (uint32_t kinds = 0; kinds < (1u << k); ++kinds) {
      uint32_t e = static_cast<uint32_t>(n) << v2::kWidthShift;
      for (int j = 0; j < k; ++j) {
        e |= static_cast<uint32_t>(cols[j]) << (v2::kColBits * j);
        e |= 1u << (((kinds >> j) & 1u) ? v2::kHighShift + j : v2::kLowShift + j);
      }
      if (!fn(e)) return;
    }
    // Next k-subset of [0, n) in lexicographic order.
    int j = k - 1;
    while (j >= 0 && cols[j] == n - k + j) --j;
    if (j < 0) return;
    ++cols[j];
    for (int i = j + 1; i < k; ++i) cols[i] = cols[i - 1] + 1;
  }
}

constexpr int64_t kInner = 32767;  // inner nodes, the root included: 2 * 32767 + 1 = 65535 leaves

uint32_t extend(uint32_t e, int sym) {
  const int width = v2::entry_width(e);
  uint32_t out = (e & ~(uint32_t{63} << v2::kWidthShift)) | static_cast<uint32_t>(width + 1)
                                                                << v2::kWidthShift;
  if (sym != 0) {
    int j = 0;
    while (j < v2::kSlots && v2::slot_symbol(e, j) != 0) ++j;
    out |= static_cast<uint32_t>(width) << (v2::kColBits * j);
    out |= 1u << ((sym == 2 ? v2::kHighShift : v2::kLowShift) + j);
  }
  return out;
}

int nonzeros(uint32_t e) {
  int k = 0;
  for (int j = 0; j < v2::kSlots; ++j) k += v2::slot_symbol(e, j) != 0;
  return k;
}

V2Codebook build_codebook(double p0, int max_width) {
  const double p1 = (1.0 - p0) / 2.0;
  // Powers by repeated multiplication: exact IEEE-754 operations, so every machine builds the
  // same dictionary.
  std::vector<double> pow0(static_cast<size_t>(max_width) + 2, 1.0), pow1(4, 1.0);
  for (size_t i = 1; i < pow0.size(); ++i) pow0[i] = pow0[i - 1] * p0;
  for (int i = 1; i <= 3; ++i) pow1[i] = pow1[i - 1] * p1;
  auto prob = [&](int n, int k) { return pow0[n - k] * pow1[k]; };
  // More probable first; among equals, shorter first (a prefix before its extensions), then fewer
  // non-zero symbols.
  auto before = [](const StringClass& a, const StringClass& b) {
    if (a.prob != b.prob) return a.prob > b.prob;
    if (a.n != b.n) return a.n < b.n;
    return a.k < b.k;
  };

  // Inner nodes: the root, then the most probable splittable strings (n < max_width, k < 3, the
  // span rule above).
  std::vector<StringClass> classes;
  int64_t n_splittable = 1;
  for (int n = 1; n < max_width; ++n) {
    for (int k = 0; k <= std::min(n, v2::kSlots - 1); ++k) {
      classes.push_back({prob(n, k), n, k});
      for_each_string(n, k, [&](uint32_t e) {
        n_splittable += splittable(e);
        return true;
      });
    }
  }
  // Short entries may not fill the dictionary (max_width < 39): then every splittable string is
  // split, and the codes past the last leaf repeat code 0's entry.
  const int64_t n_inner = std::min<int64_t>(kInner, n_splittable);
  std::sort(classes.begin(), classes.end(), before);
  std::vector<uint32_t> inner;  // without the root
  inner.reserve(kInner);
  for (const StringClass& c : classes) {
    if (static_cast<int64_t>(inner.size()) + 1 == n_inner) break;
    for_each_string(c.n, c.k, [&](uint32_t e) {
      if (splittable(e)) inner.push_back(e);
      return static_cast<int64_t>(inner.size()) + 1 < n_inner;
    });
  }
  std::unordered_map<uint32_t, int32_t> inner_id;  // string -> node (the root is node 0)
  inner_id.reserve(inner.size());
  for (size_t i = 0; i < inner.size(); ++i) inner_id.emplace(inner[i], static_cast<int32_t>(i + 1));

  // Leaves: the children of inner nodes that are not inner nodes themselves.
  struct Leaf {
    StringClass c;
    uint32_t e;
    int32_t parent;
    int sym;
  };
  std::vector<Leaf> leaves;
  leaves.reserve(v2::kEntries);
  V2Codebook cb;
  cb.child.assign(static_cast<size_t>(n_inner) * 3, 0);
  for (int32_t node = 0; node < n_inner; ++node) {
    const uint32_t e = node == 0 ? 0u : inner[node - 1];
    for (int sym = 0; sym < 3; ++sym) {
      const uint32_t c = extend(e, sym);
      const auto it = inner_id.find(c);
      if (it != inner_id.end()) {
        if (it->second <= node) throw Error("qmoe-v2 construction: inner nodes out of order");
        cb.child[static_cast<size_t>(node) * 3 + sym] = it->second;
      } else {
        const int n = v2::entry_width(c), k = nonzeros(c);
        leaves.push_back({{prob(n, k), n, k}, c, node, sym});
      }
    }
  }
  if (leaves.size() != static_cast<size_t>(2 * n_inner + 1)) {
    throw Error("qmoe-v2 construction: " + std::to_string(leaves.size()) + " leaves for " +
                std::to_string(n_inner) + " inner nodes");
  }
  // Codes in order of probability (the hot part of the table stays in the cache), then by entry
  // word; the codes past the last leaf repeat code 0's entry so that all 65536 are well formed.
  std::sort(leaves.begin(), leaves.end(), [&](const Leaf& a, const Leaf& b) {
    if (before(a.c, b.c)) return true;
    if (before(b.c, a.c)) return false;
    return a.e < b.e;
  });
  std::vector<uint32_t> entries(v2::kEntries);
  for (size_t i = 0; i < leaves.size(); ++i) {
    entries[i] = leaves[i].e;
    cb.child[static_cast<size_t>(leaves[i].parent) * 3 + leaves[i].sym] = ~static_cast<int32_t>(i);
  }
  for (size_t i = leaves.size(); i < entries.size(); ++i) entries[i] = entries[0];
  auto d = std::make_shared<FittedDictionary>(
      *make_v2_dictionary(std::move(entries), "qmoe-v2 dictionary construction"));
  d->p0 = p0;
  d->max_width = max_width;
  cb.dictionary = std::move(d);
  return cb;
}

}  // namespace

const V2Codebook& v2_codebook(double p0, int max_width) {
  if (!(p0 > 0.0 && p0 < 1.0)) {
    throw InvalidArgument("qmoe-v2: the zero fraction p0 must lie strictly between 0 and 1, not " +
                          std::to_string(p0));
  }
  if (max_width < 1 || max_width > v2::kMaxWidth) {
    throw InvalidArgument("qmoe-v2: max_width must be 1..63, not " + std::to_string(max_width));
  }
  static std::mutex mu;
  static std::map<std::pair<uint64_t, int>, std::unique_ptr<V2Codebook>> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[{std::bit_cast<uint64_t>(p0), max_width}];
  if (!slot) slot = std::make_unique<V2Codebook>(build_codebook(p0, max_width));
  return *slot;
}

}  // namespace qmoe::detail
