// What the codecs' encoders (format/codecs/<codec>/encode.cpp, format/codecs/README.md) share:
// threads over fixed blocks of rows, the codeword-stream matrix, the walk through a fitted
// dictionary's tree. Internal to qmoe_encoder.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"

namespace qmoe::detail {

// Rows are encoded in fixed blocks so the output does not depend on the thread count.
constexpr int64_t kRowsPerBlock = 32;

// Sets the OpenMP thread count (0: leaves it) for its lifetime.
struct ThreadCount {
  explicit ThreadCount(int threads) : saved(omp_get_max_threads()) {
    if (threads > 0) omp_set_num_threads(threads);
  }
  ~ThreadCount() { omp_set_num_threads(saved); }
  int saved;
};

// encode()'s checks of its argument: the shape, the number of symbols and levels, every symbol 0,
// 1 or 2 (InvalidArgument).
void check_symbols(const TernaryMatrix& t);

// A code-stream codec: encode_row(r, sink) encodes row r (qmoe-v3: a pair's codes go to its
// even row, kRowsPerBlock is even so a pair never straddles two blocks).
static_assert(kRowsPerBlock % 2 == 0);
template <class EncodeRow>
CompressedMatrix encode_codes(const TernaryMatrix& t, int threads, Codec codec,
                              const EncodeRow& encode_row) {
  const int64_t nblocks = (t.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<std::vector<uint16_t>> block_codes(static_cast<size_t>(nblocks));
  CompressedMatrix m;
  m.codec = codec;
  m.rows = t.rows;
  m.cols = t.cols;
  m.row_offsets.assign(static_cast<size_t>(t.rows + 1), 0);
  std::vector<int64_t> row_counts(static_cast<size_t>(t.rows), 0);
  {
    ThreadCount tc(threads);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      auto& out = block_codes[b];
      const int64_t r0 = b * kRowsPerBlock, r1 = std::min(t.rows, r0 + kRowsPerBlock);
      out.reserve(static_cast<size_t>((r1 - r0) * (t.cols / 16 + 2)));
      for (int64_t r = r0; r < r1; ++r) {
        const size_t before = out.size();
        encode_row(r, [&](uint16_t c) { out.push_back(c); });
        row_counts[r] = static_cast<int64_t>(out.size() - before);
      }
    }
  }
  int64_t total = 0;
  for (int64_t r = 0; r < t.rows; ++r) {
    total += row_counts[r];
    if (total > std::numeric_limits<int32_t>::max()) {
      throw InvalidArgument("encode: matrix needs more than 2^31-1 " +
                            std::string(codec_name(codec)) + " codes; split it");
    }
    m.row_offsets[r + 1] = static_cast<int32_t>(total);
  }
  m.codes.resize(static_cast<size_t>(total));
  {
    ThreadCount tc(threads);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      std::copy(block_codes[b].begin(), block_codes[b].end(),
                m.codes.begin() + m.row_offsets[std::min(t.rows, b * kRowsPerBlock)]);
    }
  }
  m.levels = t.levels;
  return m;
}

// Walks a complete tree (child[node * Arity + value]: the inner node > 0 that extends `node` by
// `value`, or ~code of the leaf that does), one value per column; on reaching a leaf, emits its
// code and returns to the root. A row that ends at an inner node goes on with value 0 to a leaf.
template <int Arity, class ValueAt, class Sink>
inline void walk_tree(const int32_t* child, int64_t cols, ValueAt&& value_at, Sink&& sink) {
  int32_t node = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const int32_t next = child[node * Arity + value_at(c)];
    if (next < 0) {
      sink(static_cast<uint16_t>(~next));
      node = 0;
    } else {
      node = next;
    }
  }
  if (node == 0) return;
  for (;;) {
    const int32_t next = child[node * Arity];
    if (next < 0) {
      sink(static_cast<uint16_t>(~next));
      return;
    }
    node = next;
  }
}

}  // namespace qmoe::detail
