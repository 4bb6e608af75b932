// The qmoe-v3 dictionary the encoder builds for a zero fraction, and its tree (encoder-internal).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "qmoe/format/matrix.h"

namespace qmoe::detail {

// A dictionary and the tree the parse walks, over column values s0 + 3 * s1 (row 0's and row 1's
// symbol). The tree is complete: every inner node has all nine children, and the dictionary's
// entries are its leaves. child[node * 9 + value] is the inner node that extends `node` by
// `value` (> 0), or ~code of the leaf that does (< 0). Node 0 is the root.
struct V3Codebook {
  std::shared_ptr<const FittedDictionary> dictionary;
  std::vector<int32_t> child;
};

// Built once per p0 and kept for the life of the process; thread-safe.
const V3Codebook& v3_codebook(double p0);

}  // namespace qmoe::detail
