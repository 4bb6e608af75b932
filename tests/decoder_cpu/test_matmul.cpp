// qmoe_decoder_cpu against the reference decoder (format/reference.h): every SIMD level this CPU
// runs, levels near the float range, thread-count bit-identity, unit vectors, grouped expert
// routings, the qmoe-g4 int8 kernel, level selection and bad arguments. Every codec over shapes
// that are not a multiple of any tile, batches 1..70, y = Wx and y += Wx with sentinels around
// every output, exactly on integer inputs: the conformance suite (tests/codec/test_conformance.cpp,
// CpuKernels).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/core/cpu_env.h"
#include "qmoe/core/gemm.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"

namespace qmoe::cpu {
namespace {

// Normalised error sum((y - ref)^2) / sum(ref^2) allowed for an fp32 kernel against the double
// reference. fp32 sums of k terms carry ~sqrt(k) * 2^-24 relative error; 1e-9 leaves a wide
// margin at the widths tested while catching any misplaced or dropped symbol (>= 1e-4 typically).
constexpr double kMaxNmse = 1e-9;
// Written around and between outputs; must survive every call.
constexpr float kSentinel = -12345.678f;

const SimdLevel kLevels[] = {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512};

using test::random_ternary;

CompressedMatrix make(int64_t rows, int64_t cols, double p_zero, uint64_t seed, Codec codec) {
  EncodeOptions o;
  o.codec = codec;
  CompressedMatrix m = encode(random_ternary(rows, cols, p_zero, seed), o);
  validate(m.view());
  return m;
}

std::vector<float> random_vec(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

double nmse(const float* y, const float* ref, int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    num += (static_cast<double>(y[i]) - ref[i]) * (static_cast<double>(y[i]) - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (den == 0.0) return num;  // all-zero reference: demand (near) exact zeros
  return num / den;
}

// out[t * rows + r] = (W x_t)[r] by the reference decoder.
std::vector<float> ref_products(const CompressedView& w, const std::vector<float>& x, int64_t n,
                                int64_t ldx) {
  std::vector<float> out(static_cast<size_t>(n * w.rows));
  for (int64_t t = 0; t < n; ++t) matvec_ref(w, x.data() + t * ldx, out.data() + t * w.rows);
  return out;
}

std::string codec_str(Codec c) {
  return std::string(codec_name(c));
}

class Levels : public ::testing::TestWithParam<SimdLevel> {
 protected:
  void SetUp() override {
    if (!simd_level_supported(GetParam())) {
      GTEST_SKIP() << "SIMD level " << simd_level_name(GetParam())
                   << " is not supported on this CPU";
    }
    opt_.simd = GetParam();
    // Float inputs everywhere but in the int8 tests below: the tests compare every codec with
    // the reference at fp32 precision.
    opt_.int8_activations = false;
  }
  MatmulOptions opt_;
};

struct Shape {
  int64_t rows, cols;
  double p_zero;
};

const Shape kShapes[] = {
    {1, 1, 0.5},     {1, 2, 0.0},    {1, 97, 0.885}, {97, 1, 0.5},      {13, 29, 0.885},
    {31, 28, 0.885}, {17, 257, 0.0}, {9, 300, 1.0},  {33, 1001, 0.885}, {70, 3071, 0.885},
    {5, 64, 0.3},    {0, 17, 0.885}, {12, 0, 0.885}, {67, 768, 0.95},   {3, 5000, 0.6},
};

// Levels near the float range: W x is small although level * (sum of inputs) is not a float. The
// kernels form a row's result in double, as the reference does (found by fuzz_decoder).
TEST_P(Levels, LevelsNearTheFloatRangeDoNotOverflow) {
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kV3, Codec::kG4, Codec::kP5}) {
    SCOPED_TRACE(codec_str(codec));
    TernaryMatrix t(2, 40);
    for (int64_t r = 0; r < 2; ++r) {
      t.symbols[r * 40 + 3] = 1;   // low
      t.symbols[r * 40 + 17] = 2;  // high
      t.levels[2 * r] = float_to_bf16(-3.0e38f);
      t.levels[2 * r + 1] = float_to_bf16(3.0e38f);
    }
    EncodeOptions o;
    o.codec = codec;
    const CompressedMatrix m = encode(t, o);
    std::vector<float> x(40, 0.0f);
    x[3] = 2.0f;
    x[17] = 2.0f;  // -3e38 * 2 + 3e38 * 2: each product overflows a float, the sum is 0
    std::vector<float> ref(2), y(2, -1.0f);
    matvec_ref(m.view(), x.data(), ref.data());
    matvec(m.view(), x.data(), y.data(), opt_);
    for (int r = 0; r < 2; ++r) {
      ASSERT_TRUE(std::isfinite(y[r])) << "row " << r;
      EXPECT_EQ(y[r], ref[r]) << "row " << r;
    }
    std::vector<float> x3(3 * 40);  // the list path, 3 tokens
    for (int k = 0; k < 3; ++k) std::copy(x.begin(), x.end(), x3.begin() + 40 * k);
    std::vector<float> y3(6, -1.0f);
    matmul(m.view(), 3, x3.data(), 40, y3.data(), 2, opt_);
    for (float v : y3) EXPECT_EQ(v, ref[0]);
  }
}

TEST_P(Levels, BitIdenticalForAnyThreadCount) {
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kV3, Codec::kG4, Codec::kP5}) {
    const CompressedMatrix m = make(517, 1029, 0.885, 11, codec);
    for (int64_t n : {1, 5, 32, 40}) {
      SCOPED_TRACE(codec_str(codec) + " n=" + std::to_string(n));
      const std::vector<float> x = random_vec(n * 1029, 12);
      std::vector<float> first;
      for (int threads : {1, 2, 3, 4, 7}) {
        MatmulOptions o = opt_;
        o.threads = threads;
        std::vector<float> y(static_cast<size_t>(n * 517));
        matmul(m.view(), n, x.data(), 1029, y.data(), 517, o);
        if (first.empty()) {
          first = y;
        } else {
          ASSERT_EQ(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)), 0)
              << threads << " threads";
        }
      }
    }
  }
}

// A decoded matrix has only the values lo, 0, hi: single-column inputs pick them out exactly.
TEST_P(Levels, UnitVectorsPickOutColumnsExactly) {
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kV3, Codec::kG4}) {
    const CompressedMatrix m = make(19, 61, 0.885, 21, codec);
    std::vector<float> dense(19 * 61);
    decode_ref(m.view(), dense.data());
    for (int64_t c = 0; c < 61; ++c) {
      std::vector<float> x(61, 0.0f);
      x[c] = 1.0f;
      std::vector<float> y(19);
      matvec(m.view(), x.data(), y.data(), opt_);
      for (int64_t r = 0; r < 19; ++r)
        ASSERT_EQ(y[r], dense[r * 61 + c]) << codec_str(codec) << " row " << r << " column " << c;
    }
  }
}

// One MoE layer: expert e takes tokens tok[e], outputs scaled by router probabilities and summed
// over each token's experts (down projection), or written to per-assignment slots (up projection).
TEST_P(Levels, GroupedSkewedRoutings) {
  const int64_t num_tokens = 53, d_in = 77, d_out = 39, num_experts = 9;
  std::vector<CompressedMatrix> w;
  for (int64_t e = 0; e < num_experts; ++e) {
    const Codec codecs[] = {Codec::kV1, Codec::kV2, Codec::kV3, Codec::kP5, Codec::kG4};
    w.push_back(make(d_out, d_in, 0.885, 300 + e, codecs[e % 5]));
  }
  const std::vector<float> x = random_vec(num_tokens * d_in, 5);
  std::mt19937_64 rng(99);
  // Routings: one expert takes almost every token; every token to expert 0; top-2 random; none.
  for (int routing = 0; routing < 4; ++routing) {
    SCOPED_TRACE("routing " + std::to_string(routing));
    std::vector<std::vector<int32_t>> tok(num_experts);
    std::vector<std::vector<float>> prob(num_experts);
    for (int32_t t = 0; t < num_tokens; ++t) {
      std::vector<int64_t> chosen;
      if (routing == 0) chosen = {t < 51 ? 4 : 7};
      if (routing == 1) chosen = {0};
      if (routing == 2) {
        const int64_t a = static_cast<int64_t>(rng() % num_experts);
        const int64_t b = (a + 1 + static_cast<int64_t>(rng() % (num_experts - 1))) % num_experts;
        chosen = {a, b};
      }
      for (int64_t e : chosen) {
        tok[e].push_back(t);
        prob[e].push_back(0.25f + 0.5f * static_cast<float>(rng() % 1000) / 1000.0f);
      }
    }
    // Reference: y[t] = sum over its experts of p * W_e x_t, in item order.
    std::vector<float> want(static_cast<size_t>(num_tokens * d_out), 0.0f);
    std::vector<float> tmp(d_out);
    for (int64_t e = 0; e < num_experts; ++e) {
      for (size_t i = 0; i < tok[e].size(); ++i) {
        matvec_ref(w[e].view(), x.data() + tok[e][i] * d_in, tmp.data());
        for (int64_t r = 0; r < d_out; ++r) want[tok[e][i] * d_out + r] += prob[e][i] * tmp[r];
      }
    }
    std::vector<ExpertBatch> items;
    for (int64_t e = 0; e < num_experts; ++e) items.push_back({w[e].view(), tok[e], {}, prob[e]});
    const int64_t ldy = d_out + 2;
    std::vector<float> buf(static_cast<size_t>(num_tokens * ldy + 32), kSentinel);
    float* y = buf.data() + 16;
    for (int64_t t = 0; t < num_tokens; ++t) {
      for (int64_t r = 0; r < d_out; ++r) y[t * ldy + r] = 0.0f;
    }
    MatmulOptions o = opt_;
    o.accumulate = true;
    grouped_matmul(items, x.data(), num_tokens, d_in, y, num_tokens, ldy, o);
    for (int64_t t = 0; t < num_tokens; ++t) {
      EXPECT_LE(nmse(y + t * ldy, want.data() + t * d_out, d_out), kMaxNmse) << "token " << t;
      ASSERT_EQ(y[t * ldy + d_out], kSentinel);
      ASSERT_EQ(y[t * ldy + d_out + 1], kSentinel);
    }
    ASSERT_EQ(buf[15], kSentinel);
    ASSERT_EQ(buf[buf.size() - 16], kSentinel);

    // Up projection: assignment slots (expert-major), no scaling, plain writes.
    std::vector<ExpertBatch> up;
    std::vector<std::vector<int32_t>> slots(num_experts);
    int32_t next = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      for (size_t i = 0; i < tok[e].size(); ++i) slots[e].push_back(next++);
      up.push_back({w[e].view(), tok[e], slots[e], {}});
    }
    std::vector<float> h(static_cast<size_t>(std::max(next, 1) * d_out), kSentinel);
    grouped_matmul(up, x.data(), num_tokens, d_in, h.data(), next, d_out, opt_);
    for (int64_t e = 0; e < num_experts; ++e) {
      for (size_t i = 0; i < tok[e].size(); ++i) {
        matvec_ref(w[e].view(), x.data() + tok[e][i] * d_in, tmp.data());
        EXPECT_LE(nmse(h.data() + slots[e][i] * d_out, tmp.data(), d_out), kMaxNmse);
      }
    }
  }
}

// Experts of different heights (spanning several 64-row blocks, one shorter than a block), one of
// them with more tokens than a single sweep over its codes takes (8 passes of 32), top-2
// accumulation into shared output rows: matches the reference, and is bit-identical for any
// thread count.
TEST_P(Levels, GroupedUnevenExpertsAnyThreadCount) {
  const int64_t num_tokens = 300, d_in = 131;
  const int64_t heights[] = {200, 45, 129, 64, 67, 131};
  const int64_t d_out = 200;  // >= every height; lower experts leave the rest of a row alone
  std::vector<CompressedMatrix> w;
  for (size_t e = 0; e < std::size(heights); ++e) {
    w.push_back(make(heights[e], d_in, 0.885, 500 + e,
                     e == 3   ? Codec::kP5
                     : e == 4 ? Codec::kV3
                     : e == 5 ? Codec::kG4
                              : (e % 2 ? Codec::kV2 : Codec::kV1)));
  }
  const std::vector<float> x = random_vec(num_tokens * d_in, 8);
  // Expert 0 takes every token (two sweeps); the others a strided subset.
  std::vector<std::vector<int32_t>> tok(std::size(heights));
  std::vector<std::vector<float>> prob(std::size(heights));
  for (int32_t t = 0; t < num_tokens; ++t) {
    tok[0].push_back(t);
    prob[0].push_back(0.5f + 0.001f * static_cast<float>(t % 7));
    const size_t e = 1 + static_cast<size_t>(t % 5) % 3;
    if (t % 5 != 4) {
      tok[e].push_back(t);
      prob[e].push_back(0.25f + 0.01f * static_cast<float>(t % 11));
    }
    if (t % 7 == 3) {  // the qmoe-v3 expert (an odd height)
      tok[4].push_back(t);
      prob[4].push_back(0.75f);
    }
    if (t % 3 != 1) {  // the qmoe-g4 expert (not a multiple of 4 rows)
      tok[5].push_back(t);
      prob[5].push_back(0.5f);
    }
  }
  std::vector<float> want(static_cast<size_t>(num_tokens * d_out), 0.0f);
  std::vector<float> tmp(static_cast<size_t>(d_out));
  for (size_t e = 0; e < std::size(heights); ++e) {
    for (size_t i = 0; i < tok[e].size(); ++i) {
      matvec_ref(w[e].view(), x.data() + tok[e][i] * d_in, tmp.data());
      for (int64_t r = 0; r < heights[e]; ++r) want[tok[e][i] * d_out + r] += prob[e][i] * tmp[r];
    }
  }
  std::vector<ExpertBatch> items;
  for (size_t e = 0; e < std::size(heights); ++e)
    items.push_back({w[e].view(), tok[e], {}, prob[e]});
  std::vector<float> first;
  for (int threads : {1, 2, 3, 5}) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    MatmulOptions o = opt_;
    o.threads = threads;
    o.accumulate = true;
    std::vector<float> y(static_cast<size_t>(num_tokens * d_out), 0.0f);
    grouped_matmul(items, x.data(), num_tokens, d_in, y.data(), num_tokens, d_out, o);
    for (int64_t t = 0; t < num_tokens; ++t) {
      ASSERT_LE(nmse(y.data() + t * d_out, want.data() + t * d_out, d_out), kMaxNmse)
          << "token " << t;
    }
    if (first.empty()) {
      first = y;
    } else {
      ASSERT_EQ(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)), 0);
    }
  }
}

// The levels whose qmoe-g4 single-token kernels take int8 inputs on this CPU.
std::vector<SimdLevel> g4_int8_levels() {
  std::vector<SimdLevel> v;
  for (SimdLevel l : kLevels) {
    if (g4_int8_supported(l)) v.push_back(l);
  }
  return v;
}

// qmoe-g4 at one token with int8 inputs (the default at the avx2 and avx512 levels): the input is
// rounded to int8 at the scale 127 / max|x|, so each output is within half a quantization step per
// weight of the reference, sum_c |W[r][c]| * max|x| / 254 (plus float rounding: the integer sums
// are exact, the levels and the scale are applied in double). The test checks that bound row by
// row, that the kernel did run (the outputs differ from the float path's), and that every level's
// int8 kernel gives the same bits (the avx2 kernel and, on CPUs with AVX-512 VBMI, VBMI2, VNNI and
// GFNI, the avx512 one).
TEST(DecoderCpu, G4Int8WithinHalfAQuantizationStepPerWeight) {
  const std::vector<SimdLevel> levels = g4_int8_levels();
  if (levels.empty()) GTEST_SKIP() << "no AVX2: qmoe-g4 has no int8 kernel on this CPU";
  for (SimdLevel level : levels) {
    SCOPED_TRACE(simd_level_name(level));
    MatmulOptions int8, fp32;
    int8.simd = fp32.simd = level;
    fp32.int8_activations = false;
    uint64_t seed = 1000;
    int differ = 0;
    for (const Shape& s : kShapes) {
      for (int outlier = 0; outlier < 2; ++outlier) {
        SCOPED_TRACE(std::to_string(s.rows) + "x" + std::to_string(s.cols) +
                     " p0=" + std::to_string(s.p_zero) + (outlier ? " with an outlier" : ""));
        const CompressedMatrix m = make(s.rows, s.cols, s.p_zero, seed, Codec::kG4);
        std::vector<float> x = random_vec(s.cols, seed + 1);
        ++seed;
        if (outlier && s.cols > 0) x[static_cast<size_t>(s.cols / 2)] = 40.0f;
        float amax = 0.0f;
        for (float v : x) amax = std::max(amax, std::fabs(v));
        std::vector<float> dense(static_cast<size_t>(s.rows * s.cols));
        decode_ref(m.view(), dense.data());
        const std::vector<float> ref = ref_products(m.view(), x, 1, s.cols);
        std::vector<float> buf(static_cast<size_t>(s.rows + 32), kSentinel),
            yf(static_cast<size_t>(s.rows));
        float* y = buf.data() + 16;
        matvec(m.view(), x.data(), y, int8);
        matvec(m.view(), x.data(), yf.data(), fp32);
        if (level != levels[0]) {
          int8.simd = levels[0];
          std::vector<float> y0(static_cast<size_t>(s.rows));
          matvec(m.view(), x.data(), y0.data(), int8);
          int8.simd = level;
          // (no memcmp of an empty vector: its data() may be null)
          ASSERT_TRUE(y0.empty() || std::memcmp(y0.data(), y, y0.size() * sizeof(float)) == 0)
              << "the int8 kernels of " << simd_level_name(levels[0]) << " and "
              << simd_level_name(level) << " differ";
        }
        for (int64_t r = 0; r < s.rows; ++r) {
          double w_abs = 0.0, wx_abs = 0.0;
          for (int64_t c = 0; c < s.cols; ++c) {
            const double w = dense[static_cast<size_t>(r * s.cols + c)];
            w_abs += std::fabs(w);
            wx_abs += std::fabs(w * x[static_cast<size_t>(c)]);
          }
          const double bound = w_abs * amax / 254.0 * (1.0 + 1e-6) + 1e-6 * wx_abs + 1e-30;
          ASSERT_LE(std::fabs(static_cast<double>(y[r]) - ref[static_cast<size_t>(r)]), bound)
              << "row " << r;
          differ += y[r] != yf[static_cast<size_t>(r)];
        }
        for (int i = 0; i < 16; ++i) {
          ASSERT_EQ(buf[static_cast<size_t>(i)], kSentinel) << "write before y";
          ASSERT_EQ(buf[static_cast<size_t>(s.rows + 16 + i)], kSentinel) << "write after y";
        }
      }
    }
    EXPECT_GT(differ, 100) << "the int8 kernel did not run";
  }
}

// The int8 kernels' integer sums at their largest: every input at max|x|, and in each row group
// one row with every symbol non-zero and three without any, so that every token of the group is
// a symbol of that row; rows long enough that a group takes hundreds of steps (the avx2 kernel's
// int16 sums, up to 2 * 127 a step, are folded into int32 before they can overflow). Each row's
// sum is exact: 127 * cols in int8 units, or 0.
TEST(DecoderCpu, G4Int8LargestSumsAreExact) {
  const std::vector<SimdLevel> levels = g4_int8_levels();
  if (levels.empty()) GTEST_SKIP() << "no AVX2: qmoe-g4 has no int8 kernel on this CPU";
  const int64_t rows = 6, cols = 6007;
  TernaryMatrix t(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    if (r % 4 == 0) {
      for (int64_t c = 0; c < cols; ++c) t.symbols[r * cols + c] = r == 0 ? 2 : 1;
    }
    t.levels[2 * r] = float_to_bf16(-0.5f);
    t.levels[2 * r + 1] = float_to_bf16(2.0f);
  }
  EncodeOptions eo;
  eo.codec = Codec::kG4;
  const CompressedMatrix m = encode(t, eo);
  for (float sign : {1.0f, -1.0f}) {
    const std::vector<float> x(static_cast<size_t>(cols), sign * 3.0f);
    std::vector<float> ref(rows);
    matvec_ref(m.view(), x.data(), ref.data());
    for (SimdLevel level : levels) {
      SCOPED_TRACE(simd_level_name(level));
      MatmulOptions o;
      o.simd = level;
      std::vector<float> y(rows);
      matvec(m.view(), x.data(), y.data(), o);
      for (int64_t r = 0; r < rows; ++r) {
        const double want = r % 4 != 0 ? 0.0 : (r == 0 ? 2.0 : -0.5) * sign * 3.0 * cols;
        ASSERT_EQ(ref[static_cast<size_t>(r)], want) << "row " << r;
        ASSERT_NEAR(y[static_cast<size_t>(r)], want, std::fabs(want) * 1e-6) << "row " << r;
      }
    }
  }
}

// The int8 path is bit-identical for any thread count, inside grouped calls too, and inputs with a
// NaN or an infinity take the float path (propagating them as the reference does).
TEST(DecoderCpu, G4Int8ThreadsGroupedAndNonFiniteInputs) {
  const std::vector<SimdLevel> levels = g4_int8_levels();
  if (levels.empty()) GTEST_SKIP() << "no AVX2: qmoe-g4 has no int8 kernel on this CPU";
  for (SimdLevel level : levels) {
    SCOPED_TRACE(simd_level_name(level));
    const CompressedMatrix m = make(517, 1029, 0.885, 31, Codec::kG4);
    std::vector<float> x = random_vec(1029, 32);
    std::vector<float> first;
    for (int threads : {1, 2, 3, 5}) {
      MatmulOptions o;
      o.simd = level;
      o.threads = threads;
      std::vector<float> y(517);
      matvec(m.view(), x.data(), y.data(), o);
      if (first.empty()) {
        first = y;
      } else {
        ASSERT_EQ(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)), 0) << threads;
      }
      // The same product as one item of a grouped call.
      const int32_t row0 = 0;
      const ExpertBatch item[] = {{m.view(), {&row0, 1}, {}, {}}};
      std::vector<float> yg(517);
      grouped_matmul(item, x.data(), 1, 1029, yg.data(), 1, 517, o);
      ASSERT_EQ(std::memcmp(first.data(), yg.data(), yg.size() * sizeof(float)), 0) << threads;
      // Scaled and accumulated (517 rows: the last group has one row): y + s * (W x), the
      // product scaled in float and then added, as the kernels do.
      const float scale = 0.3f;
      const ExpertBatch scaled[] = {{m.view(), {&row0, 1}, {}, {&scale, 1}}};
      std::vector<float> ya = random_vec(517, 33), want = ya;
      for (size_t r = 0; r < want.size(); ++r) want[r] += first[r] * scale;
      MatmulOptions acc = o;
      acc.accumulate = true;
      grouped_matmul(scaled, x.data(), 1, 1029, ya.data(), 1, 517, acc);
      ASSERT_EQ(std::memcmp(want.data(), ya.data(), ya.size() * sizeof(float)), 0) << threads;
    }
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      x[500] = bad;
      MatmulOptions int8, fp32;
      int8.simd = fp32.simd = level;
      fp32.int8_activations = false;
      std::vector<float> y(517), yf(517), ref(517);
      matvec(m.view(), x.data(), y.data(), int8);
      matvec(m.view(), x.data(), yf.data(), fp32);
      matvec_ref(m.view(), x.data(), ref.data());
      for (int64_t r = 0; r < 517; ++r) {
        ASSERT_EQ(std::isnan(y[r]), std::isnan(ref[r])) << "row " << r;
        ASSERT_EQ(std::isinf(y[r]), std::isinf(ref[r])) << "row " << r;
        ASSERT_EQ(std::memcmp(&y[r], &yf[r], sizeof(float)), 0) << "row " << r;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DecoderCpu, Levels, ::testing::ValuesIn(kLevels),
                         [](const ::testing::TestParamInfo<SimdLevel>& i) {
                           return std::string(simd_level_name(i.param));
                         });

// Levels agree with each other to fp32 rounding; the best level is what calls use by default
// (unless QMOE_CPU_SIMD says otherwise).
TEST(DecoderCpu, LevelsAndDefaults) {
  EXPECT_TRUE(simd_level_supported(SimdLevel::kScalar));
  EXPECT_TRUE(simd_level_supported(best_simd_level()));
  EXPECT_EQ(simd_level_from_name("avx2"), SimdLevel::kAvx2);
  EXPECT_EQ(simd_level_from_name("sse"), std::nullopt);
  const SimdLevel before = simd_level();
  set_simd_level(SimdLevel::kScalar);
  EXPECT_EQ(simd_level(), SimdLevel::kScalar);
  // The one process-wide level: the GEMM of core (gptq's Hessians and GPTQ, the forward pass)
  // follows set_simd_level() too.
  EXPECT_EQ(gemm_level(), "portable");
  EXPECT_EQ(cpu_simd(), "scalar");
  set_simd_level(before);
  EXPECT_EQ(cpu_simd(), simd_level_name(before));
  if (before != SimdLevel::kScalar) {
    EXPECT_EQ(gemm_level(), simd_level_name(before));
  }
  for (SimdLevel l : kLevels) {
    if (!simd_level_supported(l)) {
      EXPECT_THROW(set_simd_level(l), InvalidArgument);
    }
  }
}

// Run by ctest a second time with QMOE_CPU_SIMD=scalar (tests/decoder_cpu/CMakeLists.txt).
TEST(DecoderCpu, EnvironmentPicksTheDefaultLevel) {
  const char* env = std::getenv("QMOE_CPU_SIMD");
  if (env == nullptr || *env == '\0') GTEST_SKIP() << "QMOE_CPU_SIMD is not set in this run";
  ASSERT_TRUE(simd_level_from_name(env).has_value()) << env;
  EXPECT_EQ(simd_level(), *simd_level_from_name(env));
}

TEST(DecoderCpu, InvalidArguments) {
  const CompressedMatrix m = make(8, 20, 0.885, 3, Codec::kV1);
  std::vector<float> x(200, 1.0f), y(200, kSentinel);
  EXPECT_THROW(matmul(m.view(), 2, x.data(), 19, y.data(), 8), InvalidArgument);
  EXPECT_THROW(matmul(m.view(), 2, x.data(), 20, y.data(), 7), InvalidArgument);
  EXPECT_THROW(matmul(m.view(), -1, x.data(), 20, y.data(), 8), InvalidArgument);
  CompressedView bad = m.view();
  bad.levels = bad.levels.subspan(1);
  EXPECT_THROW(matvec(bad, x.data(), y.data()), InvalidArgument);
  // A codec the kernels do not know is refused, not run by another codec's kernels.
  CompressedView unknown = m.view();
  unknown.codec = static_cast<Codec>(kCodecs.size());
  try {
    matvec(unknown, x.data(), y.data());
    ADD_FAILURE() << "a matrix of an unknown codec was run";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no CPU kernels"), std::string::npos) << e.what();
  }
  bad = m.view();
  bad.row_offsets = bad.row_offsets.subspan(0, 8);
  EXPECT_THROW(matvec(bad, x.data(), y.data()), InvalidArgument);

  const std::vector<int32_t> rows_ok = {0, 1}, rows_bad = {0, 5};
  const std::vector<float> one_scale = {1.0f};
  const ExpertBatch oob_in[] = {{m.view(), rows_bad, {}, {}}};
  EXPECT_THROW(grouped_matmul(oob_in, x.data(), 5, 20, y.data(), 10, 8), InvalidArgument);
  const ExpertBatch oob_out[] = {{m.view(), rows_ok, rows_bad, {}}};
  EXPECT_THROW(grouped_matmul(oob_out, x.data(), 5, 20, y.data(), 5, 8), InvalidArgument);
  const ExpertBatch bad_scale[] = {{m.view(), rows_ok, {}, one_scale}};
  EXPECT_THROW(grouped_matmul(bad_scale, x.data(), 5, 20, y.data(), 5, 8), InvalidArgument);
  for (float v : y) ASSERT_EQ(v, kSentinel) << "a rejected call wrote output";
}

// The qmoe-v2 tables are cached by dictionary id; a view that carries another dictionary under an
// id already seen (as a crafted XXH3 collision would) still gets tables of its own dictionary.
TEST(DecoderCpu, V2DictionariesWithTheSameIdKeepTheirOwnTables) {
  const CompressedMatrix a = make(40, 300, 0.885, 91, Codec::kV2);
  EncodeOptions o;
  o.codec = Codec::kV2;
  o.fitted_p0 = 0.95;
  const CompressedMatrix b = encode(random_ternary(40, 300, 0.95, 92), o);
  ASSERT_NE(a.dictionary->id, b.dictionary->id);
  const std::vector<float> x = random_vec(300, 93);
  for (SimdLevel l : kLevels) {
    if (!simd_level_supported(l)) continue;
    SCOPED_TRACE(std::string(simd_level_name(l)));
    MatmulOptions opt;
    opt.simd = l;
    for (int64_t n : {1, 9}) {
      std::vector<float> xs(static_cast<size_t>(n * 300));
      for (int64_t t = 0; t < n; ++t) std::copy(x.begin(), x.end(), xs.begin() + t * 300);
      std::vector<float> y(static_cast<size_t>(n * 40));
      matmul(a.view(), n, xs.data(), 300, y.data(), 40, opt);  // caches a's tables under a's id
      CompressedView forged = b.view();
      forged.dictionary_id = a.dictionary->id;
      matmul(forged, n, xs.data(), 300, y.data(), 40, opt);
      const std::vector<float> ref = ref_products(b.view(), xs, n, 300);
      EXPECT_LE(nmse(y.data(), ref.data(), n * 40), kMaxNmse) << "tokens " << n;
    }
  }
}

// Batches of several passes decode the codes once per 8 passes of 32 tokens; a long batch (and
// a wide matrix) exercises that loop. Labelled slow when it exceeds a few seconds.
TEST(DecoderCpu, LargeBatchAllLevels) {
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kV3, Codec::kG4}) {
    const CompressedMatrix m = make(96, 4099, 0.885, 77, codec);
    const int64_t n = 300;
    const std::vector<float> x = random_vec(n * 4099, 78);
    const std::vector<float> ref = ref_products(m.view(), x, n, 4099);
    for (SimdLevel l : kLevels) {
      if (!simd_level_supported(l)) continue;
      SCOPED_TRACE(std::string(simd_level_name(l)));
      MatmulOptions o;
      o.simd = l;
      std::vector<float> y(static_cast<size_t>(n * 96));
      matmul(m.view(), n, x.data(), 4099, y.data(), 96, o);
      EXPECT_LE(nmse(y.data(), ref.data(), n * 96), kMaxNmse) << codec_str(codec);
    }
  }
}

// qmoe-g4's batch path decodes a group into the same lists at every level (tokens one by one,
// 16 a step with AVX2, 64 with AVX-512 VBMI2) and sums them in the same order: the same bits.
// Escape-heavy and escape-free matrices, groups that start at odd tokens and end mid-step, a
// padded last group, and rows past 65535 columns (the scalar decoder's other branch).
TEST(DecoderCpu, G4BatchSameBitsAtEveryLevel) {
  const Shape shapes[] = {{67, 768, 0.885}, {13, 29, 0.99},  {6, 300, 1.0},
                          {9, 97, 0.0},     {3, 70001, 0.9}, {31, 1001, 0.97}};
  for (const Shape& s : shapes) {
    const CompressedMatrix m = make(s.rows, s.cols, s.p_zero, 91, Codec::kG4);
    for (int64_t n : {2, 8, 33}) {
      SCOPED_TRACE(std::to_string(s.rows) + "x" + std::to_string(s.cols) +
                   " p0=" + std::to_string(s.p_zero) + " n=" + std::to_string(n));
      const std::vector<float> x = random_vec(n * s.cols, 92);
      std::vector<float> first;
      for (SimdLevel l : kLevels) {
        if (!simd_level_supported(l)) continue;
        MatmulOptions o;
        o.simd = l;
        std::vector<float> y(static_cast<size_t>(n * s.rows));
        matmul(m.view(), n, x.data(), s.cols, y.data(), s.rows, o);
        if (first.empty()) {
          first = y;
          const std::vector<float> ref = ref_products(m.view(), x, n, s.cols);
          EXPECT_LE(nmse(y.data(), ref.data(), n * s.rows), kMaxNmse);
        } else if (!y.empty()) {
          EXPECT_EQ(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)), 0)
              << simd_level_name(l);
        }
      }
    }
  }
}

}  // namespace
}  // namespace qmoe::cpu
