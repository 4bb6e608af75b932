#include "qmoe/gptq/hessian.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include <omp.h>
#include <Eigen/Core>

#include "qmoe/format/error.h"

namespace qmoe {
namespace {

// Output tiles and token blocks are fixed so that the summation order of every entry is the
// same for any thread count. 512 float products per block keep the float32 part of the error at
// ~1e-6 relative; the float64 sum then carries millions of tokens without growth.
constexpr int64_t kTile = 256;
constexpr int64_t kTokenBlock = 512;

int resolve_threads(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

}  // namespace

HessianAccumulator::HessianAccumulator(int64_t dim, int64_t token_cap)
    : dim_(dim), token_cap_(token_cap) {
  if (dim < 0) throw InvalidArgument("HessianAccumulator: negative dimension");
  if (token_cap < 0) throw InvalidArgument("HessianAccumulator: negative token cap");
  sum_.assign(static_cast<size_t>(dim * dim), 0.0);
}

int64_t HessianAccumulator::add(const float* x, int64_t n, int64_t ld, int threads) {
  if (n < 0) throw InvalidArgument("HessianAccumulator::add: negative token count");
  if (ld == 0) ld = dim_;
  if (ld < dim_) throw InvalidArgument("HessianAccumulator::add: row stride smaller than dim");
  if (x == nullptr && n > 0 && dim_ > 0)
    throw InvalidArgument("HessianAccumulator::add: null data");
  int64_t accept = n;
  if (token_cap_ > 0) accept = std::min(n, std::max<int64_t>(0, token_cap_ - tokens_));
  for (int64_t t = 0; t < accept; ++t) {
    for (int64_t c = 0; c < dim_; ++c) {
      if (!std::isfinite(x[t * ld + c])) {
        throw InvalidArgument("HessianAccumulator::add: token " + std::to_string(t) +
                              " holds a non-finite value");
      }
    }
  }
  if (accept > 0 && dim_ > 0) {
    // Column t of xt is token t.
    using Map = Eigen::Map<const Eigen::MatrixXf, 0, Eigen::OuterStride<>>;
    const Map xt(x, dim_, accept, Eigen::OuterStride<>(ld));
    const int64_t nt = (dim_ + kTile - 1) / kTile;
    std::vector<std::pair<int64_t, int64_t>> tiles;  // upper triangle (ti <= tj)
    for (int64_t ti = 0; ti < nt; ++ti) {
      for (int64_t tj = ti; tj < nt; ++tj) tiles.emplace_back(ti, tj);
    }
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    const int nth = static_cast<int>(std::min<int64_t>(resolve_threads(threads), ntiles));
    const int64_t d = dim_;
    double* sum = sum_.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
    for (int64_t k = 0; k < ntiles; ++k) {
      const int64_t i0 = tiles[k].first * kTile, j0 = tiles[k].second * kTile;
      const int64_t ni = std::min(kTile, d - i0), nj = std::min(kTile, d - j0);
      Eigen::MatrixXf prod(ni, nj);
      for (int64_t b = 0; b < accept; b += kTokenBlock) {
        const int64_t nb = std::min(kTokenBlock, accept - b);
        prod.noalias() = xt.block(i0, b, ni, nb) * xt.block(j0, b, nj, nb).transpose();
        for (int64_t i = 0; i < ni; ++i) {
          double* row = sum + (i0 + i) * d + j0;
          for (int64_t j = 0; j < nj; ++j) row[j] += static_cast<double>(prod(i, j));
        }
      }
    }
    // The upper triangle is the result; mirror it so that the matrix is exactly symmetric.
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < i; ++j) sum[i * d + j] = sum[j * d + i];
    }
  }
  tokens_ += accept;
  dropped_ += n - accept;
  return accept;
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  if (other.dim_ != dim_) {
    throw InvalidArgument("HessianAccumulator::merge: dimension " + std::to_string(other.dim_) +
                          " != " + std::to_string(dim_));
  }
  for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += other.sum_[i];
  tokens_ += other.tokens_;
  dropped_ += other.dropped_;
}

void HessianAccumulator::assign(std::vector<double> sum, int64_t tokens, int64_t dropped) {
  if (static_cast<int64_t>(sum.size()) != dim_ * dim_) {
    throw InvalidArgument("HessianAccumulator::assign: sum has " + std::to_string(sum.size()) +
                          " entries, expected dim*dim = " + std::to_string(dim_ * dim_));
  }
  if (tokens < 0 || dropped < 0)
    throw InvalidArgument("HessianAccumulator::assign: negative count");
  sum_ = std::move(sum);
  tokens_ = tokens;
  dropped_ = dropped;
}

std::vector<float> HessianAccumulator::hessian() const {
  if (tokens_ == 0) return {};
  std::vector<float> h(sum_.size());
  const double scale = 2.0 / static_cast<double>(tokens_);
  for (size_t i = 0; i < sum_.size(); ++i) h[i] = static_cast<float>(scale * sum_[i]);
  return h;
}

int64_t expert_token_cap(int64_t total_tokens, int64_t num_experts, double multiplier) {
  if (num_experts <= 0) throw InvalidArgument("expert_token_cap: num_experts must be positive");
  if (total_tokens < 0) throw InvalidArgument("expert_token_cap: negative token count");
  if (!(multiplier > 0) || !std::isfinite(multiplier)) {
    throw InvalidArgument("expert_token_cap: multiplier must be positive and finite");
  }
  const double cap =
      std::floor(multiplier * static_cast<double>(total_tokens) / static_cast<double>(num_experts));
  return std::max<int64_t>(1, static_cast<int64_t>(cap));
}

}  // namespace qmoe
