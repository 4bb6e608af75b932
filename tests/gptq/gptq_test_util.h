// Shared helpers for the GPTQ tests: an unblocked reference GPTQ written the straightforward way
// (QMoE's batch_gptq with one block and explicit H^-1), Hessians in float64, output errors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/gptq/synthetic.h"

namespace qmoe::test {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// H = (2/n) X^T X in float64, returned as float (cols x cols).
inline std::vector<float> hessian_of(const std::vector<float>& x, int64_t n, int64_t d) {
  MatD xm(n, d);
  for (int64_t i = 0; i < n * d; ++i) xm.data()[i] = x[i];
  const MatD h = (2.0 / static_cast<double>(n)) * (xm.transpose() * xm);
  std::vector<float> out(static_cast<size_t>(d * d));
  for (int64_t i = 0; i < d * d; ++i) out[i] = static_cast<float>(h.data()[i]);
  return out;
}

// ||(W - Q) X^T||^2 in float64; q is rows*cols dense values.
inline double output_error(const std::vector<float>& w, const std::vector<float>& q,
                           const std::vector<float>& x, int64_t rows, int64_t cols, int64_t n) {
  MatD d(rows, cols), xm(n, cols);
  for (int64_t i = 0; i < rows * cols; ++i) d.data()[i] = static_cast<double>(w[i]) - q[i];
  for (int64_t i = 0; i < n * cols; ++i) xm.data()[i] = x[i];
  return (d * xm.transpose()).squaredNorm();
}

inline double output_norm(const std::vector<float>& w, const std::vector<float>& x, int64_t rows,
                          int64_t cols, int64_t n) {
  return output_error(w, std::vector<float>(w.size(), 0.0f), x, rows, cols, n);
}

struct RefResult {
  std::vector<uint8_t> symbols;
  std::vector<double> values;
  double loss = 0.0;
};

// Unblocked GPTQ on the asymmetric ternary grid, in float64: dead inputs, dampening, optional
// act-order, Hinv = upper Cholesky factor of (H + lambda I)^-1 formed explicitly, then each column
// quantized and its scaled error subtracted from all later columns of the row.
inline RefResult reference_gptq(const std::vector<float>& w, int64_t rows, int64_t cols,
                                const std::vector<float>& h, double percdamp, bool actorder) {
  const TernaryMatrix levels = ternarize_rtn(w.data(), rows, cols);
  MatD wm(rows, cols), hm(cols, cols);
  for (int64_t i = 0; i < rows * cols; ++i) wm.data()[i] = w[i];
  for (int64_t i = 0; i < cols * cols; ++i) hm.data()[i] = h[i];
  for (int64_t i = 0; i < cols; ++i) {
    if (hm(i, i) == 0) {
      hm(i, i) = 1;
      wm.col(i).setZero();
    }
  }
  const double lambda = std::max(percdamp * hm.diagonal().mean(), 1e-6);
  hm.diagonal().array() += lambda;
  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (actorder) {
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return hm(a, a) > hm(b, b); });
  }
  MatD wp(rows, cols), hp(cols, cols);
  for (int64_t a = 0; a < cols; ++a) {
    wp.col(a) = wm.col(perm[a]);
    for (int64_t b = 0; b < cols; ++b) hp(a, b) = hm(perm[a], perm[b]);
  }
  const MatD hinv = hp.llt().solve(MatD::Identity(cols, cols));
  const MatD u = hinv.llt().matrixU();
  RefResult out;
  out.symbols.resize(static_cast<size_t>(rows * cols));
  out.values.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const double lo = bf16_to_float(levels.levels[2 * r]);
    const double hi = bf16_to_float(levels.levels[2 * r + 1]);
    for (int64_t k = 0; k < cols; ++k) {
      const double x = wp(r, k);
      uint8_t s = 0;
      double q = 0;
      if (x > hi / 2) {
        s = hi != 0 ? 2 : 0;
        q = hi;
      } else if (x < lo / 2) {
        s = lo != 0 ? 1 : 0;
        q = lo;
      }
      const double err = (x - q) / u(k, k);
      out.loss += 0.5 * err * err;
      for (int64_t j = k + 1; j < cols; ++j) wp(r, j) -= err * u(k, j);
      out.symbols[r * cols + perm[k]] = s;
      out.values[r * cols + perm[k]] = q;
    }
  }
  return out;
}

// A matrix and its Hessian from the structured synthetic generator (gptq/README.md): weights,
// n activation rows x and H = x^T x.
struct Problem {
  int64_t rows = 0, cols = 0, n = 0;
  std::vector<float> w, x, h;
};

inline Problem make_problem(int64_t rows, int64_t cols, int64_t n, uint64_t seed) {
  Problem p;
  p.rows = rows;
  p.cols = cols;
  p.n = n;
  p.w = synthetic::weights(rows, cols, seed);
  p.x = synthetic::activations(n, cols, seed + 1000);
  p.h = hessian_of(p.x, n, cols);
  return p;
}

}  // namespace qmoe::test
