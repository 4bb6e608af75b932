#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>

#include <unistd.h>

#include <gtest/gtest.h>

#include "qmoe/format/safetensors.h"
#include "qmoe/switch/model.h"

namespace qmoe::sw::test {

inline std::filesystem::path fixture(const std::string& name) {
  return std::filesystem::path(QMOE_SOURCE_DIR) / "tests" / "switch" / "fixtures" / name;
}

// Tolerance of the golden comparisons: max |ours - ref| <= kGoldenTol * max(1, max |ref|) per
// tensor. Both sides compute in float32; they differ only in summation order (Eigen's GEMM
// blocking vs. PyTorch's): measured worst 1e-6 on both fixtures, 20x margin; a token routed to
// another expert than the reference would show up as an error of order 1.
inline constexpr double kGoldenTol = 2e-5;

inline double max_abs(const float* a, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(a[i])));
  return m;
}

// Compares a matrix with tensor `name` of a reference file; returns the normalised max error.
inline double normalised_error(const SafetensorsFile& ref, const std::string& name,
                               const RowMatrix& ours) {
  const TensorInfo* t = ref.find(name);
  if (!t) {
    ADD_FAILURE() << "reference tensor " << name << " missing";
    return 1e30;
  }
  auto r = ref.as<float>(*t, DType::kF32);
  EXPECT_EQ(static_cast<int64_t>(r.size()), ours.size()) << name;
  if (static_cast<int64_t>(r.size()) != ours.size()) return 1e30;
  double err = 0;
  for (int64_t i = 0; i < ours.size(); ++i)
    err = std::max(err, std::abs(static_cast<double>(ours.data()[i]) -
                                 static_cast<double>(r[static_cast<size_t>(i)])));
  return err / std::max(1.0, max_abs(r.data(), static_cast<int64_t>(r.size())));
}

inline std::filesystem::path temp_dir(const std::string& tag) {
  static int counter = 0;
  auto p =
      std::filesystem::temp_directory_path() /
      ("qmoe_switch_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace qmoe::sw::test
