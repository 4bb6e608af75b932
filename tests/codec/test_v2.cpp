// qmoe-v2: the dictionary construction (a complete Tunstall tree, SPEC section 4.3.4), the
// encoder's parse, its size against qmoe-v1 and the entropy, and validation of malformed streams
// and dictionaries.
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

// An entry as its symbol string (one char per symbol: '0', '1', '2').
std::string entry_string(uint32_t e) {
  std::string s(static_cast<size_t>(v2::entry_width(e)), '0');
  for (int j = 0; j < v2::kSlots; ++j) {
    const int sym = v2::slot_symbol(e, j);
    if (sym != 0) s[static_cast<size_t>(v2::slot_col(e, j))] = static_cast<char>('0' + sym);
  }
  return s;
}

__extension__ typedef unsigned __int128 u128;

double order0_entropy(double p0) {
  const double p1 = (1.0 - p0) / 2.0;
  return -(p0 * std::log2(p0) + 2.0 * p1 * std::log2(p1));
}

// The leaves of a complete ternary tree: no entry is a prefix of another, and the Kraft sum
// sum(3^-width) is exactly 1 (computed in integers, 3^63 < 2^101).
TEST(FittedDictionary, IsTheLeafSetOfACompleteTree) {
  for (double p0 : {0.5, 0.885, 0.95, 0.99}) {
    for (int width : {24, 40, 63}) {
      SCOPED_TRACE(testing::Message() << "p0 " << p0 << " max_width " << width);
      const auto d = v2_dictionary(p0, width);
      ASSERT_NO_THROW(validate_v2_dictionary(d->entries, "construction"));
      EXPECT_EQ(d->id, v2_dictionary_id(d->entries));
      // Distinct leaves first, then copies of entry 0 filling the code space.
      std::set<std::string> leaves;
      size_t n = 0;
      while (n < d->entries.size() && leaves.insert(entry_string(d->entries[n])).second) ++n;
      for (size_t i = n; i < d->entries.size(); ++i) ASSERT_EQ(d->entries[i], d->entries[0]);
      EXPECT_EQ(n % 2, 1u);  // a complete ternary tree has 2 * inner + 1 leaves
      if (width >= 40) {
        EXPECT_EQ(n, 65535u);
      }
      u128 kraft = 0, one = 1;
      for (int i = 0; i < 63; ++i) one *= 3;
      for (size_t i = 0; i < n; ++i) {
        const int w = v2::entry_width(d->entries[i]);
        ASSERT_LE(w, width);
        u128 t = 1;
        for (int k = 0; k < 63 - w; ++k) t *= 3;
        kraft += t;
      }
      EXPECT_TRUE(kraft == one) << "Kraft sum is not 1: not a complete tree";
      // Prefix-free: a proper prefix of a leaf is never a leaf (sorted order puts a prefix just
      // before the strings it starts).
      std::string prev;
      for (const std::string& s : leaves) {
        if (!prev.empty()) {
          ASSERT_NE(s.compare(0, prev.size(), prev), 0) << prev << " / " << s;
        }
        prev = s;
      }
    }
  }
}

TEST(FittedDictionary, CodesInOrderOfProbabilityAndCached) {
  const double p0 = 0.885, p1 = (1 - p0) / 2;
  const auto d = v2_dictionary(p0, 63);
  EXPECT_EQ(d.get(), v2_dictionary(p0, 63).get());
  EXPECT_NE(d.get(), v2_dictionary(0.9, 63).get());
  EXPECT_EQ(d->p0, p0);
  EXPECT_EQ(d->max_width, 63);
  auto logp = [&](uint32_t e) {
    int k = 0;
    for (int j = 0; j < v2::kSlots; ++j) k += v2::slot_symbol(e, j) != 0;
    return (v2::entry_width(e) - k) * std::log(p0) + k * std::log(p1);
  };
  for (int i = 1; i < 65535; ++i)
    ASSERT_GE(logp(d->entries[i - 1]), logp(d->entries[i]) - 1e-9) << "code " << i;
  // SPEC section 4.3.2's example.
  const auto spec = v2_dictionary(57.0 / 64, 63);
  EXPECT_EQ(spec->id, 0xed96d927233f97b2ull);
  EXPECT_EQ(spec->entries[20000], 0x60c57549u);
  EXPECT_EQ(entry_string(spec->entries[20000]), "000000000100000000000202");
  // The non-zero symbols of every entry lie within v2::kSpan columns.
  for (uint32_t e : d->entries) {
    const std::string s = entry_string(e);
    const size_t first = s.find_first_not_of('0'), last = s.find_last_not_of('0');
    if (first != std::string::npos) {
      ASSERT_LT(last - first, static_cast<size_t>(v2::kSpan)) << s;
    }
  }
}

TEST(FittedDictionary, RejectsBadParameters) {
  EXPECT_THROW(v2_dictionary(0.0), InvalidArgument);
  EXPECT_THROW(v2_dictionary(1.0), InvalidArgument);
  EXPECT_THROW(v2_dictionary(std::nan("")), InvalidArgument);
  EXPECT_THROW(v2_dictionary(0.885, 64), InvalidArgument);
  EXPECT_THROW(v2_dictionary(0.885, 0), InvalidArgument);
}

TEST(FittedDictionary, FittedZeroFraction) {
  EXPECT_EQ(fitted_p0_for(0.885), 57.0 / 64);
  EXPECT_EQ(fitted_p0_for(0.2), 0.5);
  EXPECT_EQ(fitted_p0_for(1.0), 63.0 / 64);
  EXPECT_EQ(fitted_p0_for(0.0), 0.5);
}

// Independent decoder of the greedy tree parse: the codes of a row, decoded entry by entry with
// entry_string(), give back the row (the last entry padded with zeros).
TEST(EncodeV2, CodesSpellTheRow) {
  for (int64_t cols : {1, 2, 40, 62, 63, 64, 127, 3072}) {
    const auto t = random_ternary(5, cols, 0.885, static_cast<uint64_t>(cols));
    const auto m = encode(t, {.codec = Codec::kV2});
    ASSERT_TRUE(m.dictionary);
    for (int64_t r = 0; r < t.rows; ++r) {
      std::string got;
      for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i)
        got += entry_string(m.dictionary->entries[m.codes[i]]);
      std::string want;
      for (int64_t c = 0; c < cols; ++c) want += static_cast<char>('0' + t.symbols[r * cols + c]);
      ASSERT_GE(got.size(), want.size());
      EXPECT_EQ(got.substr(0, want.size()), want) << "cols " << cols << " row " << r;
      EXPECT_EQ(got.find_first_not_of('0', want.size()), std::string::npos);
      EXPECT_LT(got.size() - want.size(), 63u);
    }
  }
}

// Closer to the entropy than qmoe-v1 at every sparsity; at P(0) = 0.885 within 7% of it.
TEST(EncodeV2, SmallerThanV1AndNearTheEntropy) {
  for (double p0 : {0.8, 0.885, 0.92, 0.95}) {
    const auto t = random_ternary(256, 3072, p0, 31);
    const double v1 = encode(t, {.codec = Codec::kV1}).view().bits_per_weight(true);
    const double v2 = encode(t, {.codec = Codec::kV2}).view().bits_per_weight(true);
    const double h = order0_entropy(p0);
    SCOPED_TRACE(testing::Message() << "p0 " << p0 << " v1 " << v1 << " v2 " << v2 << " H " << h);
    EXPECT_LT(v2, v1);
    EXPECT_GT(v2, h * 0.99);  // sampling noise only
    if (p0 == 0.885) {
      EXPECT_LT(v2, 1.07 * h);
      EXPECT_LT(v2, 0.91 * v1);
    }
    if (p0 == 0.95) {
      EXPECT_LT(v2, 0.7 * v1);
    }
  }
}

TEST(EncodeV2, ExplicitDictionaryParameters) {
  const auto t = random_ternary(16, 500, 0.885, 4);
  const auto a = encode(t, {.codec = Codec::kV2, .v2_max_width = 32, .fitted_p0 = 0.9});
  EXPECT_EQ(a.dictionary.get(), v2_dictionary(0.9, 32).get());
  for (uint32_t e : a.dictionary->entries) ASSERT_LE(v2::entry_width(e), 32);
  std::vector<uint8_t> back(t.symbols.size());
  decode_symbols_ref(a.view(), back.data());
  EXPECT_EQ(back, t.symbols);
}

// ---- validation --------------------------------------------------------------------------------

CompressedMatrix sample_v2() {
  return encode(random_ternary(4, 61, 0.885, 5), {.codec = Codec::kV2});
}

// A matrix holding its own copy of a dictionary, so that tests may break it.
struct OwnDictionary {
  CompressedMatrix m;
  std::vector<uint32_t> dict;
  CompressedView view() {
    CompressedView v = m.view();
    v.dictionary = dict;
    v.dictionary_id = v2_dictionary_id(dict);
    return v;
  }
};

OwnDictionary own(const CompressedMatrix& m) {
  return {m, m.dictionary->entries};
}

// Index of an entry of width w whose slots satisfy pred.
template <class Pred>
uint16_t find_entry(const std::vector<uint32_t>& d, Pred&& pred) {
  for (size_t i = 0; i < d.size(); ++i)
    if (pred(d[i])) return static_cast<uint16_t>(i);
  ADD_FAILURE() << "no such entry";
  return 0;
}

TEST(ValidateV2, RowsOfTheWrongLength) {
  auto m = sample_v2();
  // One more code in row 0: the row decodes past its width.
  m.codes.insert(m.codes.begin(), m.codes[0]);
  for (size_t r = 1; r < m.row_offsets.size(); ++r) ++m.row_offsets[r];
  EXPECT_THROW(validate(m.view(), "x"), FormatError);
  auto n = sample_v2();
  n.codes.erase(n.codes.begin());  // row 0 one code short
  for (size_t r = 1; r < n.row_offsets.size(); ++r) --n.row_offsets[r];
  try {
    validate(n.view(), "f.safetensors: tensor 'w'");
    FAIL() << "no error";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("f.safetensors: tensor 'w'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("row 0"), std::string::npos) << e.what();
  }
}

TEST(ValidateV2, NonZeroSymbolPastTheRowEnd) {
  // A 1-column row coded by an entry whose non-zero symbol lies at column 1.
  TernaryMatrix t(1, 1);
  t.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f)};
  auto m = encode(t, {.codec = Codec::kV2});
  ASSERT_EQ(m.codes.size(), 1u);
  EXPECT_NO_THROW(validate(m.view()));
  m.codes[0] = find_entry(m.dictionary->entries, [](uint32_t e) {
    return v2::slot_symbol(e, 0) != 0 && v2::slot_col(e, 0) == 1;
  });
  EXPECT_THROW(validate(m.view()), FormatError);
}

// The reference decoder stays inside the row even for a dictionary nobody validated: an entry
// whose slot columns go backwards is an error, not a write past the row (ASan build in CI).
TEST(ValidateV2, DecoderRejectsAnUnvalidatedEntryWithoutWritingPastTheRow) {
  OwnDictionary o = own(sample_v2());
  const uint32_t w6 = uint32_t{6} << v2::kWidthShift;
  o.dict[0] = w6 | 5u | (3u << 6) | (1u << v2::kLowShift) | (1u << (v2::kLowShift + 1));
  o.m.rows = 1;
  o.m.cols = 6;
  o.m.codes = {0};
  o.m.row_offsets = {0, 1};
  o.m.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f)};
  std::vector<uint8_t> sym(6);
  std::vector<float> dense(6);
  EXPECT_THROW(decode_symbols_ref(o.view(), sym.data()), FormatError);
  EXPECT_THROW(decode_ref(o.view(), dense.data()), FormatError);
  EXPECT_THROW(validate(o.view()), FormatError);
}

TEST(ValidateV2, BrokenDictionaries) {
  auto expect_bad = [](OwnDictionary o, size_t i, uint32_t word, const char* what) {
    o.dict[i] = word;
    try {
      validate(o.view(), "x");
      ADD_FAILURE() << what << ": no error";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("entry " + std::to_string(i)), std::string::npos)
          << what << ": " << e.what();
    }
  };
  const auto base = own(sample_v2());
  const uint32_t w5 = uint32_t{5} << v2::kWidthShift;
  expect_bad(base, 7, 0, "width 0");
  expect_bad(base, 8, w5 | 5u | (1u << v2::kLowShift), "slot at the width");
  expect_bad(base, 9, w5 | (1u << v2::kLowShift) | (1u << v2::kHighShift), "low and high");
  expect_bad(base, 10, w5 | 3u | (3u << 6) | (1u << v2::kLowShift) | (1u << (v2::kLowShift + 1)),
             "columns not increasing");
  expect_bad(base, 11, w5 | (1u << (v2::kLowShift + 1)) | (2u << 6), "slot 1 without slot 0");
  expect_bad(base, 12, w5 | 2u, "unused slot with a column");
  expect_bad(base, 13, w5 | (1u << 24), "reserved bits");
  // A dictionary that is not 65536 entries, and an id that does not match.
  auto shortd = base;
  shortd.dict.pop_back();
  EXPECT_THROW(validate(shortd.view()), FormatError);
  auto o = base;
  CompressedView v = o.view();
  v.dictionary_id ^= 1;
  EXPECT_THROW(validate(v), FormatError);
}

}  // namespace
}  // namespace qmoe

namespace qmoe {
namespace {

// validate() checks code rows a codeword at a time; the reference decoder walks them a symbol at a
// time. On random code streams (mostly malformed) they must accept and reject the same rows, with
// the same message.
TEST(Validate, CodewordChecksAgreeWithTheDecoder) {
  std::mt19937_64 rng(5);
  const auto dict = v2_dictionary(0.885);
  int accepted[2] = {0, 0};
  for (int trial = 0; trial < 4000; ++trial) {
    const bool v2 = trial % 2 == 1;
    const int64_t cols = 1 + static_cast<int64_t>(rng() % 90);
    const int n = 1 + static_cast<int>(rng() % 6);
    CompressedMatrix m;
    m.codec = v2 ? Codec::kV2 : Codec::kV1;
    m.rows = 1;
    m.cols = cols;
    m.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f)};
    // Codes drawn from the most frequent entries (long runs, few non-zero symbols) and from all.
    for (int i = 0; i < n; ++i)
      m.codes.push_back(static_cast<uint16_t>(rng() % (rng() % 2 ? 64 : 65536)));
    m.row_offsets = {0, n};
    if (v2) m.dictionary = dict;
    std::string check_error, decode_error;
    try {
      validate(m.view(), "x");
    } catch (const FormatError& e) {
      check_error = e.what();
    }
    std::vector<uint8_t> sym(static_cast<size_t>(cols));
    try {
      decode_symbols_ref(m.view(), sym.data());
    } catch (const FormatError& e) {
      decode_error = std::string("x: ") + e.what();
    }
    ASSERT_EQ(check_error, decode_error) << (v2 ? "qmoe-v2" : "qmoe-v1") << " trial " << trial;
    accepted[v2] += check_error.empty();
  }
  EXPECT_GT(accepted[0], 20);  // both outcomes were exercised
  EXPECT_GT(accepted[1], 20);
}

}  // namespace
}  // namespace qmoe
