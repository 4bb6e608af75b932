// Construction of qmoe-v3 dictionaries (format/SPEC.md section 4.4.4) and their trees.
//
// A qmoe-v3 dictionary is the leaf set of a Tunstall tree over the 9 values of a column of two
// rows: with i.i.d. symbols, P(0) = p0 and P(1) = P(2) = p1 = (1 - p0) / 2, grow a complete 9-ary
// tree by splitting its most probable splittable leaf while it has at most 65536 - 8 leaves. A
// node may be split while every child is a well-formed entry: shorter than 63 columns, fewer than
// 3 non-zero columns, and either no non-zero column and shorter than 32 columns (the first slot's
// column is a 5-bit field) or its last column fewer than 16 columns after its first non-zero one
// (the other slots' 4-bit fields; the AVX-512 kernel reads an entry's inputs as one 16-float
// window). The expected codeword length is the sum of the probabilities of the inner nodes, which
// the splitting order maximises.
//
// Strings are compared by probability (higher first), then length, then number of non-zero
// symbols (fewer first), then creation order (children in the order of their column value), all
// exact: probabilities are products of the same double factors in the same order on every
// machine, so every machine builds the same dictionary.
#include "codebook.h"

#include <algorithm>
#include <bit>
#include <map>
#include <mutex>
#include <queue>
#include <string>

#include "qmoe/format/codecs/v3.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe::detail {
namespace {

struct Node {
  double prob;
  uint32_t entry;  // the string as an entry word (width = length)
  int32_t depth;
  int32_t nonzero_symbols;
  int32_t nonzero_cols;
  int32_t first;  // column of the first non-zero column, -1 if none
  int32_t id;     // creation order
};

bool before(const Node& a, const Node& b) {
  if (a.prob != b.prob) return a.prob > b.prob;
  if (a.depth != b.depth) return a.depth < b.depth;
  if (a.nonzero_symbols != b.nonzero_symbols) return a.nonzero_symbols < b.nonzero_symbols;
  return a.id < b.id;
}

bool splittable(const Node& n) {
  if (n.depth + 1 > v3::kMaxWidth || n.nonzero_cols >= v3::kSlots) return false;
  return n.first < 0 ? n.depth < 32 : n.depth - n.first < v3::kSpan;
}

// The node's string extended by one column of value v (s0 = v % 3, s1 = v / 3).
Node child_of(const Node& n, int v, double p0, double p1, int32_t id) {
  Node c = n;
  c.id = id;
  c.depth = n.depth + 1;
  const int s0 = v % 3, s1 = v / 3;
  c.prob = n.prob * (s0 == 0 ? p0 : p1) * (s1 == 0 ? p0 : p1);
  uint32_t e = n.entry & ~(uint32_t{63} << v3::kWidthShift);
  e |= static_cast<uint32_t>(c.depth) << v3::kWidthShift;
  if (v != 0) {
    const int j = n.nonzero_cols;
    const int col = n.depth;
    if (j == 0) {
      e |= static_cast<uint32_t>(col) << v3::kFirstShift;
      c.first = col;
    } else {
      e |= static_cast<uint32_t>(col - n.first) << (4 * (j - 1));
    }
    // Row r's kind bits: low of slot j at kSymShift + 6r + j, high 3 bits above.
    if (s0 != 0) e |= 1u << (v3::kSymShift + (s0 == 2 ? 3 : 0) + j);
    if (s1 != 0) e |= 1u << (v3::kSymShift + 6 + (s1 == 2 ? 3 : 0) + j);
    c.nonzero_cols = j + 1;
    c.nonzero_symbols = n.nonzero_symbols + (s0 != 0) + (s1 != 0);
  }
  c.entry = e;
  return c;
}

V3Codebook build_codebook(double p0) {
  const double p1 = (1.0 - p0) / 2.0;
  constexpr int kValues = 9;
  constexpr int64_t kMaxLeaves = v3::kEntries;
  std::vector<Node> nodes;  // every node ever created, by id
  nodes.push_back({1.0, 0u, 0, 0, 0, -1, 0});
  std::vector<int32_t> children;  // per node: kValues ids, -1 while a leaf
  children.assign(kValues, -1);
  auto worse = [](const Node& a, const Node& b) { return before(b, a); };
  std::priority_queue<Node, std::vector<Node>, decltype(worse)> open(worse);
  open.push(nodes[0]);
  int64_t leaves = 1;
  while (!open.empty() && leaves + (kValues - 1) <= kMaxLeaves) {
    const Node n = open.top();
    open.pop();
    leaves += kValues - 1;
    for (int v = 0; v < kValues; ++v) {
      const auto id = static_cast<int32_t>(nodes.size());
      const Node c = child_of(n, v, p0, p1, id);
      nodes.push_back(c);
      children.insert(children.end(), kValues, -1);
      children[static_cast<size_t>(n.id) * kValues + v] = id;
      if (splittable(c)) open.push(c);
    }
  }
  // Leaves in code order; inner nodes renumbered 0..m-1 in creation order (the root stays 0).
  std::vector<int32_t> inner_index(nodes.size(), -1);
  int32_t n_inner = 0;
  std::vector<const Node*> leaf;
  for (const Node& n : nodes) {
    if (children[static_cast<size_t>(n.id) * kValues] >= 0) {
      inner_index[static_cast<size_t>(n.id)] = n_inner++;
    } else {
      leaf.push_back(&n);
    }
  }
  if (static_cast<int64_t>(leaf.size()) != leaves || leaves > kMaxLeaves) {
    throw Error("qmoe-v3 construction: " + std::to_string(leaf.size()) + " leaves");
  }
  std::sort(leaf.begin(), leaf.end(), [](const Node* a, const Node* b) { return before(*a, *b); });
  std::vector<int32_t> code_of(nodes.size(), 0);
  std::vector<uint32_t> entries(v3::kEntries);
  for (size_t i = 0; i < leaf.size(); ++i) {
    entries[i] = leaf[i]->entry;
    code_of[static_cast<size_t>(leaf[i]->id)] = static_cast<int32_t>(i);
  }
  for (size_t i = leaf.size(); i < entries.size(); ++i) entries[i] = entries[0];
  V3Codebook cb;
  cb.child.assign(static_cast<size_t>(n_inner) * kValues, 0);
  for (const Node& n : nodes) {
    const int32_t in = inner_index[static_cast<size_t>(n.id)];
    if (in < 0) continue;
    for (int v = 0; v < kValues; ++v) {
      const int32_t c = children[static_cast<size_t>(n.id) * kValues + v];
      const int32_t ci = inner_index[static_cast<size_t>(c)];
      cb.child[static_cast<size_t>(in) * kValues + v] =
          ci >= 0 ? ci : ~code_of[static_cast<size_t>(c)];
    }
  }
  auto d = std::make_shared<FittedDictionary>(
      *make_v3_dictionary(std::move(entries), "qmoe-v3 dictionary construction"));
  d->p0 = p0;
  d->max_width = v3::kMaxWidth;
  cb.dictionary = std::move(d);
  return cb;
}

}  // namespace

const V3Codebook& v3_codebook(double p0) {
  if (!(p0 > 0.0 && p0 < 1.0)) {
    throw InvalidArgument("qmoe-v3: the zero fraction p0 must lie strictly between 0 and 1, not " +
                          std::to_string(p0));
  }
  static std::mutex mu;
  static std::map<uint64_t, std::unique_ptr<V3Codebook>> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[std::bit_cast<uint64_t>(p0)];
  if (!slot) slot = std::make_unique<V3Codebook>(build_codebook(p0));
  return *slot;
}

}  // namespace qmoe::detail
