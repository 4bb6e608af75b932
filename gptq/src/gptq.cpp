// GPTQ on the CPU. See gptq.h for the algorithm and the numerics; this file is laid out as:
// per-row grids, Hessian preparation (dead inputs, dampening, act-order, reversal), a tiled
// Cholesky factorisation, the column sweep over fixed row chunks, and the round-to-nearest path.
#include "qmoe/gptq/gptq.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>
#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "qmoe/core/bf16.h"
#include "qmoe/core/gemm.h"
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
  const TernaryOptions& t = opt.ternary;
  if (!(t.zero_threshold > 0) || !std::isfinite(t.zero_threshold))
    throw InvalidArgument("gptq: zero_threshold must be finite and > 0");
  if (!std::isfinite(t.zero_penalty)) throw InvalidArgument("gptq: zero_penalty must be finite");
  if (t.refit < 0 || t.refit > 64) throw InvalidArgument("gptq: refit must be in 0..64");
  if (t.levels != TernaryLevels::kMinMax && t.levels != TernaryLevels::kFit)
    throw InvalidArgument("gptq: unknown ternary levels");
  if (!is_ternary(opt.grid) && !t.is_default())
    throw InvalidArgument("gptq: ternary options need a ternary grid");
}

void validate(const RateControl& rate) {
  if (!(rate.target_bits >= 0) || !std::isfinite(rate.target_bits))
    throw InvalidArgument("rate control: target bits must be finite and >= 0");
  if (!(rate.tolerance > 0) || !std::isfinite(rate.tolerance))
    throw InvalidArgument("rate control: tolerance must be finite and > 0");
  if (rate.max_steps < 1) throw InvalidArgument("rate control: max_steps must be >= 1");
  if (rate.knob != RateKnob::kThreshold && rate.knob != RateKnob::kPenalty)
    throw InvalidArgument("rate control: unknown knob");
  if (rate.scope != RateScope::kMatrix && rate.scope != RateScope::kAll)
    throw InvalidArgument("rate control: unknown scope");
}

// ---- per-row grids ---------------------------------------------------------------------------

// The grid of every row (float32 arithmetic for the initial levels, as QMoE's quantizer).
// Ternary: a = lo, b = hi (the bf16-rounded levels), with the zero thresholds ta = t lo, tb = t hi
// and, with a zero penalty, pa = mu S / (2 lo), pb = mu S / (2 hi) (0 for a level that is 0).
// Uniform: a = scale, b = zero.
template <class T>
struct Grids {
  bool ternary = true;
  bool symmetric = false;
  bool penalty = false;  // zero penalty in use (pa, pb)
  T maxq = 0;
  double t = 0.5;    // zero threshold
  double mus = 0.0;  // zero penalty times the mean square weight S
  std::vector<T> a, b, ta, tb, pa, pb;
  std::vector<uint16_t> level_bits;  // ternary: 2*rows

  void set_levels(int64_t r, uint16_t lo_bits, uint16_t hi_bits) {
    level_bits[2 * r] = lo_bits;
    level_bits[2 * r + 1] = hi_bits;
    const T lo = static_cast<T>(bf16_to_float(lo_bits));
    const T hi = static_cast<T>(bf16_to_float(hi_bits));
    a[r] = lo;
    b[r] = hi;
    ta[r] = lo * static_cast<T>(t);  // t = 1/2: exactly lo/2, hi/2
    tb[r] = hi * static_cast<T>(t);
    if (penalty) {
      pa[r] = lo != 0 ? static_cast<T>(mus / (2.0 * static_cast<double>(lo))) : T(0);
      pb[r] = hi != 0 ? static_cast<T>(mus / (2.0 * static_cast<double>(hi))) : T(0);
    }
  }

  // Quantizes x on row r's grid: returns the value, sets the symbol (ternary: 0, 1 = lo, 2 = hi;
  // uniform: the integer code). A level whose value is 0 is always written as symbol 0. invd is
  // 1 / d_k of the column (used with a zero penalty only).
  template <bool kTernary, bool kPenalty>
  T quantize_as(int64_t r, T x, T invd, uint8_t& sym) const {
    if constexpr (kTernary) {
      T th = tb[r], tl = ta[r];
      if constexpr (kPenalty) {
        th = std::max(th + pb[r] * invd, T(0));
        tl = std::min(tl + pa[r] * invd, T(0));
      }
      const T lo = a[r], hi = b[r];
      if (x > th) {
        sym = hi != 0 ? 2 : 0;
        return hi;
      }
      if (x < tl) {
        sym = lo != 0 ? 1 : 0;
        return lo;
      }
      sym = 0;
      return T(0);
    } else {
      (void)invd;
      T q = std::nearbyint(x / a[r]) + b[r];  // round half to even, as torch.round
      q = std::clamp(q, T(0), maxq);
      sym = static_cast<uint8_t>(q);
      return a[r] * (q - b[r]);
    }
  }
  T quantize(int64_t r, T x, T invd, uint8_t& sym) const {
    if (!ternary) return quantize_as<false, false>(r, x, invd, sym);
    return penalty ? quantize_as<true, true>(r, x, invd, sym)
                   : quantize_as<true, false>(r, x, invd, sym);
  }
};

template <class T>
Grids<T> make_grids(const float* w, int64_t rows, int64_t cols, GptqGrid grid,
                    const TernaryOptions& to) {
  Grids<T> g;
  g.ternary = is_ternary(grid);
  g.symmetric = grid == GptqGrid::kTernarySymmetric;
  g.a.resize(static_cast<size_t>(rows));
  g.b.resize(static_cast<size_t>(rows));
  const int bits = uniform_bits(grid);
  const float maxq = bits > 0 ? static_cast<float>((1 << bits) - 1) : 0.0f;
  g.maxq = static_cast<T>(maxq);
  double sumsq = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (!std::isfinite(row[c])) {
        throw InvalidArgument("gptq: row " + std::to_string(r) + " holds a non-finite weight");
      }
    }
  }
  if (g.ternary) {
    g.level_bits.resize(static_cast<size_t>(2 * rows));
    g.ta.resize(static_cast<size_t>(rows));
    g.tb.resize(static_cast<size_t>(rows));
    g.t = to.zero_threshold;
    g.penalty = to.zero_penalty != 0.0;
    if (g.penalty) {
      for (int64_t i = 0; i < rows * cols; ++i) sumsq += static_cast<double>(w[i]) * w[i];
      g.mus = to.zero_penalty * sumsq / static_cast<double>(std::max<int64_t>(rows * cols, 1));
      g.pa.resize(static_cast<size_t>(rows));
      g.pb.resize(static_cast<size_t>(rows));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float mn = 0.0f, mx = 0.0f;  // min(row, 0), max(row, 0), as encoder/ternarize_rtn()
    const float* row = w + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      mn = std::min(mn, row[c]);
      mx = std::max(mx, row[c]);
    }
    if (g.ternary) {
      uint16_t lo_bits, hi_bits;
      if (g.symmetric) {
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
      g.set_levels(r, lo_bits, hi_bits);
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

// Level bits of a least-squares level (bf16, sign kept: a negative level stays <= 0).
uint16_t level_bits_of(double v) {
  return float_to_bf16(static_cast<float>(v));
}

// TernaryLevels::kFit: per row, 8 Lloyd iterations from the current levels: round every weight
// with the grid's rule (invd[c] = 1 / d_c), then set each level to the d-weighted mean of the
// weights rounded to it (symmetric grids: one magnitude, the weighted mean of |w|). d = nullptr:
// all 1. Rows are independent.
template <class T>
void fit_levels(const float* w, const std::vector<char>* dead, int64_t rows, int64_t cols,
                const std::vector<T>* invd, const std::vector<double>* d, Grids<T>& g,
                int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    for (int it = 0; it < 8; ++it) {
      double sa = 0, wa = 0, sb = 0, wb = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const T x = dead && (*dead)[c] ? T(0) : static_cast<T>(w[r * cols + c]);
        uint8_t s;
        g.quantize(r, x, invd ? (*invd)[c] : T(1), s);
        const double dc = d ? (*d)[c] : 1.0;
        if (s == 1) {
          sa += dc * static_cast<double>(x);
          wa += dc;
        } else if (s == 2) {
          sb += dc * static_cast<double>(x);
          wb += dc;
        }
      }
      uint16_t lo_bits = g.level_bits[2 * r], hi_bits = g.level_bits[2 * r + 1];
      if (g.symmetric) {
        if (wa + wb == 0) break;
        const double m = (sb - sa) / (wa + wb);
        if (!(m > 0) || !std::isfinite(m)) break;
        hi_bits = level_bits_of(m);
        if (bf16_to_float(lo_bits) != 0.0f) lo_bits = level_bits_of(-m);
      } else {
        if (wa > 0) lo_bits = level_bits_of(std::min(sa / wa, 0.0));
        if (wb > 0) hi_bits = level_bits_of(std::max(sb / wb, 0.0));
      }
      if (bf16_to_float(lo_bits) == 0.0f && bf16_to_float(hi_bits) == 0.0f) break;
      if (lo_bits == g.level_bits[2 * r] && hi_bits == g.level_bits[2 * r + 1]) break;
      g.set_levels(r, lo_bits, hi_bits);
    }
  }
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

// ||W0 - Q||^2 in float64 of a ternary result (W0: w with never-active inputs set to 0), summed
// per row then over rows in order.
double weight_error(const float* w, const std::vector<char>* dead, int64_t rows, int64_t cols,
                    const TernaryMatrix& t, int threads) {
  std::vector<double> per_row(static_cast<size_t>(rows));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const double lv[3] = {0.0, bf16_to_float(t.levels[2 * r]), bf16_to_float(t.levels[2 * r + 1])};
    double s = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const double x = dead && (*dead)[c] ? 0.0 : static_cast<double>(w[r * cols + c]);
      const double e = x - lv[t.symbols[static_cast<size_t>(r * cols + c)]];
      s += e * e;
    }
    per_row[static_cast<size_t>(r)] = s;
  }
  double dd = 0;
  for (double v : per_row) dd += v;
  return dd;
}

// The refit: each row's levels replaced by the pair (symmetric grids: the magnitude) that
// minimises 0.5 (w0 - q) Hd (w0 - q)^T for the row's symbols, bf16-rounded, where that lowers it.
// hd: the full dampened Hessian (column-major, original order); nullptr: Hd = ident * I. Returns
// the change of the loss (<= 0), summed per row then over rows in order.
template <class T>
double refit_levels(const float* w, const std::vector<char>* dead, int64_t rows, int64_t cols,
                    const Mat<T>* hd, double ident, TernaryMatrix& t, Grids<T>& g, int threads) {
  std::vector<double> delta(static_cast<size_t>(rows), 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> u, v;
    std::vector<int64_t> ia, ib;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* sym = t.symbols.data() + r * cols;
      ia.clear();
      ib.clear();
      for (int64_t c = 0; c < cols; ++c) {
        if (sym[c] == 1) ia.push_back(c);
        if (sym[c] == 2) ib.push_back(c);
      }
      if (ia.empty() && ib.empty()) continue;
      auto w0 = [&](int64_t c) {
        return dead && (*dead)[c] ? 0.0 : static_cast<double>(w[r * cols + c]);
      };
      // aa = a^T H a, ab = a^T H b, bb = b^T H b, aw = a^T H w0, bw = b^T H w0 (a, b: indicators).
      double aa = 0, ab = 0, bb = 0, aw = 0, bw = 0;
      if (hd == nullptr) {
        aa = ident * static_cast<double>(ia.size());
        bb = ident * static_cast<double>(ib.size());
        for (int64_t c : ia) aw += ident * w0(c);
        for (int64_t c : ib) bw += ident * w0(c);
      } else {
        u.assign(static_cast<size_t>(cols), 0.0);
        v.assign(static_cast<size_t>(cols), 0.0);
        for (int64_t c : ia) {
          const T* col = hd->data() + c * cols;
          for (int64_t j = 0; j < cols; ++j) u[j] += static_cast<double>(col[j]);
        }
        for (int64_t c : ib) {
          const T* col = hd->data() + c * cols;
          for (int64_t j = 0; j < cols; ++j) v[j] += static_cast<double>(col[j]);
        }
        for (int64_t c : ia) aa += u[c];
        for (int64_t c : ib) ab += u[c];
        for (int64_t c : ib) bb += v[c];
        for (int64_t j = 0; j < cols; ++j) {
          const double x = w0(j);
          aw += u[j] * x;
          bw += v[j] * x;
        }
      }
      const double lo0 = bf16_to_float(g.level_bits[2 * r]);
      const double hi0 = bf16_to_float(g.level_bits[2 * r + 1]);
      // 0.5 q H q - q H w0 for q = lo a + hi b (the loss up to a constant).
      auto loss = [&](double lo, double hi) {
        return 0.5 * (lo * lo * aa + 2 * lo * hi * ab + hi * hi * bb) - lo * aw - hi * bw;
      };
      double lo = lo0, hi = hi0;
      if (g.symmetric) {
        const double den = aa - 2 * ab + bb;  // s^T H s for s = b - a
        if (den > 0) {
          const double m = (bw - aw) / den;
          if (m > 0 && std::isfinite(m)) {
            hi = m;
            if (lo0 != 0) lo = -m;
          }
        }
      } else {
        const double det = aa * bb - ab * ab;
        if (!ia.empty() && !ib.empty() && det > 1e-12 * aa * bb) {
          lo = (aw * bb - bw * ab) / det;
          hi = (bw * aa - aw * ab) / det;
        }
        if (!(lo <= 0 && hi >= 0 && std::isfinite(lo) && std::isfinite(hi))) lo = lo0, hi = hi0;
        if (lo == lo0 && hi == hi0) {  // one level alone, the other fixed
          if (!ib.empty() && bb > 0) hi = std::max((bw - lo0 * ab) / bb, 0.0);
          if (!ia.empty() && aa > 0) lo = std::min((aw - hi * ab) / aa, 0.0);
          if (!std::isfinite(lo) || !std::isfinite(hi)) lo = lo0, hi = hi0;
        }
      }
      const uint16_t lo_bits = level_bits_of(lo), hi_bits = level_bits_of(hi);
      if (bf16_to_float(lo_bits) == 0.0f && !ia.empty()) continue;  // symbol 1 must stay non-zero
      if (bf16_to_float(hi_bits) == 0.0f && !ib.empty()) continue;
      const double d = loss(bf16_to_float(lo_bits), bf16_to_float(hi_bits)) - loss(lo0, hi0);
      if (!(d < 0)) continue;
      delta[static_cast<size_t>(r)] = d;
      g.set_levels(r, lo_bits, hi_bits);
      t.levels[2 * r] = lo_bits;
      t.levels[2 * r + 1] = hi_bits;
    }
  }
  double sum = 0;
  for (double d : delta) sum += d;
  return sum;
}

// Rounds of sweep + refit (TernaryOptions::refit): `sweep` quantizes with the current grid; after
// each, the levels are refitted; the result of least loss is returned. loss and output_loss of the
// results are kept consistent (output_loss = loss - lambda/2 ||W0 - Q||^2).
template <class T, class Sweep>
GptqResult refit_rounds(const float* w, const std::vector<char>* dead, int64_t rows, int64_t cols,
                        const Mat<T>* hd, double ident, const GptqOptions& opt, Grids<T>& g,
                        int threads, Sweep&& sweep) {
  GptqResult cur = sweep(g);
  const int rounds = g.ternary ? opt.ternary.refit : 0;
  if (rounds == 0) return cur;
  GptqResult best;
  bool have_best = false;
  for (int k = 0; k < rounds; ++k) {
    if (k > 0) cur = sweep(g);
    cur.loss += refit_levels<T>(w, dead, rows, cols, hd, ident, cur.ternary, g, threads);
    const double dd = weight_error(w, dead, rows, cols, cur.ternary, threads);
    cur.output_loss = cur.loss - 0.5 * cur.lambda * dd;
    cur.rounds = k + 1;
    if (!have_best || cur.loss < best.loss) {
      best = cur;
      have_best = true;
    }
  }
  best.rounds = rounds;
  return best;
}

// ---- round to nearest ------------------------------------------------------------------------

template <class T>
GptqResult rtn_round(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt,
                     const Grids<T>& g) {
  GptqResult res = empty_result(rows, cols, opt.grid);
  if (g.ternary) res.ternary.levels = g.level_bits;
  double dd = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      uint8_t s;
      const T q = g.quantize(r, static_cast<T>(w[i]), T(1), s);
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

// Round to nearest on the grid g (with TernaryOptions: fitted levels, rounding rule, refit with
// the identity Hessian).
template <class T>
GptqResult rtn_impl(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt,
                    Grids<T> g) {
  const int threads = resolve_threads(opt.threads);
  if (g.ternary && opt.ternary.levels == TernaryLevels::kFit)
    fit_levels<T>(w, nullptr, rows, cols, nullptr, nullptr, g, threads);
  return refit_rounds<T>(w, nullptr, rows, cols, nullptr, 1.0 + opt.percdamp, opt, g, threads,
                         [&](const Grids<T>& gg) { return rtn_round<T>(w, rows, cols, opt, gg); });
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

// The dampened Hessian, factored for the column sweep; computed once per matrix and shared by
// every sweep (refit rounds, rate control).
template <class T>
struct Factor {
  std::string reason;  // non-empty: no usable Hessian, fall back to round to nearest
  int64_t n = 0;
  std::vector<int64_t> perm;
  std::vector<char> dead;
  int64_t ndead = 0;
  double lambda = 0;
  std::vector<double> diag;  // diag H, never-active inputs set to 1 (before dampening)
  Mat<T> gm;                 // G(k, j) = V(k, j) / V(j, j) for k < j (sweep order)
  std::vector<T> vdiag;      // V(j, j)
  std::vector<T> invd;       // mean_j V_jj^2 / V_kk^2 (sweep order), with a zero penalty
  std::vector<T> invd_orig;  // the same in the original column order
  std::vector<double> dfit;  // (diag_c + lambda) / mean: the weights of TernaryLevels::kFit
  Mat<T> hd;                 // the full dampened Hessian (original order), for the refit
};

// want_invd: the column weights of the zero penalty even when opt has none (rate control).
template <class T>
Factor<T> factor_hessian(const float* h, int64_t n, const GptqOptions& opt, int threads,
                         bool want_invd) {
  Factor<T> f;
  f.n = n;
  if (h == nullptr) {
    f.reason = "no Hessian (the expert saw no tokens)";
    return f;
  }
  // Diagonal: never-active inputs, dampening, column order. Only the upper triangle of h is read.
  f.diag.resize(static_cast<size_t>(n));
  f.dead.assign(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    f.diag[i] = h[i * n + i];
    if (!std::isfinite(f.diag[i])) {
      f.reason = "Hessian holds non-finite entries";
      return f;
    }
    if (f.diag[i] == 0) {
      f.dead[i] = 1;
      f.diag[i] = 1;
      ++f.ndead;
    }
  }
  if (f.ndead == n) {
    f.reason = "all-zero Hessian (the expert saw no tokens)";
    return f;
  }
  const double mean = std::accumulate(f.diag.begin(), f.diag.end(), 0.0) / static_cast<double>(n);
  const double lambda = std::max(opt.percdamp * mean, 1e-6);
  f.lambda = lambda;
  f.perm.resize(static_cast<size_t>(n));
  std::iota(f.perm.begin(), f.perm.end(), int64_t{0});
  if (opt.actorder) {
    std::stable_sort(f.perm.begin(), f.perm.end(),
                     [&](int64_t x, int64_t y) { return f.diag[x] > f.diag[y]; });
  }
  const auto& perm = f.perm;
  const auto& diag = f.diag;

  // R = J P Hd P^T J (J reverses the order), lower triangle. Its Cholesky factor L gives
  // V = J L J, upper, with V V^T = P Hd P^T, and V = U^-1 for U the upper Cholesky factor of
  // (P Hd P^T)^-1.
  Mat<T>& m = f.gm;
  m = Mat<T>::Zero(n, n);
  bool finite = true;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(&& : finite)
  for (int64_t bcol = 0; bcol < n; ++bcol) {
    const int64_t j = perm[n - 1 - bcol];
    for (int64_t arow = bcol; arow < n; ++arow) {
      const int64_t i = perm[n - 1 - arow];
      double v = h[std::min(i, j) * n + std::max(i, j)];
      if (arow == bcol) v = diag[i] + lambda;
      finite = finite && std::isfinite(v);
      m(arow, bcol) = static_cast<T>(v);
    }
  }
  if (!finite) {
    f.reason = "Hessian holds non-finite entries";
    return f;
  }
  if (!cholesky_tiled<T>(m, threads)) {
    f.reason = "Hessian is not positive definite after dampening";
    return f;
  }
  // m <- V (upper triangle), then G(k, j) = V(k, j) / V(j, j): the weight of the error of column
  // k in the update of column j > k.
  m.reverseInPlace();
  f.vdiag.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    f.vdiag[j] = m(j, j);
    m.col(j).head(j) /= f.vdiag[j];
  }
  const TernaryOptions& to = opt.ternary;
  if (is_ternary(opt.grid) && (to.zero_penalty != 0.0 || want_invd)) {
    double s = 0;
    for (int64_t k = 0; k < n; ++k) s += static_cast<double>(f.vdiag[k]) * f.vdiag[k];
    const double mv = s / static_cast<double>(n);
    f.invd.resize(static_cast<size_t>(n));
    f.invd_orig.resize(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) {
      f.invd[k] = static_cast<T>(mv / (static_cast<double>(f.vdiag[k]) * f.vdiag[k]));
      f.invd_orig[perm[k]] = f.invd[k];
    }
  }
  if (is_ternary(opt.grid) && to.levels == TernaryLevels::kFit) {
    f.dfit.resize(static_cast<size_t>(n));
    const double md = mean + lambda;
    for (int64_t c = 0; c < n; ++c) f.dfit[c] = (diag[c] + lambda) / md;
  }
  if (is_ternary(opt.grid) && to.refit > 0) {
    f.hd.resize(n, n);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < n; ++i)
        f.hd(i, j) = i == j ? static_cast<T>(diag[i] + lambda)
                            : static_cast<T>(h[std::min(i, j) * n + std::max(i, j)]);
  }
  return f;
}

// One column sweep of GPTQ over every row with the grid g: symbols (or dequantized values), the
// loss and ||W0 - Q||^2.
template <class T>
GptqResult sweep(const float* w, int64_t rows, int64_t cols, const Factor<T>& f, const Grids<T>& g,
                 const GptqOptions& opt, int threads) {
  const int64_t n = cols;
  const auto& perm = f.perm;
  const auto& dead = f.dead;
  const auto& vdiag = f.vdiag;
  const Mat<T>& gm = f.gm;
  GptqResult res = empty_result(rows, cols, opt.grid);
  if (g.ternary) res.ternary.levels = g.level_bits;
  res.lambda = f.lambda;
  res.dead_inputs = f.ndead;

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
          const T invd = g.penalty ? f.invd[k] : T(1);
          // Quantize column k of the chunk; the grid kind and the rounding rule are template
          // arguments so that the per-weight loop has no branch on them.
          auto column = [&]<bool kTernary, bool kPenalty>() {
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
              const T q = g.template quantize_as<kTernary, kPenalty>(r0 + r, x, invd, sv);
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
          if (!g.ternary) {
            column.template operator()<false, false>();
          } else if (g.penalty) {
            column.template operator()<true, true>();
          } else {
            column.template operator()<true, false>();
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
  res.output_loss = res.loss - 0.5 * f.lambda * dd;
  return res;
}

// GPTQ of one matrix with a factored Hessian (or the fallback it calls for).
template <class T>
GptqResult gptq_run(const float* w, int64_t rows, int64_t cols, const Factor<T>& f,
                    const GptqOptions& opt, Grids<T> g) {
  if (rows == 0 || cols == 0) return rtn_impl<T>(w, rows, cols, opt, g);
  if (!f.reason.empty()) return fallback<T>(w, rows, cols, opt, g, f.reason);
  const int threads = resolve_threads(opt.threads);
  if (g.ternary && opt.ternary.levels == TernaryLevels::kFit)
    fit_levels<T>(w, &f.dead, rows, cols, g.penalty ? &f.invd_orig : nullptr, &f.dfit, g, threads);
  GptqResult res = refit_rounds<T>(
      w, &f.dead, rows, cols, &f.hd, 0.0, opt, g, threads,
      [&](const Grids<T>& gg) { return sweep<T>(w, rows, cols, f, gg, opt, threads); });
  if (!std::isfinite(res.loss)) {
    return fallback<T>(w, rows, cols, opt, make_grids<T>(w, rows, cols, opt.grid, opt.ternary),
                       "GPTQ produced a non-finite loss (ill-conditioned Hessian)");
  }
  return res;
}

// The Hessian's factor, or only the reason to fall back (no work for an empty matrix).
template <class T>
Factor<T> factor_for(const float* h, int64_t rows, int64_t cols, const GptqOptions& opt,
                     bool want_invd = false) {
  if (rows == 0 || cols == 0 || h == nullptr) {
    Factor<T> none;
    none.reason = "no Hessian (the expert saw no tokens)";
    return none;
  }
  return factor_hessian<T>(h, cols, opt, resolve_threads(opt.threads), want_invd);
}

template <class T>
GptqResult gptq_impl(const float* w, int64_t rows, int64_t cols, const float* h,
                     const GptqOptions& opt) {
  // The grids first: they check the weights before any work on the Hessian.
  Grids<T> g = make_grids<T>(w, rows, cols, opt.grid, opt.ternary);
  return gptq_run<T>(w, rows, cols, factor_for<T>(h, rows, cols, opt), opt, std::move(g));
}

// ---- rate control ----------------------------------------------------------------------------

struct Attempt {
  double knob = 0;
  double bits = 0;
  TernaryMatrix t;
  CompressResult out;
};

// 0.5 sum_r (w0_r - q_r) Hd (w0_r - q_r)^T and its output part (without lambda/2 ||W0 - Q||^2),
// in float64, from the Hessian's upper triangle (round to nearest: Hd = (1 + percdamp) I).
template <class T>
void exact_loss(const float* w, int64_t rows, int64_t cols, const float* h, const Factor<T>& f,
                const GptqOptions& opt, const TernaryMatrix& t, double& loss, double& output_loss) {
  const bool hess = f.reason.empty();
  const std::vector<char>* dead = hess ? &f.dead : nullptr;
  const int threads = resolve_threads(opt.threads);
  const double dd = weight_error(w, dead, rows, cols, t, threads);
  if (!hess) {
    loss = 0.5 * (1.0 + opt.percdamp) * dd;
    output_loss = 0.5 * dd;
    return;
  }
  Eigen::MatrixXd hd(cols, cols);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < cols; ++i)
      hd(i, j) = i == j ? f.diag[i] + f.lambda : h[std::min(i, j) * cols + std::max(i, j)];
  std::vector<double> per_row(static_cast<size_t>(rows));
#pragma omp parallel num_threads(threads)
  {
    Eigen::VectorXd e(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const double lv[3] = {0.0, bf16_to_float(t.levels[2 * r]),
                            bf16_to_float(t.levels[2 * r + 1])};
      for (int64_t c = 0; c < cols; ++c) {
        const double x = f.dead[c] ? 0.0 : static_cast<double>(w[r * cols + c]);
        e(c) = x - lv[t.symbols[static_cast<size_t>(r * cols + c)]];
      }
      per_row[static_cast<size_t>(r)] = e.dot(hd * e);
    }
  }
  double sum = 0;
  for (double v : per_row) sum += v;
  loss = 0.5 * sum;
  output_loss = loss - 0.5 * f.lambda * dd;
}

// compress_matrix() with a target size: the knob is searched (log2 t for the threshold, mu for the
// penalty) over one factored Hessian. bits(knob) falls as the knob grows; it is bracketed by steps
// of doubling length from the start, then bisected. Sizes jump where one decision changes the
// rest of a row (more so with refit rounds, whose best round can change), so a search can end
// between two sizes on either side of the tolerance band: then the closest size above the target
// is trimmed, its cheapest non-zero weights (d_c q^2, in order) set to zero, as many as it takes.
template <class T>
CompressResult compress_at_rate(const float* w, int64_t rows, int64_t cols, const float* h,
                                const GptqOptions& opt, const EncodeOptions& enc,
                                const RateControl& rate) {
  make_grids<T>(w, rows, cols, opt.grid, opt.ternary);  // checks the weights first
  const bool threshold = rate.knob == RateKnob::kThreshold;
  const Factor<T> f = factor_for<T>(h, rows, cols, opt, /*want_invd=*/true);
  int steps = 0;
  auto attempt = [&](double knob) {
    GptqOptions o = opt;
    if (threshold) {
      o.ternary.zero_threshold = std::exp2(knob);
    } else {
      o.ternary.zero_penalty = knob;
    }
    GptqResult r =
        gptq_run<T>(w, rows, cols, f, o, make_grids<T>(w, rows, cols, o.grid, o.ternary));
    Attempt a;
    a.knob = knob;
    a.out.zero_fraction = r.ternary.zero_fraction();
    a.out.matrix = encode(r.ternary, enc);
    a.bits = a.out.matrix.view().bits_per_weight();
    a.out.bits_per_weight = a.bits;
    a.out.status = r.status;
    a.out.reason = std::move(r.reason);
    a.out.loss = r.loss;
    a.out.output_loss = r.output_loss;
    a.out.zero_threshold = o.ternary.zero_threshold;
    a.out.zero_penalty = o.ternary.zero_penalty;
    a.t = std::move(r.ternary);
    ++steps;
    return a;
  };
  const double target = rate.target_bits;
  auto err = [&](const Attempt& a) { return std::abs(a.bits - target); };
  const double start = threshold ? std::log2(opt.ternary.zero_threshold) : opt.ternary.zero_penalty;
  Attempt best = attempt(start);
  Attempt above;  // the smallest size above the target seen (bits 0: none)
  double lo_bits = best.bits, hi_bits = best.bits;
  auto consider = [&](Attempt&& a) {
    lo_bits = std::min(lo_bits, a.bits);
    hi_bits = std::max(hi_bits, a.bits);
    const double b = a.bits, k = a.knob;
    if (b > target && (above.bits == 0 || b < above.bits)) above = a;
    if (err(a) < err(best)) best = std::move(a);
    return std::pair{k, b};
  };
  if (best.bits > target) above = best;
  bool at_limit = false;  // the bracket reached the knob's end without crossing the target
  if (err(best) > rate.tolerance) {
    // Bracket: more zeros (a larger knob) when the size is above the target.
    const double dir = best.bits > target ? 1.0 : -1.0;
    const double limit = threshold ? 12.0 : 1e6;  // |log2 t| <= 12, |mu| <= 1e6
    double inside = start, step = 0.25, outside = start;
    bool bracketed = false;
    while (steps < rate.max_steps) {
      const double k = start + dir * step;
      if (std::abs(k) > limit) {
        at_limit = true;
        break;
      }
      const auto [kk, b] = consider(attempt(k));
      if (err(best) <= rate.tolerance) break;
      if ((b - target) * dir <= 0) {  // crossed the target
        outside = kk;
        bracketed = true;
        break;
      }
      inside = kk;
      step *= 2;
    }
    // Bisection between `inside` (bits on the start's side of the target) and `outside`.
    while (bracketed && err(best) > rate.tolerance && steps < rate.max_steps &&
           std::abs(outside - inside) > 1e-9 * std::max(1.0, std::abs(inside))) {
      const double k = 0.5 * (inside + outside);
      const auto [kk, b] = consider(attempt(k));
      if ((b - target) * dir > 0) {
        inside = kk;
      } else {
        outside = kk;
      }
    }
  }
  if (err(best) > rate.tolerance && above.bits > 0) {
    // Trim: the cheapest non-zero weights of `above` to zero, by bisection on their number (all
    // of them: an all-zero matrix, below any target but its offsets and levels), also when the
    // bracket reached the knob's end with every size seen above the target.
    std::vector<double> d(static_cast<size_t>(cols), 1.0);
    if (f.reason.empty())
      for (int64_t k = 0; k < cols; ++k) d[f.perm[k]] = 1.0 / static_cast<double>(f.invd[k]);
    std::vector<std::pair<double, int64_t>> cand;
    for (int64_t i = 0; i < rows * cols; ++i) {
      const uint8_t sv = above.t.symbols[static_cast<size_t>(i)];
      if (sv == 0) continue;
      const double q = bf16_to_float(above.t.levels[static_cast<size_t>(2 * (i / cols) + sv - 1)]);
      cand.emplace_back(d[i % cols] * q * q, i);
    }
    std::sort(cand.begin(), cand.end());
    int64_t lo = 0, hi = static_cast<int64_t>(cand.size());  // sizes: above at lo, below at hi
    int trims = 0;
    while (hi - lo > 1 && err(best) > rate.tolerance && trims < 64) {
      const int64_t mid = lo + (hi - lo) / 2;
      Attempt a;
      a.knob = above.knob;
      a.t = above.t;
      for (int64_t k = 0; k < mid; ++k) a.t.symbols[static_cast<size_t>(cand[k].second)] = 0;
      a.out = above.out;
      a.out.matrix = encode(a.t, enc);
      a.bits = a.out.matrix.view().bits_per_weight();
      a.out.bits_per_weight = a.bits;
      a.out.zero_fraction = a.t.zero_fraction();
      a.out.trimmed = mid;
      ++steps;
      ++trims;
      if (a.bits > target) {
        lo = mid;
      } else {
        hi = mid;
      }
      if (err(a) < err(best)) best = std::move(a);
    }
    if (best.out.trimmed > 0)
      exact_loss<T>(w, rows, cols, h, f, opt, best.t, best.out.loss, best.out.output_loss);
  }
  if (err(best) > rate.tolerance && rate.accept_below && at_limit && hi_bits < target) {
    // Every size the knob reaches is below the target (a matrix whose Hessian zeroes many
    // columns: a denser rounding of the rest codes no longer, or even shorter): the largest.
    best.out.below_target = true;
  } else if (err(best) > rate.tolerance) {
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "rate control: %.4f bits per weight not reached within %.4f after %d "
                  "encodings (sizes seen: %.4f to %.4f bits per weight)",
                  target, rate.tolerance, steps, lo_bits, hi_bits);
    throw InvalidArgument(buf);
  }
  best.out.rate_steps = steps;
  return std::move(best.out);
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

std::string_view ternary_levels_name(TernaryLevels l) {
  switch (l) {
    case TernaryLevels::kMinMax:
      return "minmax";
    case TernaryLevels::kFit:
      return "fit";
  }
  return "unknown";
}

std::string_view rate_knob_name(RateKnob k) {
  switch (k) {
    case RateKnob::kThreshold:
      return "threshold";
    case RateKnob::kPenalty:
      return "penalty";
  }
  return "unknown";
}

std::string_view rate_scope_name(RateScope s) {
  return s == RateScope::kAll ? "all" : "matrix";
}

RateScope rate_scope_from_name(std::string_view s) {
  if (s == "matrix") return RateScope::kMatrix;
  if (s == "all") return RateScope::kAll;
  throw InvalidArgument("rate control: unknown scope '" + std::string(s) + "' (matrix or all)");
}

std::vector<double> rate_targets(std::span<const std::pair<int64_t, int64_t>> shapes,
                                 const RateControl& rate) {
  std::vector<double> out(shapes.size(), rate.target_bits);
  if (rate.scope != RateScope::kAll) return out;
  auto overhead = [](int64_t rows) { return 32.0 * static_cast<double>(2 * rows + 1); };
  double bits = 0, weights = 0;
  for (const auto& [rows, cols] : shapes) {
    bits += overhead(rows);
    weights += static_cast<double>(rows) * static_cast<double>(cols);
  }
  const double codes = rate.target_bits - (weights > 0 ? bits / weights : 0.0);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const double n = static_cast<double>(shapes[i].first) * static_cast<double>(shapes[i].second);
    out[i] = n > 0 ? codes + overhead(shapes[i].first) / n : rate.target_bits;
  }
  return out;
}

TernaryLevels ternary_levels_from_name(std::string_view s) {
  if (s == "minmax") return TernaryLevels::kMinMax;
  if (s == "fit") return TernaryLevels::kFit;
  throw InvalidArgument("gptq: unknown ternary levels '" + std::string(s) + "' (minmax or fit)");
}

void gptq_validate_options(const GptqOptions& opt, const RateControl& rate) {
  validate(nullptr, 0, 0, opt);
  validate(rate);
  if (rate.enabled() && !is_ternary(opt.grid))
    throw InvalidArgument("rate control: the grid must be ternary");
}

RateKnob rate_knob_from_name(std::string_view s) {
  if (s == "threshold") return RateKnob::kThreshold;
  if (s == "penalty") return RateKnob::kPenalty;
  throw InvalidArgument("rate control: unknown knob '" + std::string(s) +
                        "' (threshold or penalty)");
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
    return rtn_impl<double>(w, rows, cols, opt,
                            make_grids<double>(w, rows, cols, opt.grid, opt.ternary));
  return rtn_impl<float>(w, rows, cols, opt,
                         make_grids<float>(w, rows, cols, opt.grid, opt.ternary));
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
  // The refit: the full dampened Hessian and the best round's symbols.
  const int64_t refit = opt.ternary.refit > 0 ? cols * cols * elem + rows * cols : 0;
  return factor + refit + active * per_chunk + cols * 24 + rows * 16;
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

CompressResult compress_matrix(const float* w, int64_t rows, int64_t cols, const float* h,
                               const GptqOptions& opt, const EncodeOptions& enc,
                               const RateControl& rate) {
  if (!is_ternary(opt.grid)) throw InvalidArgument("compress_matrix: the grid must be ternary");
  validate(rate);
  EncodeOptions e = enc;
  if (e.threads == 0) e.threads = opt.threads;
  if (rate.enabled()) {
    validate(w, rows, cols, opt);
    if (rows == 0 || cols == 0)
      throw InvalidArgument("rate control: an empty matrix has no size to aim at");
    if (opt.double_precision) return compress_at_rate<double>(w, rows, cols, h, opt, e, rate);
    return compress_at_rate<float>(w, rows, cols, h, opt, e, rate);
  }
  GptqResult r = gptq_quantize(w, rows, cols, h, opt);
  CompressResult out;
  out.zero_fraction = r.ternary.zero_fraction();
  out.matrix = encode(r.ternary, e);
  out.bits_per_weight = out.matrix.view().bits_per_weight();
  out.status = r.status;
  out.reason = std::move(r.reason);
  out.loss = r.loss;
  out.output_loss = r.output_loss;
  out.zero_threshold = opt.ternary.zero_threshold;
  out.zero_penalty = opt.ternary.zero_penalty;
  return out;
}

CompressResult compress_matrix(const float* w, int64_t rows, int64_t cols,
                               const HessianAccumulator& acc, const GptqOptions& opt,
                               const EncodeOptions& enc, const RateControl& rate) {
  const std::vector<float> h = hessian_for(acc, cols);
  return compress_matrix(w, rows, cols, h.empty() ? nullptr : h.data(), opt, enc, rate);
}

}  // namespace qmoe
