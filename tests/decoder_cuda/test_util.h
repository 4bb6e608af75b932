// Shared helpers of the decoder_cuda tests (emulated and GPU): random matrices, activations of
// every type, normalised error, sentinels.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/core/dtype.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"

namespace qmoe::cuda::test {

// Normalised error ||y - ref||_2 / max(||ref||_2, tiny) allowed per output type. fp32 outputs
// differ from the double-precision reference only by fp32 summation order; fp16/bf16 outputs
// add one rounding of each output (2^-11 / 2^-8 relative).
inline constexpr double kTolF32 = 1e-5;
inline constexpr double kTolF16 = 1e-3;
inline constexpr double kTolBF16 = 6e-3;

inline double tolerance(DType t) {
  return t == DType::kF32 ? kTolF32 : (t == DType::kF16 ? kTolF16 : kTolBF16);
}

// Random ternary matrix (tests/common/random_ternary.h, levels >= 0.05) encoded with `codec`.
inline CompressedMatrix random_matrix(int64_t rows, int64_t cols, double p_zero, uint64_t seed,
                                      Codec codec = Codec::kV1) {
  const TernaryMatrix t = qmoe::test::random_ternary(rows, cols, p_zero, seed, 0.05);
  EncodeOptions opt;
  opt.codec = codec;
  return encode(t, opt);
}

// Host buffer of `n` activations of type `t` (raw bytes), with conversion helpers.
struct Acts {
  DType type = DType::kF32;
  std::vector<uint8_t> bytes;
  Acts(DType t, size_t n) : type(t), bytes(n * dtype_size(t)) {}
  size_t size() const { return bytes.size() / dtype_size(type); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  float get(size_t i) const {
    if (type == DType::kF32) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    return type == DType::kBF16 ? bf16_to_float(h) : fp16_to_float(h);
  }
  void set(size_t i, float f) {
    if (type == DType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
      return;
    }
    const uint16_t h = type == DType::kBF16 ? float_to_bf16(f) : float_to_fp16(f);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  }
  // Raw bit pattern, for sentinel checks.
  uint32_t bits(size_t i) const {
    uint32_t b = 0;
    std::memcpy(&b, bytes.data() + dtype_size(type) * i, dtype_size(type));
    return b;
  }
};

// A recognisable NaN payload in every type, written to every element a kernel must not touch.
inline void fill_sentinel(Acts& a) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (a.type == DType::kF32) {
      const uint32_t s = 0x7fc0dead;
      std::memcpy(a.bytes.data() + 4 * i, &s, 4);
    } else {
      const uint16_t s = 0x7fde;
      std::memcpy(a.bytes.data() + 2 * i, &s, 2);
    }
  }
}
inline bool is_sentinel(const Acts& a, size_t i) {
  return a.type == DType::kF32 ? a.bits(i) == 0x7fc0deadu : a.bits(i) == 0x7fdeu;
}

inline Acts random_acts(DType t, size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  Acts a(t, n);
  for (size_t i = 0; i < n; ++i) a.set(i, d(rng));
  return a;
}

// Normalised L2 error of got vs want.
inline double nerr(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// Reference y (rows floats) for one token, using the exact stored activations.
inline std::vector<float> ref_matvec(const CompressedMatrix& m, const Acts& x, size_t offset) {
  std::vector<float> xf(static_cast<size_t>(m.cols));
  for (int64_t c = 0; c < m.cols; ++c) xf[c] = x.get(offset + c);
  std::vector<float> y(static_cast<size_t>(m.rows));
  matvec_ref(m.view(), xf.data(), y.data());
  return y;
}

}  // namespace qmoe::cuda::test
