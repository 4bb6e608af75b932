// Block products of the Hessian sums (interface in hessian_kernels.h), compiled once per
// instruction set that has fused multiply-add (AVX2 + FMA, AVX-512). Everything here has internal
// linkage and calls only always-inline intrinsics and builtins, so no code compiled with AVX flags
// can be shared with another level.
//
// A register block of `kRows` rows of xi times `kCols` columns of xj keeps kRows x kCols sums in
// registers while the tokens stream by: per token, kCols / kWidth vector loads of xj, kRows
// broadcasts of xi and kRows * kCols / kWidth fused multiply-adds. Both operands are first packed
// token by token into contiguous panels (the rows of x are far apart, and 4 KiB-multiple strides
// would alias in L1), padded with zeros to whole blocks. Every output entry is a chain of fused
// multiply-adds in token order, so both levels give the same bits.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "hessian_kernels.h"

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
#error "hessian_kernels_impl.h is compiled with AVX2 + FMA or AVX-512 flags"
#endif
constexpr int kCols = 2 * kWidth;

// Copies columns [0, n) of nb rows of x (stride ld) into blocks of `width` columns, each block
// token-major ([t][width]) and zero past n.
void pack(const float* x, int64_t ld, int64_t nb, int64_t n, int width, float* out) {
  for (int64_t b = 0; b < n; b += width) {
    const int64_t w = n - b < width ? n - b : width;
    for (int64_t t = 0; t < nb; ++t) {
      const float* src = x + t * ld + b;
      float* dst = out + b * nb + t * width;
      int64_t c = 0;
      for (; c < w; ++c) dst[c] = src[c];
      for (; c < width; ++c) dst[c] = 0.0f;
    }
  }
}

void block_product(const float* xi, const float* xj, int64_t ld, int64_t nb, int64_t ni, int64_t nj,
                   float* prod, int64_t ldp, float* scratch) {
  const int64_t ni_pad = (ni + kRows - 1) / kRows * kRows;
  float* a = scratch;                // [ni_pad / kRows][nb][kRows]
  float* b = scratch + ni_pad * nb;  // [nj_pad / kCols][nb][kCols]
  pack(xi, ld, nb, ni, kRows, a);
  pack(xj, ld, nb, nj, kCols, b);
  for (int64_t i0 = 0; i0 < ni; i0 += kRows) {
    const float* ap = a + i0 * nb;
    for (int64_t j0 = 0; j0 < nj; j0 += kCols) {
      const float* bp = b + j0 * nb;
      V acc[kRows][2];
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = vzero();
      for (int64_t t = 0; t < nb; ++t) {
        const V b0 = vload(bp + t * kCols), b1 = vload(bp + t * kCols + kWidth);
#pragma GCC unroll 12
        for (int r = 0; r < kRows; ++r) {
          const V av = vbroadcast(ap + t * kRows + r);
          acc[r][0] = vfma(av, b0, acc[r][0]);
          acc[r][1] = vfma(av, b1, acc[r][1]);
        }
      }
      const int64_t rows = ni - i0 < kRows ? ni - i0 : kRows;
      const int64_t cols = nj - j0 < kCols ? nj - j0 : kCols;
      // Unrolled with constant indices, so that acc stays in registers through the token loop.
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        if (r >= rows) break;
        float tmp[kCols];
        vstore(tmp, acc[r][0]);
        vstore(tmp + kWidth, acc[r][1]);
        float* dst = prod + (i0 + r) * ldp + j0;
        for (int64_t c = 0; c < cols; ++c) dst[c] = tmp[c];
      }
    }
  }
}

}  // namespace
}  // namespace qmoe::gptq_detail
