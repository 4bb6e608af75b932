// core's gemm(): every entry of C = / += / -= A B must be exactly the chain of fused multiply-adds
// in p order that the plain loop below computes — at every level this CPU runs, in every operand
// layout, for shapes that are not multiples of any tile (including the blocks of p, of rows and of
// columns the tasks use), for any thread count, and for a row whether it is multiplied alone or
// with others. Nothing outside C may be written.
#include <gtest/gtest.h>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qmoe/core/cpu_env.h"
#include "qmoe/core/error.h"
#include "qmoe/core/gemm.h"

namespace qmoe {
namespace {

struct Layout {
  bool a_col_major, b_col_major, c_col_major;
};

struct Problem {
  int64_t m, n, k;
  Layout lay;
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c;
  int64_t a_rs() const { return lay.a_col_major ? 1 : lda; }
  int64_t a_cs() const { return lay.a_col_major ? lda : 1; }
  int64_t b_rs() const { return lay.b_col_major ? 1 : ldb; }
  int64_t b_cs() const { return lay.b_col_major ? ldb : 1; }
  int64_t c_rs() const { return lay.c_col_major ? 1 : ldc; }
  int64_t c_cs() const { return lay.c_col_major ? ldc : 1; }
};

// Leading dimensions larger than the shapes, so that strides are really used; C is surrounded by
// sentinel values (the padding of every row or column, and 64 floats after the end).
Problem make(int64_t m, int64_t n, int64_t k, Layout lay, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  Problem p{m,
            n,
            k,
            lay,
            (lay.a_col_major ? m : k) + 3,
            (lay.b_col_major ? k : n) + 2,
            (lay.c_col_major ? m : n) + 5,
            {},
            {},
            {}};
  p.a.resize(static_cast<size_t>(p.lda * std::max<int64_t>(1, lay.a_col_major ? k : m)));
  p.b.resize(static_cast<size_t>(p.ldb * std::max<int64_t>(1, lay.b_col_major ? n : k)));
  p.c.resize(static_cast<size_t>(p.ldc * std::max<int64_t>(1, lay.c_col_major ? n : m) + 64));
  for (auto* v : {&p.a, &p.b, &p.c})
    for (float& x : *v) x = nd(rng);
  return p;
}

// The contract: one chain of std::fma per entry, then the mode.
std::vector<float> expected(const Problem& p, GemmMode mode, bool relu) {
  std::vector<float> want = p.c;
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t j = 0; j < p.n; ++j) {
      float s = 0.0f;
      for (int64_t q = 0; q < p.k; ++q)
        s = std::fma(p.a[i * p.a_rs() + q * p.a_cs()], p.b[q * p.b_rs() + j * p.b_cs()], s);
      float& w = want[i * p.c_rs() + j * p.c_cs()];
      w = mode == GemmMode::kSet   ? (relu ? std::max(s, 0.0f) : s)
          : mode == GemmMode::kAdd ? w + s
                                   : w - s;
    }
  return want;
}

const char* mode_name(GemmMode m) {
  return m == GemmMode::kSet ? "set" : m == GemmMode::kAdd ? "add" : "sub";
}

TEST(Gemm, ExactFmaChainsAtEveryLevelLayoutModeAndThreadCount) {
  std::mt19937 rng(5);
  int levels = 0;
  for (const char* level : {"portable", "avx2", "avx512"}) {
    {
      float one = 1, out = 0;
      if (!detail::gemm_at_level(level, 1, 1, 1, &one, 1, 1, &one, 1, 1, &out, 1, 1, {})) continue;
    }
    ++levels;
    // 0 and 1; odd sizes; more rows than a task (384), more columns than a task (128), more p than
    // one block (512): partial sums reloaded between blocks.
    for (const auto [m, n, k] : {std::array<int64_t, 3>{0, 5, 3},
                                 {4, 0, 3},
                                 {3, 4, 0},
                                 {1, 1, 1},
                                 {13, 37, 5},
                                 {7, 70, 129},
                                 {33, 256, 17},
                                 {400, 131, 40},
                                 {19, 45, 1100}}) {
      for (const Layout lay : {Layout{false, false, false}, Layout{true, true, true},
                               Layout{true, false, true}, Layout{false, true, false}}) {
        for (const GemmMode mode : {GemmMode::kSet, GemmMode::kAdd, GemmMode::kSub}) {
          for (const bool relu : {false, true}) {
            if (relu && mode != GemmMode::kSet) continue;
            Problem p = make(m, n, k, lay, rng);
            const std::vector<float> want = expected(p, mode, relu);
            for (const int threads : {1, 3}) {
              SCOPED_TRACE(std::string(level) + " " + std::to_string(m) + "x" + std::to_string(n) +
                           "x" + std::to_string(k) + " layout " + std::to_string(lay.a_col_major) +
                           std::to_string(lay.b_col_major) + std::to_string(lay.c_col_major) + " " +
                           mode_name(mode) + (relu ? " relu" : "") + " threads " +
                           std::to_string(threads));
              std::vector<float> c = p.c;
              GemmOptions o;
              o.mode = mode;
              o.relu = relu;
              o.threads = threads;
              ASSERT_TRUE(detail::gemm_at_level(level, m, n, k, p.a.data(), p.a_rs(), p.a_cs(),
                                                p.b.data(), p.b_rs(), p.b_cs(), c.data(), p.c_rs(),
                                                p.c_cs(), o));
              for (size_t q = 0; q < c.size(); ++q)
                ASSERT_EQ(c[q], want[q]) << "element " << q << " of " << c.size();
            }
          }
        }
      }
    }
  }
  EXPECT_GE(levels, 1);  // the portable level always runs
}

// The property batch splitting relies on: a row of X W^T computed alone, or among other rows at
// any position, gives the same bits.
TEST(Gemm, RowsDoNotDependOnTheRestOfTheBatch) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int64_t rows = 777, in = 600, out = 300;
  std::vector<float> x(static_cast<size_t>(rows * in)), w(static_cast<size_t>(out * in));
  for (float& v : x) v = nd(rng);
  for (float& v : w) v = nd(rng);
  std::vector<float> all(static_cast<size_t>(rows * out));
  matmul_xwt(rows, out, in, x.data(), in, w.data(), all.data(), out, {.threads = 0});
  for (int64_t r : {int64_t{0}, int64_t{5}, int64_t{383}, int64_t{384}, rows - 1}) {
    std::vector<float> one(static_cast<size_t>(out));
    matmul_xwt(1, out, in, x.data() + r * in, in, w.data(), one.data(), out);
    for (int64_t j = 0; j < out; ++j) ASSERT_EQ(one[j], all[r * out + j]) << r << "," << j;
  }
  // A slice of rows starting at an odd position.
  std::vector<float> part(static_cast<size_t>(100 * out));
  matmul_xwt(100, out, in, x.data() + 333 * in, in, w.data(), part.data(), out, {.threads = 2});
  for (int64_t r = 0; r < 100; ++r)
    for (int64_t j = 0; j < out; ++j) ASSERT_EQ(part[r * out + j], all[(333 + r) * out + j]);
}

// A product large enough to run on several threads: the same bits for 1, 2 and 3 threads, and
// sampled entries equal to the plain chain.
TEST(Gemm, ThreadedProductsAreTheChainsToo) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  const int64_t m = 500, n = 300, k = 700;
  std::vector<float> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(k * n));
  for (float& v : a) v = nd(rng);
  for (float& v : b) v = nd(rng);
  std::vector<float> c1(static_cast<size_t>(m * n)), c2(c1.size()), c3(c1.size());
  gemm(m, n, k, a.data(), k, 1, b.data(), n, 1, c1.data(), n, 1, {.threads = 1});
  gemm(m, n, k, a.data(), k, 1, b.data(), n, 1, c2.data(), n, 1, {.threads = 2});
  gemm(m, n, k, a.data(), k, 1, b.data(), n, 1, c3.data(), n, 1, {.threads = 3});
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(c1, c3);
  std::uniform_int_distribution<int64_t> ri(0, m - 1), rj(0, n - 1);
  for (int s = 0; s < 200; ++s) {
    const int64_t i = ri(rng), j = rj(rng);
    float want = 0.0f;
    for (int64_t q = 0; q < k; ++q) want = std::fma(a[i * k + q], b[q * n + j], want);
    ASSERT_EQ(c2[static_cast<size_t>(i * n + j)], want) << i << "," << j;
  }
}

TEST(Gemm, ArgumentErrors) {
  float v = 1;
  EXPECT_THROW(gemm(-1, 1, 1, &v, 1, 1, &v, 1, 1, &v, 1, 1), InvalidArgument);
  EXPECT_THROW(gemm(1, 1, 1, nullptr, 1, 1, &v, 1, 1, &v, 1, 1), InvalidArgument);
  EXPECT_THROW(gemm(1, 1, 1, &v, 1, 1, &v, 1, 1, &v, 1, 1, {.mode = GemmMode::kAdd, .relu = true}),
               InvalidArgument);
  gemm(0, 0, 0, nullptr, 1, 1, nullptr, 1, 1, nullptr, 1, 1);  // nothing to do
}

TEST(Gemm, LevelInUse) {
  const std::string_view l = gemm_level();
  EXPECT_TRUE(l == "portable" || l == "avx2" || l == "avx512") << l;
  // The level needs the features cpu_features() names for it (the one detector of every module).
  const CpuFeatures& f = cpu_features();
  EXPECT_TRUE(l != "avx2" || f.avx2);
  EXPECT_TRUE(l != "avx512" || f.avx512);
  EXPECT_TRUE(!f.avx512 || f.avx2);
  EXPECT_TRUE(!f.g4_int8 || f.avx512);
  EXPECT_EQ(&f, &cpu_features());  // detected once
}

}  // namespace
}  // namespace qmoe
