// Structured synthetic calibration data for tests and benchmarks of GPTQ (documented in
// gptq/README.md). Independent Gaussian inputs make GPTQ look no better than round-to-nearest,
// because with H ~ I there is nothing to compensate through; transformer activations are
// correlated and have a few outlier channels, which is where GPTQ gains. The generator mimics
// that, and is reproducible bit for bit on every platform (own Gaussian sampler, no
// std::normal_distribution, whose output is implementation-defined).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace qmoe::synthetic {

// SplitMix64 stream with a Box-Muller Gaussian.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1).
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  double gaussian() {
    if (have_) {
      have_ = false;
      return spare_;
    }
    const double u = uniform(), v = uniform();
    const double r = std::sqrt(-2.0 * std::log(u));
    spare_ = r * std::sin(6.283185307179586 * v);
    have_ = true;
    return r * std::cos(6.283185307179586 * v);
  }

 private:
  uint64_t s_;
  double spare_ = 0.0;
  bool have_ = false;
};

struct ActivationModel {
  double latent_fraction = 0.25;   // k = max(1, latent_fraction * dim) shared factors
  double noise = 0.3;              // isotropic noise added to every feature
  double scale_sigma = 0.5;        // per-channel scale exp(N(0, scale_sigma^2))
  double outlier_fraction = 0.01;  // channels (at least 1) scaled by outlier_scale
  double outlier_scale = 20.0;
};

// n tokens x dim features, row-major float32:
//   x_t = s ⊙ (A^T z_t + noise * g_t),  z_t ~ N(0, I_k), g_t ~ N(0, I_dim),
//   A (k x dim) ~ N(0, 1/k) fixed per seed: features are correlated through k latent factors;
//   s_j = exp(scale_sigma * N(0,1)), times outlier_scale on max(1, outlier_fraction * dim)
//   channels chosen at random: a few channels dominate, as in transformer hidden states.
inline std::vector<float> activations(int64_t n, int64_t dim, uint64_t seed,
                                      const ActivationModel& m = {}) {
  Rng rng(seed);
  const int64_t k =
      std::max<int64_t>(1, static_cast<int64_t>(m.latent_fraction * static_cast<double>(dim)));
  std::vector<double> a(static_cast<size_t>(k * dim));
  for (auto& v : a) v = rng.gaussian() / std::sqrt(static_cast<double>(k));
  std::vector<double> s(static_cast<size_t>(dim));
  for (auto& v : s) v = std::exp(m.scale_sigma * rng.gaussian());
  const int64_t outliers =
      std::max<int64_t>(1, static_cast<int64_t>(m.outlier_fraction * static_cast<double>(dim)));
  for (int64_t i = 0; i < outliers && dim > 0; ++i)
    s[rng.next() % static_cast<uint64_t>(dim)] *= m.outlier_scale;
  std::vector<float> x(static_cast<size_t>(n * dim));
  std::vector<double> z(static_cast<size_t>(k)), row(static_cast<size_t>(dim));
  for (int64_t t = 0; t < n; ++t) {
    for (auto& v : z) v = rng.gaussian();
    for (int64_t j = 0; j < dim; ++j) row[j] = m.noise * rng.gaussian();
    for (int64_t l = 0; l < k; ++l) {
      const double* al = a.data() + l * dim;
      for (int64_t j = 0; j < dim; ++j) row[j] += z[l] * al[j];
    }
    for (int64_t j = 0; j < dim; ++j) x[t * dim + j] = static_cast<float>(s[j] * row[j]);
  }
  return x;
}

// rows x cols weights, row-major float32: N(0, 1/cols) with a per-row scale exp(0.3 N(0,1)).
inline std::vector<float> weights(int64_t rows, int64_t cols, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  const double base = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(cols, 1)));
  for (int64_t r = 0; r < rows; ++r) {
    const double rs = base * std::exp(0.3 * rng.gaussian());
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = static_cast<float>(rs * rng.gaussian());
  }
  return w;
}

}  // namespace qmoe::synthetic
