#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"

namespace qmoe {
namespace {

using test::random_ternary;

// Straightforward greedy longest-match encoder over a map of the dictionary's sequences, written
// independently of the trie encoder: it is what QMoE's encoder computes.
class MapEncoder {
 public:
  MapEncoder() {
    const int32_t* t = v1_decode_table();
    for (int e = 0; e < v1::kEntries; ++e) {
      std::string seq;
      const int n = v1::entry_pairs(static_cast<uint32_t>(t[2 * e]));
      for (int k = 0; k < n; ++k) {
        const uint32_t w = static_cast<uint32_t>(t[2 * e + k / 7]);
        seq.push_back(static_cast<char>(v1::pair_s0(w, k % 7) + 3 * v1::pair_s1(w, k % 7)));
      }
      index_[seq] = e;
    }
  }
  std::vector<uint16_t> encode_row(const uint8_t* s, int64_t cols) const {
    std::vector<uint16_t> out;
    std::string cur;
    for (int64_t c = 0; c < cols; c += 2) {
      const char v = static_cast<char>(s[c] + 3 * (c + 1 < cols ? s[c + 1] : 0));
      auto ext = cur;
      ext.push_back(v);
      if (index_.count(ext)) {
        cur = std::move(ext);
      } else {
        out.push_back(static_cast<uint16_t>(index_.at(cur)));
        cur = std::string(1, v);
      }
    }
    if (!cur.empty()) out.push_back(static_cast<uint16_t>(index_.at(cur)));
    return out;
  }

 private:
  std::map<std::string, int> index_;
};

TEST(EncodeV1, EqualsPlainGreedyEncoding) {
  static const MapEncoder reference;
  for (double pz : {0.5, 0.8, 0.885, 0.95, 0.99}) {
    for (int64_t cols : {1, 2, 3, 27, 28, 29, 57, 768}) {
      const auto t = random_ternary(7, cols, pz, static_cast<uint64_t>(cols * 1000 + pz * 100));
      const auto m = encode(t, {.codec = Codec::kV1});
      ASSERT_EQ(m.row_offsets.size(), 8u);
      for (int64_t r = 0; r < t.rows; ++r) {
        const auto want = reference.encode_row(t.symbols.data() + r * cols, cols);
        const std::vector<uint16_t> got(m.codes.begin() + m.row_offsets[r],
                                        m.codes.begin() + m.row_offsets[r + 1]);
        ASSERT_EQ(got, want) << "pz " << pz << " cols " << cols << " row " << r;
      }
    }
  }
}

void expect_round_trip(const TernaryMatrix& t, std::optional<Codec> codec) {
  const auto m = encode(t, {.codec = codec});
  const auto v = m.view();
  ASSERT_NO_THROW(validate(v, "round trip"));
  std::vector<uint8_t> sym(t.symbols.size(), 9);
  decode_symbols_ref(v, sym.data());
  ASSERT_EQ(sym, t.symbols) << t.rows << "x" << t.cols;
  std::vector<float> dense(t.symbols.size());
  decode_ref(v, dense.data());
  ASSERT_EQ(dense, t.to_dense());
}

TEST(V1EntryWords, SpellTheSameSymbolsAsTheDecodeTable) {
  const int32_t* t = v1_decode_table();
  const uint32_t* words = v1_entry_words();
  for (int e = 0; e < v1::kEntries; ++e) {
    std::vector<int> want;  // the entry's symbols from the pair table
    const int n = v1::entry_pairs(static_cast<uint32_t>(t[2 * e]));
    for (int k = 0; k < n; ++k) {
      const uint32_t w = static_cast<uint32_t>(t[2 * e + k / 7]);
      want.push_back(v1::pair_s0(w, k % 7));
      want.push_back(v1::pair_s1(w, k % 7));
    }
    const uint32_t w = words[e];
    std::vector<int> got(static_cast<size_t>(v2::entry_width(w)), 0);
    int prev = -1;
    for (int j = 0; j < v2::kSlots; ++j) {
      const int sym = v2::slot_symbol(w, j);
      if (sym == 0) {
        ASSERT_EQ(v2::slot_col(w, j), 0) << "entry " << e << " slot " << j;
        continue;
      }
      ASSERT_GT(v2::slot_col(w, j), prev) << "entry " << e << ": slots in column order";
      prev = v2::slot_col(w, j);
      ASSERT_LT(prev, static_cast<int>(got.size())) << "entry " << e;
      got[static_cast<size_t>(prev)] = sym;
    }
    ASSERT_EQ(got, want) << "entry " << e;
    ASSERT_EQ(w & (3u << 24), 0u) << "entry " << e << ": reserved bits";
  }
}

TEST(RoundTrip, ManyShapesAndSparsities) {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},      {1, 2},   {2, 1},    {1, 3},
                                                {3, 5},      {17, 29}, {64, 768}, {5, 3071},
                                                {1, 100000}, {100, 1}};
  uint64_t seed = 1;
  for (auto [r, c] : shapes) {
    for (double pz : {0.5, 0.8, 0.885, 0.92, 0.95, 0.99, 1.0, 0.0}) {
      const auto t = random_ternary(r, c, pz, seed++);
      for (auto codec : {std::optional<Codec>{}, std::optional<Codec>{Codec::kV1},
                         std::optional<Codec>{Codec::kV2}, std::optional<Codec>{Codec::kP5}}) {
        SCOPED_TRACE(testing::Message() << r << "x" << c << " pz " << pz);
        expect_round_trip(t, codec);
      }
    }
  }
}

TEST(RoundTrip, EmptyMatrices) {
  for (auto [r, c] : {std::pair<int64_t, int64_t>{0, 0}, {0, 5}, {3, 0}}) {
    TernaryMatrix t(r, c);
    for (int64_t i = 0; i < r; ++i) {
      t.levels[2 * i] = float_to_bf16(-1.0f);
      t.levels[2 * i + 1] = float_to_bf16(1.0f);
    }
    expect_round_trip(t, Codec::kV1);
    expect_round_trip(t, Codec::kV2);
    expect_round_trip(t, Codec::kP5);
  }
}

TEST(RoundTrip, LargeSwitchShape) {
  const auto t = random_ternary(4096, 14336, 0.885, 42);
  expect_round_trip(t, std::nullopt);
}

TEST(Encode, SameBytesForAnyThreadCount) {
  const auto t = random_ternary(333, 1001, 0.885, 7);
  const auto a = encode(t, {.codec = Codec::kV1, .threads = 1});
  for (int threads : {2, 3, 8}) {
    const auto b = encode(t, {.codec = Codec::kV1, .threads = threads});
    EXPECT_EQ(a.codes, b.codes) << threads;
    EXPECT_EQ(a.row_offsets, b.row_offsets) << threads;
    const auto v2a = encode(t, {.codec = Codec::kV2, .threads = 1});
    const auto v2b = encode(t, {.codec = Codec::kV2, .threads = threads});
    EXPECT_EQ(v2a.codes, v2b.codes) << threads;
    EXPECT_EQ(v2a.row_offsets, v2b.row_offsets) << threads;
    const auto c = encode(t, {.codec = Codec::kP5, .threads = threads});
    EXPECT_EQ(c.packed, encode(t, {.codec = Codec::kP5, .threads = 1}).packed);
  }
  EXPECT_EQ(v1_code_count(t, 1), static_cast<int64_t>(a.codes.size()));
  EXPECT_EQ(v1_code_count(t, 3), static_cast<int64_t>(a.codes.size()));
}

TEST(Encode, AutomaticCodecChoice) {
  // Sparse data: the dictionary wins. Dense data: the dictionary expands (~3 bits/weight at 50%
  // zeros), so the 1.6-bit packing is chosen.
  EXPECT_EQ(encode(random_ternary(64, 768, 0.885, 3)).codec, Codec::kV1);
  const auto dense = encode(random_ternary(64, 768, 0.5, 4));
  EXPECT_EQ(dense.codec, Codec::kP5);
  EXPECT_NEAR(dense.view().bits_per_weight(true), 1.6, 0.01);
  EXPECT_GT(
      encode(random_ternary(64, 768, 0.5, 4), {.codec = Codec::kV1}).view().bits_per_weight(true),
      2.5);
}

TEST(Encode, BitsPerWeightAtSwitchSparsity) {
  // The dictionary was built for P(0) = 0.885: ~0.74 bits per weight for the codes, ~0.76 with
  // offsets and levels, against an order-0 entropy of ~0.63.
  const auto t = random_ternary(768, 3072, 0.885, 11);
  const auto v = encode(t, {.codec = Codec::kV1});
  EXPECT_NEAR(v.view().bits_per_weight(true), 0.74, 0.015);
  EXPECT_NEAR(v.view().bits_per_weight(false), 0.76, 0.015);
}

TEST(Encode, RejectsBadSymbols) {
  auto t = random_ternary(3, 4, 0.5, 1);
  t.symbols[5] = 3;
  EXPECT_THROW(encode(t), InvalidArgument);
  auto u = random_ternary(3, 4, 0.5, 1);
  u.levels.pop_back();
  EXPECT_THROW(encode(u), InvalidArgument);
}

// ---- validation of malformed streams ----------------------------------------------------------

CompressedMatrix sample_v1() {
  return encode(random_ternary(4, 61, 0.885, 5), {.codec = Codec::kV1});
}

TEST(Validate, AcceptsEncoderOutput) {
  EXPECT_NO_THROW(validate(sample_v1().view(), "x"));
}

TEST(Validate, RowDecodingToMoreColumns) {
  auto m = sample_v1();
  // Replace row 0's first code with the longest all-zero entry (14 pairs) repeated: too long.
  m.codes.insert(m.codes.begin(), 25);
  for (size_t r = 1; r < m.row_offsets.size(); ++r) ++m.row_offsets[r];
  EXPECT_THROW(validate(m.view(), "x"), FormatError);
}

TEST(Validate, RowDecodingToFewerColumns) {
  auto m = sample_v1();
  m.codes.erase(m.codes.begin() + m.row_offsets[1] - 1);
  for (size_t r = 1; r < m.row_offsets.size(); ++r) --m.row_offsets[r];
  try {
    validate(m.view(), "f.safetensors: tensor 'w'");
    FAIL() << "no error";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("f.safetensors: tensor 'w'"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("row 0"), std::string::npos) << e.what();
  }
}

TEST(Validate, OffsetsOutOfOrderOrOutOfRange) {
  auto m = sample_v1();
  std::swap(m.row_offsets[1], m.row_offsets[2]);
  EXPECT_THROW(validate(m.view()), FormatError);
  auto n = sample_v1();
  n.row_offsets.back() += 1;
  EXPECT_THROW(validate(n.view()), FormatError);
  auto o = sample_v1();
  o.row_offsets[0] = 1;
  EXPECT_THROW(validate(o.view()), FormatError);
  auto p = sample_v1();
  p.row_offsets.pop_back();
  EXPECT_THROW(validate(p.view()), FormatError);
}

TEST(Validate, NonZeroSymbolPastOddWidth) {
  // Width 1: the single pair's s1 must be 0. Entry 14 is the pair (0, 1).
  TernaryMatrix t(1, 1);
  t.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f)};
  auto m = encode(t, {.codec = Codec::kV1});
  ASSERT_EQ(m.codes.size(), 1u);
  m.codes[0] = 14;
  EXPECT_THROW(validate(m.view()), FormatError);
}

TEST(Validate, BadLevels) {
  auto m = sample_v1();
  m.levels[2] = float_to_bf16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_THROW(validate(m.view()), FormatError);
  auto n = sample_v1();
  n.levels[0] = float_to_bf16(0.5f);  // lo > 0
  EXPECT_THROW(validate(n.view()), FormatError);
  auto o = sample_v1();
  o.levels[3] = float_to_bf16(std::numeric_limits<float>::infinity());
  EXPECT_THROW(validate(o.view()), FormatError);
}

TEST(Validate, P5BadBytes) {
  auto m = encode(random_ternary(3, 7, 0.5, 9), {.codec = Codec::kP5});
  auto bad = m;
  bad.packed[0] = 243;
  EXPECT_THROW(validate(bad.view()), FormatError);
  auto pad = m;
  pad.packed[1] = static_cast<uint8_t>(pad.packed[1] + 27);  // columns 5,6 + padding symbol 3
  EXPECT_THROW(validate(pad.view()), FormatError);
  auto shortm = m;
  shortm.packed.pop_back();
  EXPECT_THROW(validate(shortm.view()), FormatError);
}

TEST(MatvecRef, MatchesDenseProduct) {
  const auto t = random_ternary(37, 101, 0.885, 12);
  const auto m = encode(t);
  std::vector<float> x(101);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i));
  std::vector<float> y(37);
  matvec_ref(m.view(), x.data(), y.data());
  const auto w = t.to_dense();
  for (int r = 0; r < 37; ++r) {
    double acc = 0;
    for (int c = 0; c < 101; ++c) acc += static_cast<double>(w[r * 101 + c]) * x[c];
    EXPECT_EQ(y[r], static_cast<float>(acc));
  }
}

}  // namespace
}  // namespace qmoe
