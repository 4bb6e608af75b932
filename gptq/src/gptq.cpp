// GPTQ on the CPU. See gptq.h for the algorithm and the numerics; this file is laid out as:
// per-row grids, Hessian preparation (dead inputs, dampening, act-order, reversal), a tiled
// Cholesky factorisation, the column sweep over fixed row chunks, and the round-to-nearest path.
#include "qmoe/gptq/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>
#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "qmoe/core/gemm.h"
#include "qmoe/format/bf16.h"
#include "qmoe/format/error.h"

namespace qmoe {
namespace {

// Rows handled by one task of the column sweep. Fixed (not derived from the thread count) so
// that every GEMM has the same shape, hence the same summation order, for any thread count.
constexpr int64_t kRowChunk = 128;
// Tile of the Cholesky factorisation; fixed for the same reason.
constexpr int64_t kCholTile = 256;
// Columns fed back one at a time inside a block; the rest of the block is updated by a GEMM.
constexpr int64_t kSubBlock = 16;

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  // column-major

// C (mode 1: +=, -1: -=) the m x n product A B, column-major operands given by pointer and
// strides, through core's gemm() (every entry one chain of fused multiply-adds in p order, at
// every SIMD level). Returns false, doing nothing, for float64: the caller then uses Eigen. Either
// way the result depends only on the operands, not on the thread count.
template <class T>
bool kernel_gemm(int mode, int64_t m, int64_t n, int64_t k, const T* a, int64_t a_cs, const T* b,
                 int64_t b_rs, int64_t b_cs, T* c, int64_t c_cs) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    GemmOptions o;
    o.mode = mode > 0 ? GemmMode::kAdd : mode < 0 ? GemmMode::kSub : GemmMode::kSet;
    gemm(m, n, k, a, 1, a_cs, b, b_rs, b_cs, c, 1, c_cs, o);
    return true;
  }
}

int resolve_threads(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

bool is_ternary(GptqGrid g) {
  return g == GptqGrid::kTernary || g == GptqGrid::kTernarySymmetric;
}

int uniform_bits(GptqGrid g) {
  switch (g) {
    case GptqGrid::kUniform2:
      return 2;
    case GptqGrid::kUniform3:
      return 3;
    case GptqGrid::kUniform4:
      return 4;
    default:
      return 0;
  }
}

void validate(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt) {
  if (rows < 0 || cols < 0) throw InvalidArgument("gptq: negative shape");
  if (w == nullptr && rows * cols > 0) throw InvalidArgument("gptq: null weights");
  if (!(opt.percdamp >= 0) || !std::isfinite(opt.percdamp)) {
    throw InvalidArgument("gptq: percdamp must be finite and >= 0");
  }
  if (opt.blocksize < 1) throw InvalidArgument("gptq: blocksize must be >= 1");
  if (!is_ternary(opt.grid) && uniform_bits(opt.grid) == 0)
    throw InvalidArgument("gptq: unknown grid");
}

// ---- per-row grids ---------------------------------------------------------------------------

// The grid of every row, fixed from the row before quantization (float32 arithmetic, as QMoE's
// quantizer). Ternary: a = lo, b = hi (the bf16-rounded levels). Uniform: a = scale, b = zero.
template <class T>
struct Grids {
  bool ternary = true;
  T maxq = 0;
  std::vector<T> a, b;
  std::vector<uint16_t> level_bits;  // ternary: 2*rows

  // Quantizes x on row r's grid: returns the value, sets the symbol (ternary: 0, 1 = lo, 2 = hi;
  // uniform: the integer code). A level whose value is 0 is always written as symbol 0.
  T quantize(int64_t r, T x, uint8_t& sym) const {
    return ternary ? quantize_as<true>(r, x, sym) : quantize_as<false>(r, x, sym);
  }
  template <bool kTernary>
  T quantize_as(int64_t r, T x, uint8_t& sym) const {
    if constexpr (kTernary) {
      const T lo = a[r], hi = b[r];
      if (x > hi / 2) {
        sym = hi != 0 ? 2 : 0;
        return hi;
      }
      if (x < lo / 2) {
        sym = lo != 0 ? 1 : 0;
        return lo;
      }
      sym = 0;
      return T(0);
    }
    T q = std::nearbyint(x / a[r]) + b[r];  // round half to even, as torch.round
    q = std::clamp(q, T(0), maxq);
    sym = static_cast<uint8_t>(q);
    return a[r] * (q - b[r]);
  }
};

template <class T>
Grids<T> make_grids(const float* w, int64_t rows, int64_t cols, GptqGrid grid) {
  Grids<T> g;
  g.ternary = is_ternary(grid);
  g.a.resize(static_cast<size_t>(rows));
  g.b.resize(static_cast<size_t>(rows));
  if (g.ternary) g.level_bits.resize(static_cast<size_t>(2 * rows));
  const int bits = uniform_bits(grid);
  const float maxq = bits > 0 ? static_cast<float>((1 << bits) - 1) : 0.0f;
  g.maxq = static_cast<T>(maxq);
  for (int64_t r = 0; r < rows; ++r) {
    float mn = 0.0f, mx = 0.0f;  // min(row, 0), max(row, 0), as encoder/ternarize_rtn()
    const float* row = w + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (!std::isfinite(row[c])) {
        throw InvalidArgument("gptq: row " + std::to_string(r) + " holds a non-finite weight");
      }
      mn = std::min(mn, row[c]);
      mx = std::max(mx, row[c]);
    }
    if (g.ternary) {
      uint16_t lo_bits, hi_bits;
      if (grid == GptqGrid::kTernarySymmetric) {
        hi_bits = float_to_bf16(std::max(-mn, mx));
        lo_bits = mn < 0 ? static_cast<uint16_t>(hi_bits ^ 0x8000u) : float_to_bf16(0.0f);
      } else {
        lo_bits = float_to_bf16(mn);
        hi_bits = float_to_bf16(mx);
      }
      if (bf16_to_float(lo_bits) == 0.0f && bf16_to_float(hi_bits) == 0.0f) {
        lo_bits = float_to_bf16(-1.0f);
        hi_bits = float_to_bf16(1.0f);
      }
      g.level_bits[2 * r] = lo_bits;
      g.level_bits[2 * r + 1] = hi_bits;
      g.a[r] = static_cast<T>(bf16_to_float(lo_bits));
      g.b[r] = static_cast<T>(bf16_to_float(hi_bits));
    } else {
      if (mn == 0.0f && mx == 0.0f) {
        mn = -1.0f;
        mx = 1.0f;
      }
      const float scale = (mx - mn) / maxq;
      const float zero = std::nearbyint(-mn / scale);
      g.a[r] = static_cast<T>(scale);
      g.b[r] = static_cast<T>(zero);
    }
  }
  return g;
}

GptqResult empty_result(int64_t rows, int64_t cols, GptqGrid grid) {
  GptqResult res;
  if (is_ternary(grid)) {
    res.ternary = TernaryMatrix(rows, cols);
  } else {
    res.dequantized.assign(static_cast<size_t>(rows * cols), 0.0f);
  }
  return res;
}

// ---- round to nearest ------------------------------------------------------------------------

template <class T>
GptqResult rtn_impl(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt,
                    const Grids<T>& g) {
  GptqResult res = empty_result(rows, cols, opt.grid);
  if (g.ternary) res.ternary.levels = g.level_bits;
  double dd = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      uint8_t s;
      const T q = g.quantize(r, static_cast<T>(w[i]), s);
      const double d = static_cast<double>(static_cast<T>(w[i]) - q);
      dd += d * d;
      if (g.ternary) {
        res.ternary.symbols[static_cast<size_t>(i)] = s;
      } else {
        res.dequantized[static_cast<size_t>(i)] = static_cast<float>(q);
      }
    }
  }
  // The identity Hessian, dampened: Hd = (1 + percdamp) I.
  res.lambda = opt.percdamp;
  res.output_loss = 0.5 * dd;
  res.loss = 0.5 * (1.0 + opt.percdamp) * dd;
  return res;
}

template <class T>
GptqResult fallback(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt,
                    const Grids<T>& g, std::string reason) {
  GptqResult res = rtn_impl<T>(w, rows, cols, opt, g);
  res.status = GptqStatus::kFallbackRtn;
  res.reason = std::move(reason);
  return res;
}

// ---- Cholesky --------------------------------------------------------------------------------

// In-place lower Cholesky factorisation A = L L^T of the lower triangle of `a` (the strict upper
// triangle is scratch), right-looking over fixed tiles: each tile sees the same operations in the
// same order whatever the thread count. Returns false if A is not (numerically) positive definite.
template <class T>
bool cholesky_tiled(Mat<T>& a, int threads) {
  const int64_t n = a.rows();
  for (int64_t k0 = 0; k0 < n; k0 += kCholTile) {
    const int64_t kb = std::min(kCholTile, n - k0);
    Mat<T> dtile = a.block(k0, k0, kb, kb);
    Eigen::LLT<Mat<T>, Eigen::Lower> llt(dtile);
    if (llt.info() != Eigen::Success) return false;
    const Mat<T> l = llt.matrixL();
    for (int64_t i = 0; i < kb; ++i) {
      if (!(l(i, i) > 0) || !std::isfinite(l(i, i))) return false;
    }
    a.block(k0, k0, kb, kb).template triangularView<Eigen::Lower>() = l;
    const int64_t rest = n - k0 - kb;
    if (rest == 0) break;
    const int64_t nt = (rest + kCholTile - 1) / kCholTile;
    // Panel: A21 <- A21 L11^-T, one row tile per task.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t i0 = k0 + kb + t * kCholTile;
      const int64_t ni = std::min(kCholTile, n - i0);
      auto panel = a.block(i0, k0, ni, kb);
      l.template triangularView<Eigen::Lower>()
          .transpose()
          .template solveInPlace<Eigen::OnTheRight>(panel);
    }
    // Trailing update: A22 <- A22 - A21 A21^T, lower tiles only.
    const int64_t ntiles = nt * (nt + 1) / 2;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < ntiles; ++t) {
      int64_t ti = 0, rem = t;  // t-th pair (ti, tj) with tj <= ti
      while (rem > ti) rem -= ++ti;
      const int64_t tj = rem;
      const int64_t i0 = k0 + kb + ti * kCholTile, j0 = k0 + kb + tj * kCholTile;
      const int64_t ni = std::min(kCholTile, n - i0), nj = std::min(kCholTile, n - j0);
      const int64_t ld = a.outerStride();
      T* base = a.data();
      if (!kernel_gemm<T>(-1, ni, nj, kb, base + i0 + k0 * ld, ld, base + j0 + k0 * ld, ld, 1,
                          base + i0 + j0 * ld, ld)) {
        a.block(i0, j0, ni, nj).noalias() -=
            a.block(i0, k0, ni, kb) * a.block(j0, k0, nj, kb).transpose();
      }
    }
  }
  return true;
}

// ---- GPTQ ------------------------------------------------------------------------------------

template <class T>
GptqResult gptq_impl(const float* w, int64_t rows, int64_t cols, const float* h,
                     const GptqOptions& opt) {
  const Grids<T> g = make_grids<T>(w, rows, cols, opt.grid);
  if (rows == 0 || cols == 0) return rtn_impl<T>(w, rows, cols, opt, g);
  if (h == nullptr)
    return fallback<T>(w, rows, cols, opt, g, "no Hessian (the expert saw no tokens)");
  const int threads = resolve_threads(opt.threads);
  const int64_t n = cols;

  // Diagonal: never-active inputs, dampening, column order. Only the upper triangle of h is read.
  std::vector<double> diag(static_cast<size_t>(n));
  std::vector<char> dead(static_cast<size_t>(n), 0);
  int64_t ndead = 0;
  for (int64_t i = 0; i < n; ++i) {
    diag[i] = h[i * n + i];
    if (!std::isfinite(diag[i]))
      return fallback<T>(w, rows, cols, opt, g, "Hessian holds non-finite entries");
    if (diag[i] == 0) {
      dead[i] = 1;
      diag[i] = 1;
      ++ndead;
    }
  }
  if (ndead == n)
    return fallback<T>(w, rows, cols, opt, g, "all-zero Hessian (the expert saw no tokens)");
  const double mean = std::accumulate(diag.begin(), diag.end(), 0.0) / static_cast<double>(n);
  const double lambda = std::max(opt.percdamp * mean, 1e-6);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (opt.actorder) {
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t x, int64_t y) { return diag[x] > diag[y]; });
  }

  // R = J P Hd P^T J (J reverses the order), lower triangle. Its Cholesky factor L gives
  // V = J L J, upper, with V V^T = P Hd P^T, and V = U^-1 for U the upper Cholesky factor of
  // (P Hd P^T)^-1.
  Mat<T> f = Mat<T>::Zero(n, n);
  bool finite = true;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(&& : finite)
  for (int64_t bcol = 0; bcol < n; ++bcol) {
    const int64_t j = perm[n - 1 - bcol];
    for (int64_t arow = bcol; arow < n; ++arow) {
      const int64_t i = perm[n - 1 - arow];
      double v = h[std::min(i, j) * n + std::max(i, j)];
      if (arow == bcol) v = diag[i] + lambda;
      finite = finite && std::isfinite(v);
      f(arow, bcol) = static_cast<T>(v);
    }
  }
  if (!finite) return fallback<T>(w, rows, cols, opt, g, "Hessian holds non-finite entries");
  if (!cholesky_tiled<T>(f, threads)) {
    return fallback<T>(w, rows, cols, opt, g, "Hessian is not positive definite after dampening");
  }
  // f <- V (upper triangle), then G(k, j) = V(k, j) / V(j, j): the weight of the error of column
  // k in the update of column j > k.
  f.reverseInPlace();
  std::vector<T> vdiag(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    vdiag[j] = f(j, j);
    f.col(j).head(j) /= vdiag[j];
  }
  const Mat<T>& gm = f;

  GptqResult res = empty_result(rows, cols, opt.grid);
  if (g.ternary) res.ternary.levels = g.level_bits;
  res.lambda = lambda;
  res.dead_inputs = ndead;

  const int64_t nchunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t bs = std::min<int64_t>(opt.blocksize, n);
  std::vector<double> chunk_loss(static_cast<size_t>(nchunks)),
      chunk_dd(static_cast<size_t>(nchunks));
#pragma omp parallel for schedule(dynamic, 1) \
    num_threads(static_cast <int>(std::min <int64_t>(threads, nchunks)))
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t r0 = ch * kRowChunk;
    const int64_t rc = std::min(kRowChunk, rows - r0);
    // w0: the chunk's weights in sweep order (never-active inputs set to 0); wc: the same with
    // the error feedback received so far.
    Mat<T> w0(rc, n);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t c = perm[k];
      for (int64_t r = 0; r < rc; ++r)
        w0(r, k) = dead[c] ? T(0) : static_cast<T>(w[(r0 + r) * cols + c]);
    }
    Mat<T> wc = w0;
    Mat<T> dblk(rc, bs);
    double loss = 0.0, dd = 0.0;
    for (int64_t i1 = 0; i1 < n; i1 += bs) {
      const int64_t i2 = std::min(i1 + bs, n);
      // Inside the block, sub-blocks of kSubBlock columns: feedback one column at a time within
      // a sub-block, then one small GEMM for the rest of the block (rank-1 updates alone run at
      // memory speed and dominated the time for short rows).
      for (int64_t s1 = i1; s1 < i2; s1 += kSubBlock) {
        const int64_t s2 = std::min(s1 + kSubBlock, i2);
        for (int64_t k = s1; k < s2; ++k) {
          const int64_t c = perm[k];
          const T vkk = vdiag[k];
          // Quantize column k of the chunk; the grid kind is a template argument so that the
          // per-weight loop has no branch on it.
          auto column = [&]<bool kTernary>() {
            // Raw pointers and local sums: the uint8 symbol stores could otherwise alias them.
            const T* xk = wc.col(k).data();
            const T* x0 = w0.col(k).data();
            T* dk = dblk.col(k - i1).data();
            uint8_t* sym = g.ternary ? res.ternary.symbols.data() + r0 * cols + c : nullptr;
            float* deq = g.ternary ? nullptr : res.dequantized.data() + r0 * cols + c;
            double l = 0.0, d2 = 0.0;
            for (int64_t r = 0; r < rc; ++r) {
              uint8_t sv;
              const T x = xk[r];
              const T q = g.template quantize_as<kTernary>(r0 + r, x, sv);
              const T d = x0[r] - q;
              const T e = (x - q) * vkk;
              l += static_cast<double>(e) * static_cast<double>(e);
              d2 += static_cast<double>(d) * static_cast<double>(d);
              dk[r] = d;
              if constexpr (kTernary) {
                sym[r * cols] = sv;
              } else {
                deq[r * cols] = static_cast<float>(q);
              }
            }
            loss += l;
            dd += d2;
          };
          if (g.ternary) {
            column.template operator()<true>();
          } else {
            column.template operator()<false>();
          }
          for (int64_t j = k + 1; j < s2; ++j) wc.col(j) += gm(k, j) * dblk.col(k - i1);
        }
        if (s2 < i2 && !kernel_gemm<T>(
                           1, rc, i2 - s2, s2 - s1, dblk.data() + (s1 - i1) * dblk.outerStride(),
                           dblk.outerStride(), gm.data() + s1 + s2 * gm.outerStride(), 1,
                           gm.outerStride(), wc.data() + s2 * wc.outerStride(), wc.outerStride())) {
          wc.middleCols(s2, i2 - s2).noalias() +=
              dblk.middleCols(s1 - i1, s2 - s1) * gm.block(s1, s2, s2 - s1, i2 - s2);
        }
      }
      // Lazy update of every later column at once.
      if (i2 < n && !kernel_gemm<T>(1, rc, n - i2, i2 - i1, dblk.data(), dblk.outerStride(),
                                    gm.data() + i1 + i2 * gm.outerStride(), 1, gm.outerStride(),
                                    wc.data() + i2 * wc.outerStride(), wc.outerStride())) {
        wc.rightCols(n - i2).noalias() +=
            dblk.leftCols(i2 - i1) * gm.block(i1, i2, i2 - i1, n - i2);
      }
    }
    chunk_loss[ch] = loss;
    chunk_dd[ch] = dd;
  }
  double loss = 0.0, dd = 0.0;
  for (int64_t ch = 0; ch < nchunks; ++ch) {  // fixed order
    loss += chunk_loss[ch];
    dd += chunk_dd[ch];
  }
  res.loss = 0.5 * loss;
  res.output_loss = res.loss - 0.5 * lambda * dd;
  if (!std::isfinite(res.loss)) {
    return fallback<T>(w, rows, cols, opt, g,
                       "GPTQ produced a non-finite loss (ill-conditioned Hessian)");
  }
  return res;
}

}  // namespace

std::string_view gptq_grid_name(GptqGrid g) {
  switch (g) {
    case GptqGrid::kTernary:
      return "ternary";
    case GptqGrid::kTernarySymmetric:
      return "ternary-sym";
    case GptqGrid::kUniform2:
      return "uniform2";
    case GptqGrid::kUniform3:
      return "uniform3";
    case GptqGrid::kUniform4:
      return "uniform4";
  }
  return "unknown";
}

bool gptq_grid_is_ternary(GptqGrid g) {
  return is_ternary(g);
}

GptqResult gptq_quantize(const float* w, int64_t rows, int64_t cols, const float* h,
                         const GptqOptions& opt) {
  validate(w, rows, cols, opt);
  if (opt.double_precision) return gptq_impl<double>(w, rows, cols, h, opt);
  return gptq_impl<float>(w, rows, cols, h, opt);
}

namespace {
std::vector<float> hessian_for(const HessianAccumulator& acc, int64_t cols) {
  if (acc.dim() != cols) {
    throw InvalidArgument("gptq: Hessian dimension " + std::to_string(acc.dim()) +
                          " != number of columns " + std::to_string(cols));
  }
  return acc.hessian();
}
}  // namespace

GptqResult gptq_quantize(const float* w, int64_t rows, int64_t cols, const HessianAccumulator& acc,
                         const GptqOptions& opt) {
  const std::vector<float> h = hessian_for(acc, cols);
  return gptq_quantize(w, rows, cols, h.empty() ? nullptr : h.data(), opt);
}

GptqResult rtn_quantize(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt) {
  validate(w, rows, cols, opt);
  if (opt.double_precision)
    return rtn_impl<double>(w, rows, cols, opt, make_grids<double>(w, rows, cols, opt.grid));
  return rtn_impl<float>(w, rows, cols, opt, make_grids<float>(w, rows, cols, opt.grid));
}

int64_t gptq_workspace_bytes(int64_t rows, int64_t cols, const GptqOptions& opt, int threads) {
  if (rows < 0 || cols < 0) throw InvalidArgument("gptq_workspace_bytes: negative shape");
  const int64_t elem = opt.double_precision ? 8 : 4;
  const int64_t nchunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t active = std::max<int64_t>(1, std::min<int64_t>(resolve_threads(threads), nchunks));
  const int64_t bs =
      std::min<int64_t>(std::max<int64_t>(opt.blocksize, 1), std::max<int64_t>(cols, 1));
  const int64_t factor = cols * cols * elem + 2 * kCholTile * kCholTile * elem;
  const int64_t per_chunk = (2 * cols + bs) * std::min(kRowChunk, rows) * elem;
  return factor + active * per_chunk + cols * 24 + rows * 16;
}

double gptq_flops(int64_t rows, int64_t cols, int64_t blocksize) {
  const double r = static_cast<double>(rows), n = static_cast<double>(cols);
  double f = n * n * n / 3.0;
  const int64_t bs = std::max<int64_t>(1, blocksize);
  for (int64_t i1 = 0; i1 < cols; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, cols);
    const double b = static_cast<double>(i2 - i1);
    f += r * b * (b - 1);                               // feedback inside the block
    f += 2.0 * r * b * static_cast<double>(cols - i2);  // lazy update of later columns
  }
  return f;
}

CompressedExpert compress_matrix(const float* w, int64_t rows, int64_t cols, const float* h,
                                 const GptqOptions& opt, const EncodeOptions& enc) {
  if (!is_ternary(opt.grid)) throw InvalidArgument("compress_matrix: the grid must be ternary");
  GptqResult r = gptq_quantize(w, rows, cols, h, opt);
  CompressedExpert out;
  out.zero_fraction = r.ternary.zero_fraction();
  EncodeOptions e = enc;
  if (e.threads == 0) e.threads = opt.threads;
  out.matrix = encode(r.ternary, e);
  out.status = r.status;
  out.reason = std::move(r.reason);
  out.loss = r.loss;
  out.output_loss = r.output_loss;
  return out;
}

CompressedExpert compress_matrix(const float* w, int64_t rows, int64_t cols,
                                 const HessianAccumulator& acc, const GptqOptions& opt,
                                 const EncodeOptions& enc) {
  const std::vector<float> h = hessian_for(acc, cols);
  return compress_matrix(w, rows, cols, h.empty() ? nullptr : h.data(), opt, enc);
}

}  // namespace qmoe
