// qmoe-g4: the worked example of format/SPEC.md 4.5.6 byte for byte, gaps of every length around
// the escape, its size against the other codecs, the automatic codec choice per target, and
// validation of malformed streams. Round trips over shapes and densities and row slices are checked
// for every codec by the conformance suite (test_conformance.cpp).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
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

std::vector<uint8_t> decoded(const CompressedView& v) {
  std::vector<uint8_t> s(static_cast<size_t>(v.rows * v.cols));
  decode_symbols_ref(v, s.data());
  return s;
}

TernaryMatrix spec_example() {
  TernaryMatrix t(5, 6);
  const char* rows[5] = {"000000", "100000", "000001", "200000", "002200"};
  for (int r = 0; r < 5; ++r) {
    for (int c = 0; c < 6; ++c) t.symbols[static_cast<size_t>(6 * r + c)] = rows[r][c] - '0';
    t.levels[static_cast<size_t>(2 * r)] = float_to_bf16(-0.5f);
    t.levels[static_cast<size_t>(2 * r + 1)] = float_to_bf16(0.25f);
  }
  return t;
}

TEST(G4, SpecExample) {
  const TernaryMatrix t = spec_example();
  const CompressedMatrix m = encode(t, {.codec = Codec::kG4});
  EXPECT_EQ(m.codec, Codec::kG4);
  EXPECT_EQ(m.tokens, (std::vector<uint8_t>{0x11, 0x3f, 0x38}));
  EXPECT_EQ(m.kinds, (std::vector<uint8_t>{0x1a}));
  EXPECT_EQ(m.group_offsets, (std::vector<int32_t>{0, 0, 4, 3, 6, 5}));
  EXPECT_NO_THROW(validate(m.view(), "example"));
  EXPECT_EQ(decoded(m.view()), t.symbols);
  // The accessors of codec_layout.h read the same stream.
  const int want[6] = {1, 1, 15, 3, 8, 3};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(g4::token(m.tokens.data(), i), want[i]) << i;
  EXPECT_EQ(g4::kind_bit(m.kinds.data(), 1), 1);
  EXPECT_EQ(g4::kind_bit(m.kinds.data(), 2), 0);
}

// One non-zero symbol after every gap length around the escape (0..47 zeros, and a long one):
// the tokens are exactly Z / 15 escapes and Z mod 15.
TEST(G4, GapsAroundTheEscape) {
  for (int64_t zeros : {0, 1, 13, 14, 15, 16, 29, 30, 31, 44, 45, 46, 47, 1000}) {
    SCOPED_TRACE(zeros);
    // A group of 4 rows whose only non-zero symbol is at position `zeros` (row zeros % 4, column
    // zeros / 4).
    const int64_t cols = zeros / 4 + 1;
    TernaryMatrix t(4, cols);
    t.symbols[static_cast<size_t>((zeros % 4) * cols + zeros / 4)] = 2;
    for (auto& l : t.levels) l = float_to_bf16(0.0f);
    const CompressedMatrix m = encode(t, {.codec = Codec::kG4});
    const int64_t tokens = m.group_offsets[2];
    ASSERT_EQ(tokens, zeros / 15 + 1);
    for (int64_t i = 0; i + 1 < tokens; ++i) EXPECT_EQ(g4::token(m.tokens.data(), i), 15);
    EXPECT_EQ(g4::token(m.tokens.data(), tokens - 1), zeros % 15);
    EXPECT_EQ(m.kinds, (std::vector<uint8_t>{1}));
    ASSERT_EQ(decoded(m.view()), t.symbols);
  }
}

// At QMoE's statistics the codes take ~0.663 bits per weight (SPEC 4.5): fewer than qmoe-v2 and
// qmoe-v3, and the group offsets 64 bits per 4 rows.
TEST(G4, SizeAtQmoeStatistics) {
  const TernaryMatrix t = random_ternary(256, 3072, 0.885, 7);
  const CompressedMatrix g4m = encode(t, {.codec = Codec::kG4});
  const double codes = g4m.view().bits_per_weight(true);
  EXPECT_NEAR(codes, 0.663, 0.01);
  EXPECT_LT(codes, encode(t, {.codec = Codec::kV2}).view().bits_per_weight(true));
  EXPECT_LT(codes, encode(t, {.codec = Codec::kV3}).view().bits_per_weight(true));
  EXPECT_EQ(g4m.group_offsets.size(), static_cast<size_t>(2 * (256 / 4 + 1)));
}

// The automatic choice follows the target; a matrix too dense for the target's codec takes
// qmoe-p5 whatever the target.
TEST(G4, AutomaticCodecPerTarget) {
  EXPECT_EQ(auto_codec(Target::kAny), Codec::kV1);
  EXPECT_EQ(auto_codec(Target::kCpu), Codec::kG4);
  EXPECT_EQ(auto_codec(Target::kGpu), Codec::kV2);
  const TernaryMatrix sparse = random_ternary(64, 256, 0.885, 3);
  EXPECT_EQ(encode(sparse, {}).codec, Codec::kV1);
  EXPECT_EQ(encode(sparse, {.codec = std::nullopt, .target = Target::kAny}).codec, Codec::kV1);
  EXPECT_EQ(encode(sparse, {.codec = std::nullopt, .target = Target::kCpu}).codec, Codec::kG4);
  EXPECT_EQ(encode(sparse, {.codec = std::nullopt, .target = Target::kGpu}).codec, Codec::kV2);
  const TernaryMatrix dense = random_ternary(64, 256, 0.3, 4);
  for (Target target : {Target::kAny, Target::kCpu, Target::kGpu})
    EXPECT_EQ(encode(dense, {.codec = std::nullopt, .target = target}).codec, Codec::kP5)
        << target_name(target);
  // An explicit codec wins over the target.
  EXPECT_EQ(encode(sparse, {.codec = Codec::kV3, .target = Target::kCpu}).codec, Codec::kV3);
  // transcode() follows the target too, and keeps the symbols.
  const CompressedMatrix v1m = encode(sparse, {});
  const CompressedMatrix g = transcode(v1m.view(), {.codec = std::nullopt, .target = Target::kCpu});
  EXPECT_EQ(g.codec, Codec::kG4);
  EXPECT_EQ(decoded(g.view()), sparse.symbols);
  EXPECT_EQ(target_from_name("cpu"), Target::kCpu);
  EXPECT_EQ(target_from_name("CPU"), std::nullopt);
}

// Every check of SPEC 4.5.3 / 4.5.5 on a hand-built stream: one mutation each, all rejected by
// validate() (and, for the stream checks a decoder meets, by decode_symbols_ref()).
TEST(G4, RejectsMalformedStreams) {
  const CompressedMatrix good = encode(spec_example(), {.codec = Codec::kG4});
  ASSERT_NO_THROW(validate(good.view(), "good"));
  struct Case {
    const char* what;
    std::function<void(CompressedMatrix&)> mutate;
    bool decoder_sees_it;  // a decoder of a view meets it too (not only whole-matrix rules)
  };
  const std::vector<Case> cases = {
      // Group 0's tokens 1, 1, 15, 3 become 1, 1, 3, 15.
      {"a group ending with an escape", [](CompressedMatrix& m) { m.tokens[1] = 0xf3; }, true},
      // Group 0's last token 3 (position 22) becomes 14: position 33 of 24.
      {"a position past the group's end", [](CompressedMatrix& m) { m.tokens[1] = 0xef; }, true},
      {"more non-zero symbols than kind bits",
       [](CompressedMatrix& m) { m.group_offsets[3] = 2; },  // group 0 has 3 non-zero symbols
       true},
      {"kind bits left over", [](CompressedMatrix& m) { m.group_offsets[3] = 4; }, true},
      {"a non-zero symbol in a padding row",
       [](CompressedMatrix& m) { m.tokens[2] = 0x39; },  // group 1: 9 -> row 5 of 5
       true},
      {"offsets not starting at 0", [](CompressedMatrix& m) { m.group_offsets[0] = 1; }, false},
      {"token offsets decreasing", [](CompressedMatrix& m) { m.group_offsets[2] = 7; }, true},
      {"kind offsets decreasing", [](CompressedMatrix& m) { m.group_offsets[5] = 2; }, true},
      {"tokens of the wrong size", [](CompressedMatrix& m) { m.tokens.push_back(0); }, false},
      {"kinds of the wrong size", [](CompressedMatrix& m) { m.kinds.push_back(0); }, false},
      {"offsets past the token stream", [](CompressedMatrix& m) { m.group_offsets[4] = 7; }, true},
      {"offsets past the kind stream", [](CompressedMatrix& m) { m.group_offsets[5] = 9; }, true},
      {"a non-zero unused kind bit", [](CompressedMatrix& m) { m.kinds[0] |= 0x80; }, false},
      {"group_offsets of the wrong size", [](CompressedMatrix& m) { m.group_offsets.resize(4); },
       true},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    CompressedMatrix m = good;
    c.mutate(m);
    EXPECT_THROW(validate(m.view(), "bad"), FormatError);
    if (c.decoder_sees_it) {
      std::vector<uint8_t> s(static_cast<size_t>(m.rows * m.cols));
      EXPECT_THROW(decode_symbols_ref(m.view(), s.data()), FormatError);
    }
  }
  // A non-zero unused nibble: T odd needs a matrix with an odd token count.
  TernaryMatrix t(4, 4);
  t.symbols[0] = 1;  // one token
  for (auto& l : t.levels) l = float_to_bf16(0.0f);
  CompressedMatrix odd = encode(t, {.codec = Codec::kG4});
  ASSERT_EQ(odd.group_offsets[2], 1);
  ASSERT_NO_THROW(validate(odd.view(), "odd"));
  odd.tokens[0] |= 0x50;
  EXPECT_THROW(validate(odd.view(), "odd"), FormatError);
}

}  // namespace
}  // namespace qmoe
