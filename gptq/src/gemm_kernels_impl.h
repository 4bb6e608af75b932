// Matrix products of qmoe_gptq (interface in gemm_kernels.h), compiled once per instruction set
// that has fused multiply-add (AVX2 + FMA, AVX-512). Everything here has internal
// linkage and calls only always-inline intrinsics and builtins, so no code compiled with AVX flags
// can be shared with another level.
//
// A register block of `kRows` rows of A times `kCols` columns of B keeps kRows x kCols sums in
// registers while p runs: per step, kCols / kWidth vector loads of B, kRows broadcasts of A and
// kRows * kCols / kWidth fused multiply-adds. Both operands are first packed, p by p, into
// contiguous panels padded with zeros to whole blocks (their strides may be large, and
// 4 KiB-multiple strides would alias in L1). Every output entry is a chain of fused multiply-adds
// in p order, so both levels give the same bits.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "gemm_kernels.h"

namespace qmoe::gptq_detail {
namespace {

#if defined(__AVX512F__)
using V = __m512;
constexpr int kWidth = 16;
constexpr int kRows = 12;  // 24 accumulators of 32 registers
inline V vzero() {
  return _mm512_setzero_ps();
}
inline V vload(const float* p) {
  return _mm512_loadu_ps(p);
}
inline V vbroadcast(const float* p) {
  return _mm512_set1_ps(*p);
}
inline V vfma(V a, V b, V c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline void vstore(float* p, V v) {
  _mm512_storeu_ps(p, v);
}
constexpr const char* kName = "avx512";
#elif defined(__AVX2__)
using V = __m256;
constexpr int kWidth = 8;
constexpr int kRows = 6;  // 12 accumulators of 16 registers
inline V vzero() {
  return _mm256_setzero_ps();
}
inline V vload(const float* p) {
  return _mm256_loadu_ps(p);
}
inline V vbroadcast(const float* p) {
  return _mm256_broadcast_ss(p);
}
inline V vfma(V a, V b, V c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline void vstore(float* p, V v) {
  _mm256_storeu_ps(p, v);
}
constexpr const char* kName = "avx2";
#else
#error "gemm_kernels_impl.h is compiled with AVX2 + FMA or AVX-512 flags"
#endif
constexpr int kCols = 2 * kWidth;

// Packs x(r, p) = x[r * rs + p * ps] for r < n, p < k into blocks of `width` values of r, each
// block p-major ([p][width]) and zero past n.
// The source is read along its contiguous direction (r when rs == 1, else p).
void pack(const float* x, int64_t rs, int64_t ps, int64_t n, int64_t k, int width, float* out) {
  for (int64_t b = 0; b < n; b += width) {
    const int64_t w = n - b < width ? n - b : width;
    float* blk = out + b * k;
    if (rs == 1) {
      for (int64_t p = 0; p < k; ++p) {
        const float* src = x + b + p * ps;
        float* dst = blk + p * width;
        int64_t r = 0;
        for (; r < w; ++r) dst[r] = src[r];
        for (; r < width; ++r) dst[r] = 0.0f;
      }
    } else {
      for (int64_t r = 0; r < width; ++r) {
        if (r < w) {
          const float* src = x + (b + r) * rs;
          for (int64_t p = 0; p < k; ++p) blk[p * width + r] = src[p * ps];
        } else {
          for (int64_t p = 0; p < k; ++p) blk[p * width + r] = 0.0f;
        }
      }
    }
  }
}

void gemm_rows(const Gemm& g) {
  const int64_t m_pad = (g.m + kRows - 1) / kRows * kRows;
  float* a = g.scratch;                // [m_pad / kRows][k][kRows]
  float* b = g.scratch + m_pad * g.k;  // [n_pad / kCols][k][kCols]
  pack(g.a, g.a_rs, g.a_cs, g.m, g.k, kRows, a);
  pack(g.b, g.b_cs, g.b_rs, g.n, g.k, kCols, b);
  // Column blocks outside: a block of B (kCols x k) stays in L1 while every row block of A (all of
  // A is m x k, in L2) passes by; B as a whole may be far larger than L2.
  for (int64_t j0 = 0; j0 < g.n; j0 += kCols) {
    const float* bp = b + j0 * g.k;
    for (int64_t i0 = 0; i0 < g.m; i0 += kRows) {
      const float* ap = a + i0 * g.k;
      V acc[kRows][2];
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = vzero();
      for (int64_t p = 0; p < g.k; ++p) {
        const V b0 = vload(bp + p * kCols), b1 = vload(bp + p * kCols + kWidth);
#pragma GCC unroll 12
        for (int r = 0; r < kRows; ++r) {
          const V av = vbroadcast(ap + p * kRows + r);
          acc[r][0] = vfma(av, b0, acc[r][0]);
          acc[r][1] = vfma(av, b1, acc[r][1]);
        }
      }
      const int64_t rows = g.m - i0 < kRows ? g.m - i0 : kRows;
      const int64_t cols = g.n - j0 < kCols ? g.n - j0 : kCols;
      // Unrolled with constant indices, so that acc stays in registers through the p loop.
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        if (r >= rows) break;
        float tmp[kCols];
        vstore(tmp, acc[r][0]);
        vstore(tmp + kWidth, acc[r][1]);
        float* dst = g.c + (i0 + r) * g.c_rs + j0 * g.c_cs;
        if (g.mode == 0) {
          for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] = tmp[q];
        } else if (g.mode > 0) {
          for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] += tmp[q];
        } else {
          for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] -= tmp[q];
        }
      }
    }
  }
}

// The register block is stored row by row, kCols consecutive entries of C(i, .) at a time. For a
// column-major C (c_rs == 1) that would scatter every store across columns, pages apart for a big
// C, so the product is computed transposed instead: C^T = B^T A^T. Each entry stays the same chain
// of fused multiply-adds (the products commute exactly), so the bits do not change.
void gemm(const Gemm& g) {
  if (g.c_cs == 1 || g.c_rs != 1) {
    gemm_rows(g);
    return;
  }
  Gemm t = g;
  t.m = g.n;
  t.n = g.m;
  t.a = g.b;
  t.a_rs = g.b_cs;
  t.a_cs = g.b_rs;
  t.b = g.a;
  t.b_rs = g.a_cs;
  t.b_cs = g.a_rs;
  t.c_rs = g.c_cs;
  t.c_cs = 1;
  gemm_rows(t);
}

}  // namespace
}  // namespace qmoe::gptq_detail
