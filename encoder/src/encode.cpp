// qmoe-v1, qmoe-v2, qmoe-v3, qmoe-g4 and qmoe-p5 encoders.
//
// qmoe-v1 is greedy longest match through a trie of the dictionary, each row on its own: walk the
// trie pair by pair; when the current node has no child for the next pair, emit the node's entry
// and restart from the root with that pair; emit the last node at the end of the row. This is
// exactly QMoE's encoding, so streams are interchangeable with it. qmoe-v2 is the same walk, a
// symbol at a time, through the trie of the matrix's dictionary (v2_codebook.cpp); qmoe-v3 walks
// its dictionary's tree a column of two rows at a time (v3_codebook.cpp). qmoe-g4 has no
// dictionary: each group of 4 rows is its gaps between non-zero symbols, in 4-bit tokens
// (format/SPEC.md 4.5).
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <omp.h>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "v2_codebook.h"
#include "v3_codebook.h"

namespace qmoe {
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

// Encodes one row of v2; calls sink(code) per codeword (SPEC 4.3.3: the symbols of the last
// codeword past the row's end are zero).
template <class Sink>
inline void encode_row_v2(const detail::V2Codebook& cb, const uint8_t* s, int64_t cols,
                          Sink&& sink) {
  walk_tree<3>(
      cb.child.data(), cols, [&](int64_t c) { return s[c]; }, sink);
}

// One pair of rows through the tree of a qmoe-v3 dictionary, a column (s0 + 3 * s1) at a time; s1
// is null for the zero row that completes an odd-height matrix.
template <class Sink>
inline void encode_pair_v3(const detail::V3Codebook& cb, const uint8_t* s0, const uint8_t* s1,
                           int64_t cols, Sink&& sink) {
  walk_tree<9>(
      cb.child.data(), cols, [&](int64_t c) { return s0[c] + (s1 != nullptr ? 3 * s1[c] : 0); },
      sink);
}

void check_symbols(const TernaryMatrix& t) {
  if (t.rows < 0 || t.cols < 0) throw InvalidArgument("encode: negative shape");
  if (t.symbols.size() != static_cast<size_t>(t.rows * t.cols)) {
    throw InvalidArgument("encode: " + std::to_string(t.symbols.size()) + " symbols for a " +
                          std::to_string(t.rows) + "x" + std::to_string(t.cols) + " matrix");
  }
  if (t.levels.size() != static_cast<size_t>(2 * t.rows)) {
    throw InvalidArgument("encode: levels must hold 2*rows values");
  }
  uint8_t bad = 0;
  for (uint8_t v : t.symbols) bad |= (v > 2) ? 1 : 0;
  if (bad) throw InvalidArgument("encode: a symbol is not 0, 1 or 2");
}

// Rows are encoded in fixed blocks so the output does not depend on the thread count.
constexpr int64_t kRowsPerBlock = 32;

struct ThreadCount {
  explicit ThreadCount(int threads) : saved(omp_get_max_threads()) {
    if (threads > 0) omp_set_num_threads(threads);
  }
  ~ThreadCount() { omp_set_num_threads(saved); }
  int saved;
};

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

CompressedMatrix encode_v1(const TernaryMatrix& t, const EncodeOptions& opt) {
  const V1Trie& trie = V1Trie::get();
  return encode_codes(t, opt.threads, Codec::kV1, [&](int64_t r, auto&& sink) {
    encode_row_v1(trie, t.symbols.data() + r * t.cols, t.cols, sink);
  });
}

CompressedMatrix encode_v2(const TernaryMatrix& t, const EncodeOptions& opt) {
  const detail::V2Codebook& cb = detail::v2_codebook(
      opt.fitted_p0 ? *opt.fitted_p0 : fitted_p0_for(t.zero_fraction()), opt.v2_max_width);
  CompressedMatrix m = encode_codes(t, opt.threads, Codec::kV2, [&](int64_t r, auto&& sink) {
    encode_row_v2(cb, t.symbols.data() + r * t.cols, t.cols, sink);
  });
  m.dictionary = cb.dictionary;
  return m;
}

CompressedMatrix encode_v3(const TernaryMatrix& t, const EncodeOptions& opt) {
  const detail::V3Codebook& cb =
      detail::v3_codebook(opt.fitted_p0 ? *opt.fitted_p0 : fitted_p0_for(t.zero_fraction()));
  CompressedMatrix m = encode_codes(t, opt.threads, Codec::kV3, [&](int64_t r, auto&& sink) {
    if (r % 2 != 0) return;
    const uint8_t* s0 = t.symbols.data() + r * t.cols;
    encode_pair_v3(cb, s0, r + 1 < t.rows ? s0 + t.cols : nullptr, t.cols, sink);
  });
  m.dictionary = cb.dictionary;
  return m;
}

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

CompressedMatrix encode_p5(const TernaryMatrix& t, const EncodeOptions& opt) {
  CompressedMatrix m;
  m.codec = Codec::kP5;
  m.rows = t.rows;
  m.cols = t.cols;
  const int64_t nb = p5::row_bytes(t.cols);
  m.packed.assign(static_cast<size_t>(t.rows * nb), 0);
  ThreadCount tc(opt.threads);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < t.rows; ++r) {
    const uint8_t* s = t.symbols.data() + r * t.cols;
    uint8_t* out = m.packed.data() + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      int v = 0;
      for (int i = p5::kSymbolsPerByte - 1; i >= 0; --i) {
        const int64_t c = 5 * b + i;
        v = 3 * v + (c < t.cols ? s[c] : 0);
      }
      out[b] = static_cast<uint8_t>(v);
    }
  }
  m.levels = t.levels;
  return m;
}

// Each codec's encoder, indexed by Codec (the order of kCodecs).
using EncodeFn = CompressedMatrix (*)(const TernaryMatrix&, const EncodeOptions&);
constexpr std::array<EncodeFn, kCodecs.size()> kEncoders = {encode_v1, encode_v2, encode_v3,
                                                            encode_g4, encode_p5};

}  // namespace

int64_t v1_code_count(const TernaryMatrix& t, int threads) {
  check_symbols(t);
  const V1Trie& trie = V1Trie::get();
  int64_t total = 0;
  ThreadCount tc(threads);
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < t.rows; ++r) {
    int64_t n = 0;
    encode_row_v1(trie, t.symbols.data() + r * t.cols, t.cols, [&](uint16_t) { ++n; });
    total += n;
  }
  return total;
}

std::shared_ptr<const FittedDictionary> v2_dictionary(double p0, int max_width) {
  return detail::v2_codebook(p0, max_width).dictionary;
}

std::shared_ptr<const FittedDictionary> v3_dictionary(double p0) {
  return detail::v3_codebook(p0).dictionary;
}

double fitted_p0_for(double zero_fraction) {
  const double k = std::nearbyint(std::clamp(zero_fraction, 0.0, 1.0) * 64.0);
  return std::clamp(k, 32.0, 63.0) / 64.0;
}

CompressedMatrix transcode(const CompressedView& m, const EncodeOptions& opt) {
  validate_layout(m, "transcode");
  if (m.has_dictionary()) validate_dictionary(m.codec, m.dictionary, "transcode");
  TernaryMatrix t(m.rows, m.cols);
  std::copy(m.levels.begin(), m.levels.end(), t.levels.begin());
  // The reference decoder on blocks of rows in parallel; the error reported is the first block's.
  const int64_t nblocks = (m.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<std::string> errors(static_cast<size_t>(nblocks));
  {
    ThreadCount tc(opt.threads);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r0 = b * kRowsPerBlock, r1 = std::min(m.rows, r0 + kRowsPerBlock);
      std::vector<int32_t> offsets;
      try {
        decode_symbols_ref(row_slice(m, r0, r1, offsets), t.symbols.data() + r0 * m.cols);
      } catch (const FormatError& e) {
        errors[static_cast<size_t>(b)] =
            "transcode: rows from " + std::to_string(r0) + ": " + e.what();
      }
    }
  }
  for (const std::string& e : errors)
    if (!e.empty()) throw FormatError(e);
  return encode(t, opt);
}

CompressedMatrix encode(const TernaryMatrix& t, const EncodeOptions& opt) {
  check_symbols(t);
  if (opt.codec) return kEncoders[static_cast<size_t>(*opt.codec)](t, opt);
  // Automatic: the target's codec, or qmoe-p5 where that is smaller (a dense matrix).
  CompressedMatrix m = kEncoders[static_cast<size_t>(auto_codec(opt.target))](t, opt);
  const int64_t p5_bytes = t.rows * p5::row_bytes(t.cols) + 4 * t.rows;
  if (p5_bytes < m.view().compressed_bytes()) return encode_p5(t, opt);
  return m;
}

}  // namespace qmoe
