#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/gptq/synthetic.h"

namespace qmoe {
namespace {

std::vector<double> xtx_ref(const std::vector<float>& x, int64_t n, int64_t d) {
  std::vector<double> s(static_cast<size_t>(d * d), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j)
        s[i * d + j] += static_cast<double>(x[t * d + i]) * x[t * d + j];
    }
  }
  return s;
}

// Largest |a - b| relative to sqrt(s_ii s_jj) (the scale of entry ij).
double max_rel(const std::vector<double>& a, const std::vector<double>& b, int64_t d) {
  double m = 0;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const double scale = std::sqrt(b[i * d + i] * b[j * d + j]);
      m = std::max(m, std::abs(a[i * d + j] - b[i * d + j]) / scale);
    }
  }
  return m;
}

std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("qmoe_test_hessian_" + std::to_string(::getpid()) + "_" + name + ".safetensors");
}

TEST(Hessian, MatchesFloat64Reference) {
  const int64_t d = 300, n = 1500;  // 2 output tiles, 3 token blocks
  const auto x = synthetic::activations(n, d, 1);
  HessianAccumulator acc(d);
  EXPECT_EQ(acc.add(x.data(), n), n);
  EXPECT_EQ(acc.tokens(), n);
  const auto ref = xtx_ref(x, n, d);
  EXPECT_LT(max_rel(acc.sum(), ref, d), 1e-5);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < i; ++j) ASSERT_EQ(acc.sum()[i * d + j], acc.sum()[j * d + i]);
  }
  const auto h = acc.hessian();
  ASSERT_EQ(h.size(), static_cast<size_t>(d * d));
  EXPECT_FLOAT_EQ(h[5 * d + 7], static_cast<float>(2.0 / n * acc.sum()[5 * d + 7]));
  EXPECT_TRUE(HessianAccumulator(d).hessian().empty());
}

// The AVX2 and AVX-512 kernels compute each entry of a block product as a chain of fused
// multiply-adds in token order: exactly what this loop computes, bit for bit. The portable level
// (an Eigen GEMM) matches it to float32 rounding. The shapes cover partial register blocks in both
// directions and a row stride larger than the width.
TEST(Hessian, BlockKernelsAreExactFmaChains) {
  const int64_t ld = 301;
  for (const auto& [ni, nj, nb] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1},
                                   {13, 33, 7},
                                   {37, 70, 129},
                                   {256, 256, 512},
                                   {5, 256, 3}}) {
    SCOPED_TRACE(std::to_string(ni) + "x" + std::to_string(nj) + ", " + std::to_string(nb) +
                 " tokens");
    const auto x = synthetic::activations(nb, ld, 7);
    const float* xi = x.data() + 11;
    const float* xj = x.data() + 40;
    std::vector<float> want(static_cast<size_t>(ni * nj));
    for (int64_t i = 0; i < ni; ++i) {
      for (int64_t j = 0; j < nj; ++j) {
        float acc = 0.0f;
        for (int64_t t = 0; t < nb; ++t) acc = std::fma(xi[t * ld + i], xj[t * ld + j], acc);
        want[i * nj + j] = acc;
      }
    }
    std::vector<float> portable(want.size(), -1.0f);
    ASSERT_TRUE(detail::hessian_block_product("portable", xi, xj, ld, nb, ni, nj, portable.data()));
    for (int64_t i = 0; i < ni; ++i) {
      for (int64_t j = 0; j < nj; ++j) {
        double scale = 0;  // sum of |products|: the size of the rounding error to expect
        for (int64_t t = 0; t < nb; ++t) scale += std::abs(double{xi[t * ld + i]} * xj[t * ld + j]);
        ASSERT_LE(std::abs(double{portable[i * nj + j]} - want[i * nj + j]), 1e-5 * scale + 1e-30)
            << "portable entry " << i << "," << j;
      }
    }
    for (const char* level : {"avx2", "avx512"}) {
      std::vector<float> got(want.size(), -1.0f);
      if (!detail::hessian_block_product(level, xi, xj, ld, nb, ni, nj, got.data())) continue;
      for (size_t k = 0; k < want.size(); ++k) {
        ASSERT_EQ(got[k], want[k]) << level << " entry " << k;
      }
    }
  }
  EXPECT_FALSE(detail::hessian_block_product("sse9", nullptr, nullptr, 1, 0, 0, 0, nullptr));
  const std::string_view used = gptq_kernel();
  EXPECT_TRUE(used == "portable" || used == "avx2" || used == "avx512") << used;
}

// With QMOE_CPU_SIMD set (the test_hessian_scalar / test_hessian_avx2 runs), add() uses that level.
TEST(Hessian, EnvironmentPicksTheLevel) {
  const char* env = std::getenv("QMOE_CPU_SIMD");
  if (env == nullptr || *env == '\0') GTEST_SKIP() << "QMOE_CPU_SIMD is not set";
  EXPECT_EQ(gptq_kernel(), std::string(env) == "scalar" ? "portable" : std::string(env));
}

TEST(Hessian, RowStride) {
  const int64_t d = 40, n = 50, ld = 64;
  const auto x = synthetic::activations(n, d, 2);
  std::vector<float> padded(static_cast<size_t>(n * ld), std::numeric_limits<float>::quiet_NaN());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < d; ++j) padded[t * ld + j] = x[t * d + j];
  }
  HessianAccumulator a(d), b(d);
  a.add(x.data(), n);
  b.add(padded.data(), n, ld);
  EXPECT_EQ(a.sum(), b.sum());
}

TEST(Hessian, ThreadCountDeterminism) {
  const int64_t d = 600, n = 1100;
  const auto x = synthetic::activations(n, d, 3);
  HessianAccumulator one(d);
  one.add(x.data(), n, 0, 1);
  for (const int t : {2, 3}) {
    HessianAccumulator acc(d);
    acc.add(x.data(), n, 0, t);
    EXPECT_EQ(acc.sum(), one.sum()) << t << " threads";
  }
}

TEST(Hessian, MergeEqualsOneStream) {
  const int64_t d = 100, n = 1000;
  const auto x = synthetic::activations(n, d, 4);
  HessianAccumulator a(d), b(d), c(d);
  a.add(x.data(), 600);
  b.add(x.data() + 600 * d, 400);
  c.add(x.data(), 600);
  c.add(x.data() + 600 * d, 400);
  a.merge(b);
  EXPECT_EQ(a.tokens(), n);
  EXPECT_EQ(a.sum(), c.sum());  // same blocks, same order
  EXPECT_LT(max_rel(a.sum(), xtx_ref(x, n, d), d), 1e-5);
  EXPECT_THROW(a.merge(HessianAccumulator(d + 1)), InvalidArgument);
}

TEST(Hessian, TokenCap) {
  const int64_t d = 16;
  const auto x = synthetic::activations(120, d, 5);
  HessianAccumulator acc(d, 100);
  EXPECT_EQ(acc.add(x.data(), 60), 60);
  EXPECT_EQ(acc.add(x.data() + 60 * d, 60), 40);
  EXPECT_EQ(acc.add(x.data(), 10), 0);
  EXPECT_EQ(acc.tokens(), 100);
  EXPECT_EQ(acc.dropped(), 30);
  EXPECT_LT(max_rel(acc.sum(), xtx_ref(x, 100, d), d), 1e-6);

  EXPECT_EQ(expert_token_cap(1000, 8), 500);
  EXPECT_EQ(expert_token_cap(1000, 8, 1.0), 125);
  EXPECT_EQ(expert_token_cap(3, 128), 1);
  EXPECT_THROW(expert_token_cap(10, 0), InvalidArgument);
  EXPECT_THROW(expert_token_cap(10, 2, 0.0), InvalidArgument);
}

// A million tokens with a large common offset: a float32 running sum would lose ~1e-2
// relative; float32 blocks summed in float64 stay at float32 rounding of one block.
TEST(Hessian, AccurateOverAMillionTokens) {
  const int64_t d = 8, n = int64_t{1} << 20;
  synthetic::Rng rng(6);
  std::vector<float> x(static_cast<size_t>(n * d));
  for (auto& v : x) v = static_cast<float>(1.0 + 0.01 * rng.gaussian());
  HessianAccumulator acc(d);
  acc.add(x.data(), n);
  EXPECT_LT(max_rel(acc.sum(), xtx_ref(x, n, d), d), 1e-6);
}

TEST(Hessian, InvalidInputs) {
  const int64_t d = 4;
  std::vector<float> x(12, 1.0f);
  HessianAccumulator acc(d);
  x[9] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(acc.add(x.data(), 3), InvalidArgument);
  EXPECT_EQ(acc.tokens(), 0);
  EXPECT_EQ(acc.sum(), std::vector<double>(16, 0.0));
  EXPECT_THROW(acc.add(x.data(), 1, 3), InvalidArgument);
  EXPECT_THROW(acc.add(nullptr, 1), InvalidArgument);
  EXPECT_THROW(acc.add(x.data(), -1), InvalidArgument);
  EXPECT_THROW(HessianAccumulator(-1), InvalidArgument);
  EXPECT_THROW(acc.assign(std::vector<double>(15), 1), InvalidArgument);
}

// Counts read from a file may be anything up to INT64_MAX: adding to them must fail cleanly, with
// the accumulator left as it was.
TEST(Hessian, CountOverflowIsAnErrorThatChangesNothing) {
  const int64_t d = 2, big = std::numeric_limits<int64_t>::max() - 1;
  HessianAccumulator a(d), b(d);
  a.assign({1.0, 0.5, 0.5, 2.0}, big, 0);
  b.assign({1.0, 0.0, 0.0, 1.0}, 5, big);
  const std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f};
  EXPECT_THROW(a.add(x.data(), 2), InvalidArgument);
  EXPECT_EQ(a.tokens(), big);
  EXPECT_EQ(a.sum(), (std::vector<double>{1.0, 0.5, 0.5, 2.0}));
  EXPECT_THROW(a.merge(b), InvalidArgument);
  EXPECT_THROW(b.merge(b), InvalidArgument);  // dropped + dropped
  EXPECT_EQ(a.tokens(), big);
  EXPECT_EQ(a.sum(), (std::vector<double>{1.0, 0.5, 0.5, 2.0}));
  EXPECT_EQ(b.dropped(), big);
  a.add(x.data(), 1);  // one more token still fits
  EXPECT_EQ(a.tokens(), big + 1);
}

TEST(HessianFile, RoundTrip) {
  std::map<std::string, HessianAccumulator> accs;
  const auto x = synthetic::activations(300, 48, 7);
  accs.emplace("encoder.block.1.layer.1.mlp.experts.expert_0.wi", HessianAccumulator(48, 200));
  accs.at("encoder.block.1.layer.1.mlp.experts.expert_0.wi").add(x.data(), 300);
  accs.emplace("encoder.block.1.layer.1.mlp.experts.expert_1.wi", HessianAccumulator(48));
  accs.emplace("decoder.block.3.layer.2.mlp.experts.expert_0.wo", HessianAccumulator(20));
  accs.at("decoder.block.3.layer.2.mlp.experts.expert_0.wo").add(x.data(), 10, 48);
  const auto path = temp_path("roundtrip");
  write_hessians(path, accs);
  const auto back = read_hessians(path);
  ASSERT_EQ(back.size(), accs.size());
  for (const auto& [name, acc] : accs) {
    ASSERT_TRUE(back.count(name)) << name;
    const auto& b = back.at(name);
    EXPECT_EQ(b.dim(), acc.dim());
    EXPECT_EQ(b.tokens(), acc.tokens());
    EXPECT_EQ(b.dropped(), acc.dropped());
    EXPECT_EQ(b.sum(), acc.sum());
  }
  EXPECT_EQ(back.at("encoder.block.1.layer.1.mlp.experts.expert_0.wi").dropped(), 100);
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata().at("format"), "qmoe-hessian");
  const TensorInfo* t = f.find("encoder.block.1.layer.1.mlp.experts.expert_0.wi.xtx");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::kF64);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{48, 48}));
  std::filesystem::remove(path);
  EXPECT_THROW(write_hessians(path, {{"bad.xtx", HessianAccumulator(2)}}), InvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(path));
}

// A float32 X^T X written by another tool: accepted; the upper triangle is authoritative.
TEST(HessianFile, AcceptsFloat32Sums) {
  const auto path = temp_path("f32");
  {
    SafetensorsWriter w(path);
    w.set_metadata("format", "qmoe-hessian");
    w.set_metadata("format_version", "1");
    const std::vector<float> s = {4.0f, 1.0f, 1.5f, 9.0f};  // lower entry 1.5 differs: ignored
    const std::vector<int64_t> n = {7};
    w.add("m.xtx", DType::kF32, {2, 2}, std::as_bytes(std::span<const float>(s)));
    w.add("m.tokens", DType::kI64, {1}, std::as_bytes(std::span<const int64_t>(n)));
    w.finish();
  }
  const auto back = read_hessians(path);
  ASSERT_EQ(back.size(), 1u);
  EXPECT_EQ(back.at("m").sum(), (std::vector<double>{4.0, 1.0, 1.0, 9.0}));
  EXPECT_EQ(back.at("m").tokens(), 7);
  EXPECT_EQ(back.at("m").dropped(), 0);
  std::filesystem::remove(path);
}

TEST(HessianFile, RejectsInvalidFiles) {
  const std::vector<double> s = {1.0, 0.0, 0.0, 1.0};
  const std::vector<int64_t> n = {3};
  auto sb = std::as_bytes(std::span<const double>(s));
  auto nb = std::as_bytes(std::span<const int64_t>(n));
  struct Case {
    const char* name;
    bool metadata;
    std::vector<std::pair<std::string, int>> tensors;  // 0 = 2x2 sum, 1 = count, 2 = 1x4 sum
  };
  const std::vector<Case> cases = {
      {"nometa", false, {{"m.xtx", 0}, {"m.tokens", 1}}},
      {"nocount", true, {{"m.xtx", 0}}},
      {"orphancount", true, {{"m.tokens", 1}}},
      {"unknown", true, {{"m.xtx", 0}, {"m.tokens", 1}, {"other", 1}}},
      {"notsquare", true, {{"m.xtx", 2}, {"m.tokens", 1}}},
  };
  for (const Case& c : cases) {
    const auto path = temp_path(c.name);
    {
      SafetensorsWriter w(path);
      if (c.metadata) {
        w.set_metadata("format", "qmoe-hessian");
        w.set_metadata("format_version", "1");
      }
      for (const auto& [name, kind] : c.tensors) {
        if (kind == 0) w.add(name, DType::kF64, {2, 2}, sb);
        if (kind == 1) w.add(name, DType::kI64, {1}, nb);
        if (kind == 2) w.add(name, DType::kF64, {1, 4}, sb);
      }
      w.finish();
    }
    EXPECT_THROW(read_hessians(path), FormatError) << c.name;
    std::filesystem::remove(path);
  }
}

// A named pipe given as a Hessian file is refused at once (opening it for reading blocked).
TEST(HessianFile, NamedPipeIsRefused) {
  const auto path = temp_path("pipe");
  std::filesystem::remove(path);
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  try {
    (void)read_hessians(path);
    ADD_FAILURE() << "no error";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file (a named pipe)"), std::string::npos)
        << e.what();
  }
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace qmoe
