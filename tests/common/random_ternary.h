// Random ternary matrices for the tests: P(0) = p_zero, low and high equally likely otherwise,
// per-row levels of magnitude in [min_level, min_level + 1) (bf16). The same seed gives the same
// matrix everywhere.
#pragma once

#include <cstdint>
#include <random>

#include "qmoe/core/bf16.h"
#include "qmoe/format/matrix.h"

namespace qmoe::test {

inline TernaryMatrix random_ternary(int64_t rows, int64_t cols, double p_zero, uint64_t seed,
                                    double min_level = 0.01) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  TernaryMatrix t(rows, cols);
  for (auto& s : t.symbols) {
    const double x = u(rng);
    s = x < p_zero ? 0 : (x < p_zero + (1 - p_zero) / 2 ? 1 : 2);
  }
  for (int64_t r = 0; r < rows; ++r) {
    t.levels[2 * r] = float_to_bf16(-static_cast<float>(min_level + u(rng)));
    t.levels[2 * r + 1] = float_to_bf16(static_cast<float>(min_level + u(rng)));
  }
  return t;
}

}  // namespace qmoe::test
