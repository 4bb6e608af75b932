#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <vector>

#include "gptq_test_util.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/gptq/synthetic.h"

namespace qmoe {
namespace {

using test::make_problem;
using test::Problem;

double rel(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

bool same_bits(double a, double b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

struct Shape {
  int64_t rows, cols, blocksize;
  bool actorder;
};

class ReferenceTest : public ::testing::TestWithParam<Shape> {};

// Blocked GPTQ (float64) equals the unblocked reference: same symbols, loss to 1e-8; in float32
// the loss agrees to 1e-3 and at most 1% of the symbols differ (threshold decisions can flip on
// rounding, then diverge a little along the row).
TEST_P(ReferenceTest, MatchesUnblockedReference) {
  const Shape s = GetParam();
  const Problem p = make_problem(s.rows, s.cols, 3 * s.cols + 5, 11 + s.rows * 7 + s.cols);
  const auto ref = test::reference_gptq(p.w, p.rows, p.cols, p.h, 0.1, s.actorder);
  GptqOptions opt;
  opt.blocksize = s.blocksize;
  opt.actorder = s.actorder;
  opt.double_precision = true;
  const GptqResult d = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  ASSERT_EQ(d.status, GptqStatus::kOk) << d.reason;
  EXPECT_EQ(d.ternary.symbols, ref.symbols);
  EXPECT_LT(rel(d.loss, ref.loss), 1e-8) << d.loss << " vs " << ref.loss;

  opt.double_precision = false;
  const GptqResult f = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  ASSERT_EQ(f.status, GptqStatus::kOk) << f.reason;
  EXPECT_EQ(f.ternary.levels, d.ternary.levels);
  int64_t diff = 0;
  for (size_t i = 0; i < ref.symbols.size(); ++i) diff += f.ternary.symbols[i] != ref.symbols[i];
  EXPECT_LE(diff, static_cast<int64_t>(ref.symbols.size() / 100));
  EXPECT_LT(rel(f.loss, ref.loss), 1e-3) << f.loss << " vs " << ref.loss;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ReferenceTest,
                         ::testing::Values(Shape{1, 1, 128, false}, Shape{5, 7, 3, false},
                                           Shape{37, 50, 16, false}, Shape{37, 50, 16, true},
                                           Shape{64, 129, 128, false}, Shape{130, 200, 64, true},
                                           Shape{3, 300, 128, false}, Shape{17, 257, 256, true},
                                           Shape{129, 64, 1, false}));

TEST(Gptq, IdentityHessianIsRoundToNearest) {
  const int64_t rows = 41, cols = 133;
  std::vector<float> w = synthetic::weights(rows, cols, 5);
  for (int64_t c = 0; c < cols; ++c) w[3 * cols + c] = 0.0f;                       // zero row
  for (int64_t c = 0; c < cols; ++c) w[4 * cols + c] = std::abs(w[4 * cols + c]);  // no lo
  const TernaryMatrix rtn = ternarize_rtn(w.data(), rows, cols);
  for (const float scale : {1.0f, 3.5f}) {
    std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
    for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = scale;
    for (const bool dbl : {false, true}) {
      GptqOptions opt;
      opt.double_precision = dbl;
      opt.blocksize = 32;
      const GptqResult r = gptq_quantize(w.data(), rows, cols, h.data(), opt);
      EXPECT_EQ(r.status, GptqStatus::kOk);
      EXPECT_EQ(r.ternary.symbols, rtn.symbols) << "scale " << scale << " double " << dbl;
      EXPECT_EQ(r.ternary.levels, rtn.levels);
    }
  }
  const GptqResult fb = gptq_quantize(w.data(), rows, cols, nullptr);
  EXPECT_EQ(fb.status, GptqStatus::kFallbackRtn);
  EXPECT_EQ(fb.ternary.symbols, rtn.symbols);
  EXPECT_EQ(fb.ternary.levels, rtn.levels);
  const GptqResult r2 = rtn_quantize(w.data(), rows, cols);
  EXPECT_EQ(r2.ternary.symbols, rtn.symbols);
}

// loss = ||(W-Q) X^T||^2 / n + lambda/2 ||W-Q||^2 for H = (2/n) X^T X; output_loss is the first
// term.
TEST(Gptq, LossMatchesOutputError) {
  const Problem p = make_problem(70, 96, 400, 21);
  for (const bool dbl : {false, true}) {
    for (const bool act : {false, true}) {
      GptqOptions opt;
      opt.double_precision = dbl;
      opt.actorder = act;
      opt.blocksize = 40;
      const GptqResult r = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
      ASSERT_EQ(r.status, GptqStatus::kOk);
      const std::vector<float> q = r.ternary.to_dense();
      const double out =
          test::output_error(p.w, q, p.x, p.rows, p.cols, p.n) / static_cast<double>(p.n);
      double dd = 0;
      for (size_t i = 0; i < q.size(); ++i)
        dd += (static_cast<double>(p.w[i]) - q[i]) * (p.w[i] - q[i]);
      const double tol = dbl ? 1e-6 : 1e-3;
      EXPECT_LT(rel(r.loss, out + 0.5 * r.lambda * dd), tol) << "double " << dbl << " act " << act;
      EXPECT_LT(rel(r.output_loss, out), 10 * tol);
      EXPECT_GT(r.lambda, 0.0);
    }
  }
}

TEST(Gptq, SingularHessianFallsBack) {
  const int64_t rows = 9, cols = 20;
  const std::vector<float> w = synthetic::weights(rows, cols, 8);
  const TernaryMatrix rtn = ternarize_rtn(w.data(), rows, cols);
  // Indefinite: 2x2 blocks [[1, 2], [2, 1]] have eigenvalue -1, far below the dampening (0.1).
  std::vector<float> h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t i = 0; i < cols; i += 2) {
    h[i * cols + i] = h[(i + 1) * cols + i + 1] = 1.0f;
    h[i * cols + i + 1] = h[(i + 1) * cols + i] = 2.0f;
  }
  std::vector<float> nan_h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t i = 0; i < cols; ++i) nan_h[i * cols + i] = 1.0f;
  nan_h[3 * cols + 5] = nan_h[5 * cols + 3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> neg_h(static_cast<size_t>(cols * cols), 0.0f);
  for (int64_t i = 0; i < cols; ++i) neg_h[i * cols + i] = i == 4 ? -5.0f : 1.0f;
  for (const auto* hh : {&h, &nan_h, &neg_h}) {
    for (const bool dbl : {false, true}) {
      GptqOptions opt;
      opt.double_precision = dbl;
      const GptqResult r = gptq_quantize(w.data(), rows, cols, hh->data(), opt);
      EXPECT_EQ(r.status, GptqStatus::kFallbackRtn);
      EXPECT_TRUE(r.fallback());
      EXPECT_FALSE(r.reason.empty());
      EXPECT_EQ(r.ternary.symbols, rtn.symbols);
      EXPECT_EQ(r.ternary.levels, rtn.levels);
    }
  }
}

TEST(Gptq, EmptyHessianFallsBack) {
  const int64_t rows = 12, cols = 31;
  const std::vector<float> w = synthetic::weights(rows, cols, 9);
  const TernaryMatrix rtn = ternarize_rtn(w.data(), rows, cols);
  const std::vector<float> zero(static_cast<size_t>(cols * cols), 0.0f);
  for (const float* h : {static_cast<const float*>(nullptr), zero.data()}) {
    const GptqResult r = gptq_quantize(w.data(), rows, cols, h);
    EXPECT_EQ(r.status, GptqStatus::kFallbackRtn);
    EXPECT_FALSE(r.reason.empty());
    EXPECT_EQ(r.ternary.symbols, rtn.symbols);
    double dd = 0;
    const auto q = r.ternary.to_dense();
    for (size_t i = 0; i < q.size(); ++i) dd += (static_cast<double>(w[i]) - q[i]) * (w[i] - q[i]);
    EXPECT_NEAR(r.output_loss, 0.5 * dd, 1e-9 * dd);
    EXPECT_NEAR(r.loss, 0.55 * dd, 1e-9 * dd);
  }
}

TEST(Gptq, FromAccumulator) {
  const Problem p = make_problem(30, 45, 250, 25);
  HessianAccumulator acc(p.cols);
  acc.add(p.x.data(), p.n);
  const std::vector<float> h = acc.hessian();
  const GptqResult a = gptq_quantize(p.w.data(), p.rows, p.cols, acc);
  const GptqResult b = gptq_quantize(p.w.data(), p.rows, p.cols, h.data());
  EXPECT_EQ(a.status, GptqStatus::kOk);
  EXPECT_EQ(a.ternary.symbols, b.ternary.symbols);
  EXPECT_TRUE(same_bits(a.loss, b.loss));
  const GptqResult e = gptq_quantize(p.w.data(), p.rows, p.cols, HessianAccumulator(p.cols));
  EXPECT_EQ(e.status, GptqStatus::kFallbackRtn);
  EXPECT_THROW(gptq_quantize(p.w.data(), p.rows, p.cols, HessianAccumulator(p.cols + 1)),
               InvalidArgument);
  const CompressResult c = compress_matrix(p.w.data(), p.rows, p.cols, acc);
  EXPECT_EQ(c.status, GptqStatus::kOk);
  EXPECT_TRUE(same_bits(c.loss, a.loss));
}

TEST(Gptq, DeadInputsAreZeroed) {
  Problem p = make_problem(20, 40, 200, 31);
  for (int64_t t = 0; t < p.n; ++t) p.x[t * p.cols + 7] = p.x[t * p.cols + 22] = 0.0f;
  p.h = test::hessian_of(p.x, p.n, p.cols);
  GptqOptions opt;
  opt.double_precision = true;
  const GptqResult r = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  ASSERT_EQ(r.status, GptqStatus::kOk);
  EXPECT_EQ(r.dead_inputs, 2);
  for (int64_t row = 0; row < p.rows; ++row) {
    EXPECT_EQ(r.ternary.symbols[row * p.cols + 7], 0);
    EXPECT_EQ(r.ternary.symbols[row * p.cols + 22], 0);
  }
  const auto ref = test::reference_gptq(p.w, p.rows, p.cols, p.h, 0.1, false);
  EXPECT_EQ(r.ternary.symbols, ref.symbols);
}

TEST(Gptq, ActOrderRoundTrip) {
  const Problem p = make_problem(33, 90, 300, 41);
  GptqOptions opt;
  opt.double_precision = true;
  opt.blocksize = 25;
  opt.actorder = true;
  const GptqResult act = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  ASSERT_EQ(act.status, GptqStatus::kOk);
  // The same problem with columns permuted by hand (descending diag H), without act-order.
  std::vector<int64_t> perm(static_cast<size_t>(p.cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return p.h[a * p.cols + a] > p.h[b * p.cols + b]; });
  std::vector<float> wp(p.w.size()), hp(p.h.size());
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t k = 0; k < p.cols; ++k) wp[r * p.cols + k] = p.w[r * p.cols + perm[k]];
  }
  for (int64_t a = 0; a < p.cols; ++a) {
    for (int64_t b = 0; b < p.cols; ++b) hp[a * p.cols + b] = p.h[perm[a] * p.cols + perm[b]];
  }
  opt.actorder = false;
  const GptqResult plain = gptq_quantize(wp.data(), p.rows, p.cols, hp.data(), opt);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t k = 0; k < p.cols; ++k) {
      ASSERT_EQ(act.ternary.symbols[r * p.cols + perm[k]], plain.ternary.symbols[r * p.cols + k])
          << "row " << r << " col " << k;
    }
  }
  EXPECT_LT(rel(act.loss, plain.loss), 1e-9);
  // Act-order on an already sorted problem changes nothing, bit for bit.
  opt.actorder = true;
  opt.double_precision = false;
  const GptqResult a2 = gptq_quantize(wp.data(), p.rows, p.cols, hp.data(), opt);
  opt.actorder = false;
  const GptqResult p2 = gptq_quantize(wp.data(), p.rows, p.cols, hp.data(), opt);
  EXPECT_EQ(a2.ternary.symbols, p2.ternary.symbols);
  EXPECT_TRUE(same_bits(a2.loss, p2.loss));
}

TEST(Gptq, ThreadCountDeterminism) {
  // 300 rows = 3 row chunks, 600 columns = 3 Cholesky tiles.
  const Problem p = make_problem(300, 600, 700, 51);
  for (const GptqGrid grid : {GptqGrid::kTernary, GptqGrid::kUniform3}) {
    for (const bool act : {false, true}) {
      GptqOptions opt;
      opt.grid = grid;
      opt.actorder = act;
      opt.threads = 1;
      const GptqResult one = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
      ASSERT_EQ(one.status, GptqStatus::kOk);
      for (const int t : {2, 3}) {
        opt.threads = t;
        const GptqResult r = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
        EXPECT_EQ(r.ternary.symbols, one.ternary.symbols) << t << " threads";
        EXPECT_EQ(r.ternary.levels, one.ternary.levels);
        EXPECT_TRUE(same_bits(r.dequantized, one.dequantized));
        EXPECT_TRUE(same_bits(r.loss, one.loss)) << r.loss << " vs " << one.loss;
      }
    }
  }
}

TEST(Gptq, UniformGrids) {
  const Problem p = make_problem(48, 128, 600, 61);
  double prev = std::numeric_limits<double>::infinity();
  for (const auto& [grid, bits] :
       {std::pair{GptqGrid::kUniform2, 2}, std::pair{GptqGrid::kUniform3, 3},
        std::pair{GptqGrid::kUniform4, 4}}) {
    GptqOptions opt;
    opt.grid = grid;
    const GptqResult g = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
    const GptqResult r = rtn_quantize(p.w.data(), p.rows, p.cols, opt);
    ASSERT_EQ(g.dequantized.size(), p.w.size());
    EXPECT_TRUE(g.ternary.symbols.empty());
    const double eg = test::output_error(p.w, g.dequantized, p.x, p.rows, p.cols, p.n);
    const double er = test::output_error(p.w, r.dequantized, p.x, p.rows, p.cols, p.n);
    EXPECT_LT(eg, er) << bits << " bits";
    EXPECT_LT(eg, prev);
    prev = eg;
    for (int64_t row = 0; row < p.rows; ++row) {
      std::set<float> values(g.dequantized.begin() + row * p.cols,
                             g.dequantized.begin() + (row + 1) * p.cols);
      EXPECT_LE(values.size(), size_t{1} << bits);
    }
  }
}

TEST(Gptq, SymmetricTernary) {
  const Problem p = make_problem(40, 100, 500, 71);
  GptqOptions opt;
  opt.grid = GptqGrid::kTernarySymmetric;
  const GptqResult g = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  const GptqResult r = rtn_quantize(p.w.data(), p.rows, p.cols, opt);
  for (int64_t row = 0; row < p.rows; ++row) {
    EXPECT_EQ(bf16_to_float(g.ternary.levels[2 * row]),
              -bf16_to_float(g.ternary.levels[2 * row + 1]));
  }
  EXPECT_EQ(g.ternary.levels, r.ternary.levels);
  const double eg = test::output_error(p.w, g.ternary.to_dense(), p.x, p.rows, p.cols, p.n);
  const double er = test::output_error(p.w, r.ternary.to_dense(), p.x, p.rows, p.cols, p.n);
  EXPECT_LT(eg, er);
}

TEST(Gptq, EdgeShapesAndInvalidArguments) {
  const std::vector<float> one = {0.25f}, h1 = {2.0f};
  const GptqResult r = gptq_quantize(one.data(), 1, 1, h1.data());
  EXPECT_EQ(r.status, GptqStatus::kOk);
  EXPECT_EQ(r.ternary.symbols, std::vector<uint8_t>{2});
  const GptqResult e0 = gptq_quantize(nullptr, 0, 5, nullptr);
  EXPECT_EQ(e0.ternary.rows, 0);
  EXPECT_EQ(e0.ternary.cols, 5);
  const std::vector<float> w3(3, 1.0f);
  const GptqResult e1 = gptq_quantize(w3.data(), 3, 0, nullptr);
  EXPECT_EQ(e1.ternary.levels.size(), 6u);

  const Problem p = make_problem(4, 6, 20, 81);
  GptqOptions bad;
  bad.percdamp = -1;
  EXPECT_THROW(gptq_quantize(p.w.data(), 4, 6, p.h.data(), bad), InvalidArgument);
  bad = {};
  bad.blocksize = 0;
  EXPECT_THROW(gptq_quantize(p.w.data(), 4, 6, p.h.data(), bad), InvalidArgument);
  EXPECT_THROW(gptq_quantize(p.w.data(), -1, 6, p.h.data()), InvalidArgument);
  EXPECT_THROW(gptq_quantize(nullptr, 4, 6, p.h.data()), InvalidArgument);
  std::vector<float> wn = p.w;
  wn[5] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(gptq_quantize(wn.data(), 4, 6, p.h.data()), InvalidArgument);
  // Block sizes 1 and larger than the matrix give the same result as the default (float64).
  GptqOptions o;
  o.double_precision = true;
  const GptqResult base = gptq_quantize(p.w.data(), 4, 6, p.h.data(), o);
  for (const int64_t bs : {1, 5, 1000}) {
    o.blocksize = bs;
    EXPECT_EQ(gptq_quantize(p.w.data(), 4, 6, p.h.data(), o).ternary.symbols, base.ternary.symbols);
  }
}

TEST(Gptq, BatchMatchesSingleCallsAndIsolatesFailures) {
  const Problem a = make_problem(200, 64, 300, 91);
  const Problem b = make_problem(64, 200, 700, 92);
  const Problem c = make_problem(129, 130, 400, 93);
  std::vector<float> nan_h = c.h;
  nan_h[1] = std::numeric_limits<float>::quiet_NaN();
  std::vector<GptqProblem> probs = {
      {a.w.data(), a.rows, a.cols, a.h.data()},   {b.w.data(), b.rows, b.cols, b.h.data()},
      {c.w.data(), c.rows, c.cols, nullptr},      {nullptr, 10, 10, nullptr},  // invalid
      {c.w.data(), c.rows, c.cols, nan_h.data()}, {c.w.data(), c.rows, c.cols, c.h.data()},
  };
  GptqOptions opt;
  opt.actorder = true;
  std::vector<GptqResult> single;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i].w == nullptr) {
      single.emplace_back();
      continue;
    }
    single.push_back(gptq_quantize(probs[i].w, probs[i].rows, probs[i].cols, probs[i].h, opt));
  }
  struct Config {
    int threads, per_matrix;
    int64_t limit;
  };
  for (const Config cfg : {Config{1, 0, 0}, Config{3, 0, 0}, Config{2, 2, 0}, Config{3, 1, 1},
                           Config{4, 2, 3 << 20}}) {
    GptqBatchOptions bo;
    bo.threads = cfg.threads;
    bo.threads_per_matrix = cfg.per_matrix;
    bo.memory_limit_bytes = cfg.limit;
    const auto res = gptq_quantize_batch(probs, opt, bo);
    ASSERT_EQ(res.size(), probs.size());
    EXPECT_EQ(res[0].status, GptqStatus::kOk);
    EXPECT_EQ(res[1].status, GptqStatus::kOk);
    EXPECT_EQ(res[2].status, GptqStatus::kFallbackRtn);
    EXPECT_EQ(res[3].status, GptqStatus::kFailed);
    EXPECT_FALSE(res[3].reason.empty());
    EXPECT_EQ(res[4].status, GptqStatus::kFallbackRtn);
    EXPECT_EQ(res[5].status, GptqStatus::kOk);
    for (size_t i = 0; i < probs.size(); ++i) {
      if (i == 3) continue;
      EXPECT_EQ(res[i].ternary.symbols, single[i].ternary.symbols) << "problem " << i;
      EXPECT_EQ(res[i].ternary.levels, single[i].ternary.levels);
      EXPECT_TRUE(same_bits(res[i].loss, single[i].loss));
    }
  }
  EXPECT_TRUE(gptq_quantize_batch({}, opt).empty());
}

TEST(Gptq, CompressMatrixDecodesToGptqResult) {
  const Problem p = make_problem(50, 77, 300, 101);
  GptqOptions opt;
  const GptqResult g = gptq_quantize(p.w.data(), p.rows, p.cols, p.h.data(), opt);
  for (const Codec codec : {Codec::kV1, Codec::kP5}) {
    EncodeOptions enc;
    enc.codec = codec;
    const CompressResult ce = compress_matrix(p.w.data(), p.rows, p.cols, p.h.data(), opt, enc);
    EXPECT_EQ(ce.status, GptqStatus::kOk);
    EXPECT_EQ(ce.matrix.codec, codec);
    validate(ce.matrix.view(), "compress_matrix");
    std::vector<uint8_t> sym(static_cast<size_t>(p.rows * p.cols));
    decode_symbols_ref(ce.matrix.view(), sym.data());
    EXPECT_EQ(sym, g.ternary.symbols);
    EXPECT_EQ(ce.matrix.levels, g.ternary.levels);
    EXPECT_TRUE(same_bits(ce.loss, g.loss));
    EXPECT_DOUBLE_EQ(ce.zero_fraction, g.ternary.zero_fraction());
  }
  opt.grid = GptqGrid::kUniform2;
  EXPECT_THROW(compress_matrix(p.w.data(), p.rows, p.cols, p.h.data(), opt), InvalidArgument);
}

// The accuracy requirement: on correlated inputs with outlier channels, GPTQ ternary has at
// least 2x lower relative output error ||(W-Q) X^T||^2 / ||W X^T||^2 than round-to-nearest, on
// the calibration tokens and on held-out tokens from the same distribution.
TEST(Accuracy, GptqTernaryBeatsRoundToNearestTwice) {
  const int64_t rows = 256, cols = 512, n = 4096;
  const Problem p = make_problem(rows, cols, n, 2024);
  // Held-out tokens: same seed for the mixing matrix and scales, later tokens of the stream.
  const std::vector<float> all = synthetic::activations(2 * n, cols, 2024 + 1000);
  const std::vector<float> held(all.begin() + n * cols, all.end());
  const GptqResult g = gptq_quantize(p.w.data(), rows, cols, p.h.data());
  const GptqResult r = rtn_quantize(p.w.data(), rows, cols);
  ASSERT_EQ(g.status, GptqStatus::kOk);
  const auto qg = g.ternary.to_dense(), qr = r.ternary.to_dense();
  const double norm = test::output_norm(p.w, p.x, rows, cols, n);
  const double eg = test::output_error(p.w, qg, p.x, rows, cols, n) / norm;
  const double er = test::output_error(p.w, qr, p.x, rows, cols, n) / norm;
  const double hnorm = test::output_norm(p.w, held, rows, cols, n);
  const double hg = test::output_error(p.w, qg, held, rows, cols, n) / hnorm;
  const double hr = test::output_error(p.w, qr, held, rows, cols, n) / hnorm;
  std::printf(
      "relative output error: GPTQ %.4f  RTN %.4f  (held out: %.4f vs %.4f); zeros %.3f vs %.3f\n",
      eg, er, hg, hr, g.ternary.zero_fraction(), r.ternary.zero_fraction());
  EXPECT_LE(2.0 * eg, er);
  EXPECT_LE(2.0 * hg, hr);
}

}  // namespace
}  // namespace qmoe
