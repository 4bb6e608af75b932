// The qmoe-g4 encoder (format/SPEC.md 4.5.4): no dictionary; each group of 4 rows is its gaps
// between non-zero symbols, in 4-bit tokens, and a kind bit per non-zero symbol.
#include <limits>
#include <vector>

#include "encode_internal.h"
#include "qmoe/format/codecs/g4.h"

namespace qmoe::detail {
namespace {

// The tokens and kind bits of group g (SPEC 4.5.4, "Encoding"): one byte per token (0..15) and
// per kind bit (0 = low, 1 = high).
void encode_group_g4(const TernaryMatrix& t, int64_t g, std::vector<uint8_t>& tokens,
                     std::vector<uint8_t>& kinds) {
  int64_t zeros = 0;  // zero symbols since the last non-zero one
  for (int64_t c = 0; c < t.cols; ++c) {
    for (int j = 0; j < g4::kRows; ++j) {
      const int64_t r = g * g4::kRows + j;
      const uint8_t s = r < t.rows ? t.symbols[r * t.cols + c] : 0;
      if (s == 0) {
        ++zeros;
        continue;
      }
      for (; zeros >= g4::kEscape; zeros -= g4::kEscape) tokens.push_back(g4::kEscape);
      tokens.push_back(static_cast<uint8_t>(zeros));
      kinds.push_back(s == 2 ? 1 : 0);
      zeros = 0;
    }
  }
}

}  // namespace

CompressedMatrix encode_g4(const TernaryMatrix& t, const EncodeOptions& opt) {
  const int64_t groups = g4::groups(t.rows);
  std::vector<std::vector<uint8_t>> tok(static_cast<size_t>(groups)), kind(tok.size());
  {
    ThreadCount tc(opt.threads);
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t g = 0; g < groups; ++g) {
      encode_group_g4(t, g, tok[static_cast<size_t>(g)], kind[static_cast<size_t>(g)]);
    }
  }
  CompressedMatrix m;
  m.codec = Codec::kG4;
  m.rows = t.rows;
  m.cols = t.cols;
  m.group_offsets.assign(static_cast<size_t>(2 * (groups + 1)), 0);
  int64_t n_tok = 0, n_kind = 0;
  for (int64_t g = 0; g < groups; ++g) {
    n_tok += static_cast<int64_t>(tok[static_cast<size_t>(g)].size());
    n_kind += static_cast<int64_t>(kind[static_cast<size_t>(g)].size());
    if (n_tok > std::numeric_limits<int32_t>::max()) {
      throw InvalidArgument("encode: matrix needs more than 2^31-1 qmoe-g4 tokens; split it");
    }
    m.group_offsets[static_cast<size_t>(2 * g + 2)] = static_cast<int32_t>(n_tok);
    m.group_offsets[static_cast<size_t>(2 * g + 3)] = static_cast<int32_t>(n_kind);
  }
  m.tokens.assign(static_cast<size_t>((n_tok + 1) / 2), 0);
  m.kinds.assign(static_cast<size_t>((n_kind + 7) / 8), 0);
  int64_t i = 0, k = 0;
  for (int64_t g = 0; g < groups; ++g) {
    for (uint8_t v : tok[static_cast<size_t>(g)]) {
      m.tokens[static_cast<size_t>(i >> 1)] |= static_cast<uint8_t>(v << (4 * (i & 1)));
      ++i;
    }
    for (uint8_t v : kind[static_cast<size_t>(g)]) {
      m.kinds[static_cast<size_t>(k >> 3)] |= static_cast<uint8_t>(v << (k & 7));
      ++k;
    }
  }
  m.levels = t.levels;
  return m;
}

}  // namespace qmoe::detail
