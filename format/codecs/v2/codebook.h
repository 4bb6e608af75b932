// The qmoe-v2 dictionary the encoder builds for a zero fraction, and its trie (encoder-internal).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "qmoe/format/matrix.h"

namespace qmoe::detail {

// A dictionary and the tree the parse walks. The tree is complete: every inner node has all three
// children, and the dictionary's entries are its leaves. child[node * 3 + symbol] is the inner
// node that extends `node` by `symbol` (>= 0), or ~code of the leaf that does (< 0). Node 0 is
// the root (the empty string).
struct V2Codebook {
  std::shared_ptr<const FittedDictionary> dictionary;
  std::vector<int32_t> child;
};

// Built once per (p0, max_width) and kept for the life of the process; thread-safe.
const V2Codebook& v2_codebook(double p0, int max_width);

}  // namespace qmoe::detail
