// QMOE_CPU_SIMD, as every module with run-time SIMD dispatch reads it.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "qmoe/format/cpu_env.h"
#include "qmoe/format/error.h"

namespace {

// Sets QMOE_CPU_SIMD for one test and restores what was there before.
class CpuSimdEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* v = std::getenv("QMOE_CPU_SIMD")) saved_ = v;
  }
  void TearDown() override {
    if (saved_) {
      setenv("QMOE_CPU_SIMD", saved_->c_str(), 1);
    } else {
      unsetenv("QMOE_CPU_SIMD");
    }
  }
  std::optional<std::string> saved_;
};

TEST_F(CpuSimdEnv, UnsetOrEmptyAsksForNothing) {
  unsetenv("QMOE_CPU_SIMD");
  EXPECT_EQ(qmoe::requested_cpu_simd(), std::nullopt);
  setenv("QMOE_CPU_SIMD", "", 1);
  EXPECT_EQ(qmoe::requested_cpu_simd(), std::nullopt);
}

TEST_F(CpuSimdEnv, KnownLevels) {
  for (const char* level : {"scalar", "avx2", "avx512"}) {
    setenv("QMOE_CPU_SIMD", level, 1);
    const auto got = qmoe::requested_cpu_simd();
    ASSERT_TRUE(got.has_value()) << level;
    EXPECT_EQ(*got, level);
  }
}

TEST_F(CpuSimdEnv, UnknownLevelIsAnErrorNamingTheVariableAndValue) {
  for (const char* bad : {"AVX2", "sse4", "avx512 ", "portable"}) {
    setenv("QMOE_CPU_SIMD", bad, 1);
    try {
      (void)qmoe::requested_cpu_simd();
      ADD_FAILURE() << "no error for '" << bad << "'";
    } catch (const qmoe::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("QMOE_CPU_SIMD='") + bad + "'"),
                std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
