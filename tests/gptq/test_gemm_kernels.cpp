// The run-time matrix product kernels of qmoe_gptq (gptq/src/gemm_kernels.h): every entry of
// C = / += / -= A B must be exactly the chain of fused multiply-adds in p order that the plain
// loop below computes, for row-major and column-major C (the latter is computed transposed), odd
// shapes and both levels.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gemm_kernels.h"

namespace qmoe::gptq_detail {
namespace {

struct Layout {
  bool a_col_major, b_col_major, c_col_major;
};

TEST(GemmKernels, ExactFmaChainsInEveryLayoutAndMode) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  int levels = 0;
  for (const char* level : {"avx2", "avx512"}) {
    const GemmKernel* kernel = find_gemm_kernel(level);
    if (kernel == nullptr) continue;
    ++levels;
    for (const auto [m, n, k] :
         {std::array<int64_t, 3>{1, 1, 1}, {13, 37, 5}, {128, 70, 128}, {33, 256, 17}}) {
      for (const Layout lay : {Layout{false, false, false}, Layout{true, true, true},
                               Layout{true, false, true}, Layout{false, true, false}}) {
        for (int mode : {0, 1, -1}) {
          SCOPED_TRACE(std::string(level) + " " + std::to_string(m) + "x" + std::to_string(n) +
                       "x" + std::to_string(k) + " layout " + std::to_string(lay.a_col_major) +
                       std::to_string(lay.b_col_major) + std::to_string(lay.c_col_major) +
                       " mode " + std::to_string(mode));
          // Leading dimensions larger than the shapes, so strides are really used.
          const int64_t lda = (lay.a_col_major ? m : k) + 3, ldb = (lay.b_col_major ? k : n) + 2,
                        ldc = (lay.c_col_major ? m : n) + 5;
          std::vector<float> a(static_cast<size_t>(lda * (lay.a_col_major ? k : m))),
              b(static_cast<size_t>(ldb * (lay.b_col_major ? n : k))),
              c(static_cast<size_t>(ldc * (lay.c_col_major ? n : m)));
          for (auto* v : {&a, &b, &c}) {
            for (float& x : *v) x = nd(rng);
          }
          Gemm g;
          g.m = m;
          g.n = n;
          g.k = k;
          g.a = a.data();
          g.a_rs = lay.a_col_major ? 1 : lda;
          g.a_cs = lay.a_col_major ? lda : 1;
          g.b = b.data();
          g.b_rs = lay.b_col_major ? 1 : ldb;
          g.b_cs = lay.b_col_major ? ldb : 1;
          std::vector<float> want = c;
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < n; ++j) {
              float s = 0.0f;
              for (int64_t p = 0; p < k; ++p) {
                s = std::fma(a[i * g.a_rs + p * g.a_cs], b[p * g.b_rs + j * g.b_cs], s);
              }
              float& w = want[lay.c_col_major ? i + j * ldc : i * ldc + j];
              w = mode == 0 ? s : mode > 0 ? w + s : w - s;
            }
          }
          std::vector<float> scratch(static_cast<size_t>(gemm_scratch_floats(*kernel, m, n, k)));
          g.c = c.data();
          g.c_rs = lay.c_col_major ? 1 : ldc;
          g.c_cs = lay.c_col_major ? ldc : 1;
          g.mode = mode;
          g.scratch = scratch.data();
          kernel->fn(g);
          for (size_t q = 0; q < c.size(); ++q) ASSERT_EQ(c[q], want[q]) << "element " << q;
        }
      }
    }
  }
  if (levels == 0) GTEST_SKIP() << "this CPU has no AVX2 + FMA";
}

}  // namespace
}  // namespace qmoe::gptq_detail
