#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"

namespace qmoe {
namespace {

TEST(Ternarize, RoundToNearestRule) {
  // Row 0: lo = -1, hi = 2; thresholds -0.5 and 1.
  // Row 1: all zero -> lo = -1, hi = +1, all symbols 0.
  // Row 2: non-negative -> lo = 0 (no low symbols), hi = 4.
  const std::vector<float> w = {-1.0f, -0.5f, -0.49f, 0.0f, 1.0f, 1.01f, 2.0f,
                                0.0f,  0.0f,  0.0f,   0.0f, 0.0f, 0.0f,  0.0f,
                                0.0f,  1.0f,  2.0f,   2.5f, 4.0f, 0.1f,  1.99f};
  const auto t = ternarize_rtn(w.data(), 3, 7);
  const std::vector<uint8_t> want = {1, 0, 0, 0, 0, 2, 2,  //
                                     0, 0, 0, 0, 0, 0, 0,  //
                                     0, 0, 0, 2, 2, 0, 0};
  EXPECT_EQ(t.symbols, want);
  EXPECT_EQ(bf16_to_float(t.levels[0]), -1.0f);
  EXPECT_EQ(bf16_to_float(t.levels[1]), 2.0f);
  EXPECT_EQ(bf16_to_float(t.levels[2]), -1.0f);
  EXPECT_EQ(bf16_to_float(t.levels[3]), 1.0f);
  EXPECT_EQ(bf16_to_float(t.levels[4]), 0.0f);
  EXPECT_EQ(bf16_to_float(t.levels[5]), 4.0f);
}

TEST(Ternarize, LevelsAreBf16RoundedExtremes) {
  const std::vector<float> w = {-0.123456f, 0.3f, 0.987654f};
  const auto t = ternarize_rtn(w.data(), 1, 3);
  EXPECT_EQ(t.levels[0], float_to_bf16(-0.123456f));
  EXPECT_EQ(t.levels[1], float_to_bf16(0.987654f));
  // 0.3 <= hi/2 (~0.4941) -> 0.
  EXPECT_EQ(t.symbols[1], 0);
}

TEST(Ternarize, HalfPrecisionInputsMatchFloat) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 0.02f);
  const int64_t rows = 31, cols = 77;
  std::vector<float> f(rows * cols);
  std::vector<uint16_t> h(f.size()), b(f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    // Values exactly representable in both fp16 and bf16 so that all three inputs are equal.
    const float v = bf16_to_float(float_to_bf16(n(rng)));
    f[i] = fp16_to_float(float_to_fp16(v));
    h[i] = float_to_fp16(f[i]);
    b[i] = float_to_bf16(f[i]);
  }
  const auto tf = ternarize_rtn(f.data(), rows, cols);
  const auto th = ternarize_rtn(h.data(), DType::kF16, rows, cols);
  const auto tb = ternarize_rtn(b.data(), DType::kBF16, rows, cols);
  EXPECT_EQ(tf.symbols, th.symbols);
  EXPECT_EQ(tf.symbols, tb.symbols);
  EXPECT_EQ(tf.levels, th.levels);
  EXPECT_EQ(tf.levels, tb.levels);
  EXPECT_GT(tf.zero_fraction(), 0.3);
}

TEST(Ternarize, RowStride) {
  const std::vector<float> w = {1, -1, 99, -2, 2, 99};
  const auto t = ternarize_rtn(w.data(), DType::kF32, 2, 2, 3);
  EXPECT_EQ(t.symbols, (std::vector<uint8_t>{2, 1, 1, 2}));
}

TEST(Ternarize, Errors) {
  std::vector<float> w = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_THROW(ternarize_rtn(w.data(), 1, 2), InvalidArgument);
  w[1] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(ternarize_rtn(w.data(), 1, 2), InvalidArgument);
  const std::vector<int32_t> ints = {1, 2};
  EXPECT_THROW(ternarize_rtn(ints.data(), DType::kI32, 1, 2), InvalidArgument);
  EXPECT_THROW(ternarize_rtn(ints.data(), DType::kF32, 1, 2, 1), InvalidArgument);
}

TEST(Bf16, ConversionsRoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(float_to_bf16(1.00390625f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.01171875f), 0x3f82);  // 1 + 3*2^-8: tie, rounds up to even
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(float_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(fp16_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(fp16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);  // overflows to inf
  for (uint32_t h = 0; h < 0x7c00; ++h)
    EXPECT_EQ(float_to_fp16(fp16_to_float(static_cast<uint16_t>(h))), h);
}

}  // namespace
}  // namespace qmoe
