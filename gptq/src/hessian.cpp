#include "qmoe/gptq/hessian.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include <omp.h>
#include <Eigen/Core>

#include "qmoe/core/gemm.h"
#include "qmoe/format/error.h"

namespace qmoe {
namespace {

// Output tiles and token blocks are fixed so that the summation order of every entry is the
// same for any thread count. 512 float products per block keep the float32 part of the error at
// ~1e-6 relative; the float64 sum then carries millions of tokens without growth. Each block
// product entry is a chain of fused multiply-adds in token order (core/gemm.h), so the sums are the
// same on every CPU.
constexpr int64_t kTile = 256;
constexpr int64_t kTokenBlock = 512;

int resolve_threads(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

// prod[i * nj + j] = sum over t < nb of xi[t * ld + i] * xj[t * ld + j]: core's gemm() (one chain
// of fused multiply-adds in token order per entry).
void block_product(const float* xi, const float* xj, int64_t ld, int64_t nb, int64_t ni, int64_t nj,
                   float* prod) {
  gemm(ni, nj, nb, xi, 1, ld, xj, ld, 1, prod, nj, 1);
}

// a + b, or InvalidArgument naming `what` when the count would pass INT64_MAX (counts read from a
// file may be anything up to it).
int64_t checked_count(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) {
    throw InvalidArgument(std::string("HessianAccumulator: the ") + what + " count " +
                          std::to_string(a) + " + " + std::to_string(b) + " overflows int64");
  }
  return r;
}

}  // namespace

std::string_view gptq_kernel() {
  return gemm_level();
}

namespace detail {
bool hessian_block_product(std::string_view level, const float* xi, const float* xj, int64_t ld,
                           int64_t nb, int64_t ni, int64_t nj, float* prod) {
  return qmoe::detail::gemm_at_level(level, ni, nj, nb, xi, 1, ld, xj, ld, 1, prod, nj, 1, {});
}
}  // namespace detail

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
  // Checked before anything changes.
  const int64_t new_tokens = checked_count(tokens_, accept, "token");
  const int64_t new_dropped = checked_count(dropped_, n - accept, "dropped-token");
  for (int64_t t = 0; t < accept; ++t) {
    for (int64_t c = 0; c < dim_; ++c) {
      if (!std::isfinite(x[t * ld + c])) {
        throw InvalidArgument("HessianAccumulator::add: token " + std::to_string(t) +
                              " holds a non-finite value");
      }
    }
  }
  if (accept > 0 && dim_ > 0) {
    const int64_t nt = (dim_ + kTile - 1) / kTile;
    std::vector<std::pair<int64_t, int64_t>> tiles;  // upper triangle (ti <= tj)
    for (int64_t ti = 0; ti < nt; ++ti) {
      for (int64_t tj = ti; tj < nt; ++tj) tiles.emplace_back(ti, tj);
    }
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    const int nth = static_cast<int>(std::min<int64_t>(resolve_threads(threads), ntiles));
    const int64_t d = dim_;
    // Per-thread buffers, allocated here so that nothing inside the parallel region can throw.
    const int64_t tile = std::min(kTile, d);
    std::vector<std::vector<float>> prod(static_cast<size_t>(nth));
    for (int i = 0; i < nth; ++i) prod[i].resize(static_cast<size_t>(tile * tile));
    double* sum = sum_.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth)
    for (int64_t k = 0; k < ntiles; ++k) {
      const int me = omp_get_thread_num();
      float* pr = prod[me].data();
      const int64_t i0 = tiles[k].first * kTile, j0 = tiles[k].second * kTile;
      const int64_t ni = std::min(kTile, d - i0), nj = std::min(kTile, d - j0);
      for (int64_t b = 0; b < accept; b += kTokenBlock) {
        const int64_t nb = std::min(kTokenBlock, accept - b);
        block_product(x + b * ld + i0, x + b * ld + j0, ld, nb, ni, nj, pr);
        for (int64_t i = 0; i < ni; ++i) {
          double* row = sum + (i0 + i) * d + j0;
          for (int64_t j = 0; j < nj; ++j) row[j] += static_cast<double>(pr[i * nj + j]);
        }
      }
    }
    lower_stale_ = true;  // the upper triangle is the result
  }
  tokens_ = new_tokens;
  dropped_ = new_dropped;
  return accept;
}

// Copies the upper triangle onto the lower one in 64x64 blocks (a plain transpose loop would touch
// a new cache line, and soon a new page, for every element), making the sum exactly symmetric.
void HessianAccumulator::fill_lower() const {
  if (!lower_stale_) return;
  constexpr int64_t kB = 64;
  const int64_t d = dim_;
  double* s = sum_.data();
  for (int64_t i0 = 0; i0 < d; i0 += kB) {
    for (int64_t j0 = 0; j0 <= i0; j0 += kB) {
      const int64_t i1 = std::min(d, i0 + kB), j1 = std::min(d, j0 + kB);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < std::min(j1, i); ++j) s[i * d + j] = s[j * d + i];
      }
    }
  }
  lower_stale_ = false;
}

const std::vector<double>& HessianAccumulator::sum() const {
  fill_lower();
  return sum_;
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  if (other.dim_ != dim_) {
    throw InvalidArgument("HessianAccumulator::merge: dimension " + std::to_string(other.dim_) +
                          " != " + std::to_string(dim_));
  }
  const int64_t new_tokens = checked_count(tokens_, other.tokens_, "token");
  const int64_t new_dropped = checked_count(dropped_, other.dropped_, "dropped-token");
  // The upper triangles are always complete; the lower one is filled in when read.
  const int64_t d = dim_;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) sum_[i * d + j] += other.sum_[i * d + j];
  }
  lower_stale_ = true;
  tokens_ = new_tokens;
  dropped_ = new_dropped;
}

void HessianAccumulator::assign(std::vector<double> sum, int64_t tokens, int64_t dropped) {
  if (static_cast<int64_t>(sum.size()) != dim_ * dim_) {
    throw InvalidArgument("HessianAccumulator::assign: sum has " + std::to_string(sum.size()) +
                          " entries, expected dim*dim = " + std::to_string(dim_ * dim_));
  }
  if (tokens < 0 || dropped < 0)
    throw InvalidArgument("HessianAccumulator::assign: negative count");
  sum_ = std::move(sum);
  lower_stale_ = false;
  tokens_ = tokens;
  dropped_ = dropped;
}

std::vector<float> HessianAccumulator::hessian() const {
  if (tokens_ == 0) return {};
  fill_lower();
  std::vector<float> h(sum_.size());
  const double scale = 2.0 / static_cast<double>(tokens_);
  for (size_t i = 0; i < sum_.size(); ++i) h[i] = static_cast<float>(scale * sum_[i]);
  return h;
}

double hessian_flops(int64_t dim, int64_t n) {
  double f = 0;
  for (int64_t i = 0; i < dim; i += kTile)
    for (int64_t j = i; j < dim; j += kTile)
      f += 2.0 * static_cast<double>(n) * static_cast<double>(std::min(kTile, dim - i)) *
           static_cast<double>(std::min(kTile, dim - j));
  return f;
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
