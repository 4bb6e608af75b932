// qmoe-v3: the dictionary construction (a complete 9-ary Tunstall tree over columns of two rows,
// SPEC section 4.4.4), the encoder's parse of row pairs, its size against qmoe-v1 / qmoe-v2, and
// validation of malformed streams and dictionaries.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"

namespace qmoe {
namespace {

using test::random_ternary;

// An entry as its two row strings, written column by column as "s0s1" pairs: "00" per zero column.
// Built from the word's fields only (not from the library's accessors), so it checks them.
std::string entry_columns(uint32_t e) {
  const int width = static_cast<int>(e >> 26);
  std::string s(static_cast<size_t>(2 * width), '0');
  const int first = static_cast<int>((e >> 20) & 31u);
  const int d[3] = {0, static_cast<int>(e & 15u), static_cast<int>((e >> 4) & 15u)};
  for (int j = 0; j < 3; ++j) {
    // Row r's kind bits: low at 8 + 6r + j, high at 11 + 6r + j.
    const size_t col = static_cast<size_t>(first + d[j]);
    for (int r = 0; r < 2; ++r) {
      const bool low = (e >> (8 + 6 * r + j)) & 1u, high = (e >> (11 + 6 * r + j)) & 1u;
      if (low || high) s[2 * col + static_cast<size_t>(r)] = low ? '1' : '2';
    }
  }
  return s;
}

// The leaves of a complete 9-ary tree: no entry is a prefix of another (in columns), and the Kraft
// sum sum(9^-width) is exactly 1, checked in base 9: the count of leaves at each width carries
// into the next shorter width only in whole nines, down to a single root.
TEST(V3Dictionary, IsTheLeafSetOfACompleteTree) {
  for (double p0 : {0.5, 0.8, 0.885, 0.95}) {
    SCOPED_TRACE(testing::Message() << "p0 " << p0);
    const auto d = v3_dictionary(p0);
    ASSERT_NO_THROW(validate_v3_dictionary(d->entries, "construction"));
    EXPECT_EQ(d->id, v2_dictionary_id(d->entries));
    std::set<std::string> leaves;
    size_t n = 0;
    while (n < d->entries.size() && leaves.insert(entry_columns(d->entries[n])).second) ++n;
    for (size_t i = n; i < d->entries.size(); ++i) ASSERT_EQ(d->entries[i], d->entries[0]);
    EXPECT_EQ(n, 65529u);  // 1 + 8 * 8191 leaves
    std::vector<int64_t> at_width(v3::kMaxWidth + 1, 0);
    for (size_t i = 0; i < n; ++i) ++at_width[static_cast<size_t>(v3::entry_width(d->entries[i]))];
    for (int w = v3::kMaxWidth; w >= 1; --w) {
      ASSERT_EQ(at_width[static_cast<size_t>(w)] % 9, 0) << "Kraft sum is not 1 at width " << w;
      at_width[static_cast<size_t>(w - 1)] += at_width[static_cast<size_t>(w)] / 9;
    }
    EXPECT_EQ(at_width[0], 1) << "Kraft sum is not 1: not a complete tree";
    std::string prev;
    for (const std::string& s : leaves) {
      if (!prev.empty()) {
        ASSERT_NE(s.compare(0, prev.size(), prev), 0) << prev << " / " << s;
      }
      prev = s;
    }
    // Non-zero columns within v3::kSpan columns, the first one below column 32.
    for (size_t i = 0; i < n; ++i) {
      const std::string s = entry_columns(d->entries[i]);
      const size_t first = s.find_first_not_of('0'), last = s.find_last_not_of('0');
      if (first != std::string::npos) {
        ASSERT_LT(last / 2 - first / 2, static_cast<size_t>(v3::kSpan)) << s;
        ASSERT_LT(first / 2, 32u) << s;
      }
    }
  }
}

TEST(V3Dictionary, CodesInOrderOfProbabilityCachedAndTheSpecExample) {
  const double p0 = 0.885, p1 = (1 - p0) / 2;
  const auto d = v3_dictionary(p0);
  EXPECT_EQ(d.get(), v3_dictionary(p0).get());
  EXPECT_NE(d.get(), v3_dictionary(0.9).get());
  EXPECT_EQ(d->p0, p0);
  auto logp = [&](uint32_t e) {
    const std::string s = entry_columns(e);
    double l = 0;
    for (char ch : s) l += ch == '0' ? std::log(p0) : std::log(p1);
    return l;
  };
  for (int i = 1; i < 65529; ++i)
    ASSERT_GE(logp(d->entries[i - 1]), logp(d->entries[i]) - 1e-9) << "code " << i;
  // SPEC section 4.4.2's example.
  const auto spec = v3_dictionary(57.0 / 64);
  EXPECT_EQ(spec->id, 0x11ccb88076bd615full);
  EXPECT_EQ(spec->entries[20000], 0x300c40b9u);
  // Columns as s0 s1 pairs: row 1 reads 1 00000000 2 0 2, row 0 is all zeros.
  EXPECT_EQ(entry_columns(spec->entries[20000]), "010000000000000000020002");
  EXPECT_EQ(v3::entry_width(0x300c40b9u), 12);
  EXPECT_EQ(v3::slot_col(0x300c40b9u, 1), 9);
  EXPECT_EQ(v3::slot_col(0x300c40b9u, 2), 11);
  EXPECT_EQ(v3::slot_symbol(0x300c40b9u, 0, 1), 1);
  EXPECT_EQ(v3::slot_symbol(0x300c40b9u, 2, 1), 2);
  EXPECT_EQ(v3::slot_symbol(0x300c40b9u, 2, 0), 0);
}

TEST(V3Dictionary, RejectsBadParameters) {
  EXPECT_THROW(v3_dictionary(0.0), InvalidArgument);
  EXPECT_THROW(v3_dictionary(1.0), InvalidArgument);
  EXPECT_THROW(v3_dictionary(std::nan("")), InvalidArgument);
}

// Independent decoder of the parse: each pair's codes, spelled with entry_columns(), give back the
// two rows (the last entry padded with zero columns); odd rows own no codes; a lone last row is
// paired with zeros.
TEST(EncodeV3, CodesSpellThePairs) {
  for (int64_t rows : {1, 2, 3, 8, 9}) {
    for (int64_t cols : {1, 2, 15, 16, 17, 40, 63, 64, 500}) {
      const auto t = random_ternary(rows, cols, 0.885, static_cast<uint64_t>(rows * 1000 + cols));
      const auto m = encode(t, {.codec = Codec::kV3});
      ASSERT_EQ(m.codec, Codec::kV3);
      ASSERT_TRUE(m.dictionary);
      ASSERT_EQ(m.row_offsets.size(), static_cast<size_t>(rows + 1));
      for (int64_t r = 0; r < rows; r += 2) {
        if (r + 1 < rows) {
          EXPECT_EQ(m.row_offsets[r + 1], m.row_offsets[r + 2]) << "odd row " << r + 1;
        }
        std::string got;
        for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i)
          got += entry_columns(m.dictionary->entries[m.codes[i]]);
        std::string want;
        for (int64_t c = 0; c < cols; ++c) {
          want += static_cast<char>('0' + t.symbols[r * cols + c]);
          want += static_cast<char>('0' + (r + 1 < rows ? t.symbols[(r + 1) * cols + c] : 0));
        }
        ASSERT_GE(got.size(), want.size());
        EXPECT_EQ(got.substr(0, want.size()), want) << rows << "x" << cols << " pair " << r / 2;
        EXPECT_EQ(got.find_first_not_of('0', want.size()), std::string::npos);
      }
      std::vector<uint8_t> back(t.symbols.size());
      decode_symbols_ref(m.view(), back.data());
      EXPECT_EQ(back, t.symbols) << rows << "x" << cols;
      EXPECT_NO_THROW(validate(m.view(), "x"));
    }
  }
  // No columns, no codes.
  const auto e = encode(random_ternary(3, 0, 0.885, 1), {.codec = Codec::kV3});
  EXPECT_TRUE(e.codes.empty());
  EXPECT_NO_THROW(validate(e.view()));
}

// Between qmoe-v2 and qmoe-v1 at QMoE's sparsity, smaller than both at P(0) = 0.8.
TEST(EncodeV3, SizeAgainstV1AndV2) {
  for (double p0 : {0.8, 0.885, 0.95}) {
    const auto t = random_ternary(256, 3072, p0, 31);
    const double v1 = encode(t, {.codec = Codec::kV1}).view().bits_per_weight(true);
    const double v2 = encode(t, {.codec = Codec::kV2}).view().bits_per_weight(true);
    const double v3 = encode(t, {.codec = Codec::kV3}).view().bits_per_weight(true);
    SCOPED_TRACE(testing::Message() << "p0 " << p0 << " v1 " << v1 << " v2 " << v2 << " v3 " << v3);
    EXPECT_LT(v3, v1);
    if (p0 == 0.8) {
      EXPECT_LT(v3, v2);
    } else {
      EXPECT_LT(v3, 1.05 * v2);
    }
  }
}

// ---- validation --------------------------------------------------------------------------------

CompressedMatrix sample_v3(int64_t rows = 4) {
  return encode(random_ternary(rows, 61, 0.885, 5), {.codec = Codec::kV3});
}

template <class Pred>
uint16_t find_entry(const std::vector<uint32_t>& d, Pred&& pred) {
  for (size_t i = 0; i < d.size(); ++i)
    if (pred(d[i])) return static_cast<uint16_t>(i);
  ADD_FAILURE() << "no such entry";
  return 0;
}

void expect_error(const CompressedView& v, const std::string& part) {
  try {
    validate(v, "f.safetensors: tensor 'w'");
    ADD_FAILURE() << "no error, expected one with \"" << part << "\"";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("f.safetensors: tensor 'w'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(ValidateV3, PairsOfTheWrongLength) {
  auto m = sample_v3();
  m.codes.insert(m.codes.begin(), m.codes[0]);  // pair 0 one code longer
  for (size_t r = 1; r < m.row_offsets.size(); ++r) ++m.row_offsets[r];
  expect_error(m.view(), "row 0");
  auto n = sample_v3();
  n.codes.erase(n.codes.begin() + n.row_offsets[3] - 1);  // pair 1 one code short
  for (size_t r = 3; r < n.row_offsets.size(); ++r) --n.row_offsets[r];
  expect_error(n.view(), "row 2 decodes to");
}

TEST(ValidateV3, OddRowsOwnNoCodes) {
  auto m = sample_v3();
  m.row_offsets[1] -= 1;  // the pair's last code moved to row 1
  expect_error(m.view(), "row 1 has codes");
}

TEST(ValidateV3, TheRowThatCompletesAnOddHeightIsZero) {
  auto m = sample_v3(3);
  EXPECT_NO_THROW(validate(m.view()));
  // Replace the last pair's first code by one of the same width with a row-1 symbol.
  const auto& d = m.dictionary->entries;
  const int32_t i = m.row_offsets[2];
  const int w = v3::entry_width(d[m.codes[i]]);
  m.codes[i] = find_entry(d, [&](uint32_t e) {
    return v3::entry_width(e) == w && v3::slot_bits(e, 0) != 0 && v3::slot_symbol(e, 0, 1) != 0;
  });
  expect_error(m.view(), "last of an odd height");
  std::vector<uint8_t> sym(3 * 61);
  EXPECT_THROW(decode_symbols_ref(m.view(), sym.data()), FormatError);
}

TEST(ValidateV3, NonZeroColumnPastTheRowEnd) {
  TernaryMatrix t(2, 1);
  t.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f), float_to_bf16(-1.0f), float_to_bf16(1.0f)};
  auto m = encode(t, {.codec = Codec::kV3});
  ASSERT_EQ(m.codes.size(), 1u);
  EXPECT_NO_THROW(validate(m.view()));
  m.codes[0] = find_entry(m.dictionary->entries, [](uint32_t e) {
    return v3::slot_bits(e, 0) != 0 && v3::slot_col(e, 0) == 1;
  });
  expect_error(m.view(), "past its last column");
}

TEST(ValidateV3, BrokenDictionaries) {
  const auto base = sample_v3();
  auto expect_bad = [&](size_t i, uint32_t word, const char* what) {
    std::vector<uint32_t> dict = base.dictionary->entries;
    dict[i] = word;
    CompressedView v = base.view();
    v.dictionary = dict;
    v.dictionary_id = v2_dictionary_id(dict);
    try {
      validate(v, "x");
      ADD_FAILURE() << what << ": no error";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("qmoe-v3 dictionary entry " + std::to_string(i)),
                std::string::npos)
          << what << ": " << e.what();
    }
  };
  const uint32_t w5 = uint32_t{5} << v3::kWidthShift;
  expect_bad(7, 0, "width 0");
  expect_bad(8, w5 | (5u << v3::kFirstShift) | (1u << 8), "slot at the width");
  expect_bad(9, w5 | (1u << 8) | (1u << 11), "low and high in row 0");
  expect_bad(10, w5 | (1u << 14) | (1u << 17), "low and high in row 1");
  expect_bad(11, w5 | (1u << 8) | (1u << 9), "slot 1 at slot 0's column");
  expect_bad(12, w5 | (1u << 9) | 2u, "slot 1 without slot 0");
  expect_bad(13, w5 | 2u | (1u << 8), "unused slot with a column");
  expect_bad(14, w5 | (3u << v3::kFirstShift), "first column without a slot");
  expect_bad(15, w5 | (1u << 25), "reserved bit");
  expect_bad(16, w5 | (1u << 8) | (1u << 9) | 3u | (1u << 10) | (2u << 4), "columns decrease");
  // An id that does not match.
  CompressedView v = base.view();
  v.dictionary_id ^= 1;
  EXPECT_THROW(validate(v), FormatError);
}

// The codeword checks of validate() and the reference decoder agree on random code streams of
// pairs (mostly malformed), with the same message, for even and odd heights.
TEST(ValidateV3, CodewordChecksAgreeWithTheDecoder) {
  std::mt19937_64 rng(7);
  const auto dict = v3_dictionary(0.885);
  int accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t rows = 1 + static_cast<int64_t>(rng() % 2);
    const int64_t cols = 1 + static_cast<int64_t>(rng() % 60);
    const int n = 1 + static_cast<int>(rng() % 5);
    CompressedMatrix m;
    m.codec = Codec::kV3;
    m.rows = rows;
    m.cols = cols;
    for (int64_t r = 0; r < rows; ++r) {
      m.levels.push_back(float_to_bf16(-1.0f));
      m.levels.push_back(float_to_bf16(1.0f));
    }
    for (int i = 0; i < n; ++i)
      m.codes.push_back(static_cast<uint16_t>(rng() % (rng() % 2 ? 64 : 65536)));
    m.row_offsets = rows == 1 ? std::vector<int32_t>{0, n} : std::vector<int32_t>{0, n, n};
    m.dictionary = dict;
    std::string check_error, decode_error;
    try {
      validate(m.view(), "x");
    } catch (const FormatError& e) {
      check_error = e.what();
    }
    std::vector<uint8_t> sym(static_cast<size_t>(rows * cols));
    try {
      decode_symbols_ref(m.view(), sym.data());
    } catch (const FormatError& e) {
      decode_error = std::string("x: ") + e.what();
    }
    ASSERT_EQ(check_error, decode_error) << "trial " << trial;
    accepted += check_error.empty();
  }
  EXPECT_GT(accepted, 20);
}

}  // namespace
}  // namespace qmoe
