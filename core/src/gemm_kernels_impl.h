// The task function of gemm() (interface in gemm_kernels.h), compiled once per level: with AVX-512
// flags (gemm_kernels_avx512.cpp), with AVX2 + FMA flags (gemm_kernels_avx2.cpp) and with none
// (gemm_kernels_portable.cpp). Everything here has internal linkage and calls only always-inline
// intrinsics, builtins and std::fma, so no code compiled with AVX flags is shared with another
// level.
//
// A task computes a block of C. p runs in blocks of kDepth: for each, the task's columns of B are
// packed into panels of kNR columns ([p][kNR], zero past the last column). A register tile of kMR
// rows x kNR columns keeps its sums in registers while p runs through the block: per p, kNR / width
// vector loads of B, kMR broadcasts of A (read in place, whichever way A is stored) and
// kMR * kNR / width fused multiply-adds. Between blocks of p the sums wait in a partial-sum buffer
// and are reloaded, so every entry is still one chain of fused multiply-adds in p order, starting
// from +0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "gemm_kernels.h"

namespace qmoe::core_detail {
namespace {

#if defined(__AVX512F__)
constexpr const char* kName = "avx512";
constexpr int kMR = 6;   // rows of A per register tile
constexpr int kNR = 64;  // columns of B: four zmm registers; 24 accumulators of 32 registers
#elif defined(__AVX2__)
constexpr const char* kName = "avx2";
constexpr int kMR = 6;   // 12 accumulators of 16 ymm registers
constexpr int kNR = 16;  // two ymm registers
#else
constexpr const char* kName = "portable";
constexpr int kMR = 4;
constexpr int kNR = 8;
#endif

static_assert(kMR <= kTailRows && kTaskRows % kMR == 0 && kTaskCols % kNR == 0);

// The register tile: out[r * ld_out + q] = init[r * ld_init + q] (or +0 when init is null) followed
// by the chain over p < kc of fma(A(r, p), bp[p * kNR + q], .), for r < kMR, q < kNR, where
// A(r, p) = a[r * rs + p * ps]: rows of A read in place whichever way A is stored.
#if defined(__AVX512F__)
inline void micro(const float* a, int64_t rs, int64_t ps, const float* bp, int64_t kc,
                  const float* init, int64_t ld_init, float* out, int64_t ld_out) {
  __m512 acc[kMR][4];
  if (init) {
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(init + r * ld_init + 16 * v);
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t off[kMR] = {0, rs, 2 * rs, 3 * rs, 4 * rs, 5 * rs};
  const float* ap = a;
  for (int64_t p = 0; p < kc; ++p, ap += ps) {
    const float* b = bp + p * kNR;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16),
                 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(ap[off[r]]);  // folds into the fma as a broadcast operand
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + r * ld_out + 16 * v, acc[r][v]);
}
#elif defined(__AVX2__)
inline void micro(const float* a, int64_t rs, int64_t ps, const float* bp, int64_t kc,
                  const float* init, int64_t ld_init, float* out, int64_t ld_out) {
  __m256 acc[kMR][2];
  if (init) {
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      acc[r][0] = _mm256_loadu_ps(init + r * ld_init);
      acc[r][1] = _mm256_loadu_ps(init + r * ld_init + 8);
    }
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  const int64_t off[kMR] = {0, rs, 2 * rs, 3 * rs, 4 * rs, 5 * rs};
  const float* ap = a;
  for (int64_t p = 0; p < kc; ++p, ap += ps) {
    const float* b = bp + p * kNR;
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap + off[r]);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR; ++r) {
    _mm256_storeu_ps(out + r * ld_out, acc[r][0]);
    _mm256_storeu_ps(out + r * ld_out + 8, acc[r][1]);
  }
}
#else
inline void micro(const float* a, int64_t rs, int64_t ps, const float* bp, int64_t kc,
                  const float* init, int64_t ld_init, float* out, int64_t ld_out) {
  float acc[kMR][kNR];
  for (int r = 0; r < kMR; ++r)
    for (int q = 0; q < kNR; ++q) acc[r][q] = init ? init[r * ld_init + q] : 0.0f;
  for (int64_t p = 0; p < kc; ++p) {
    const float* b = bp + p * kNR;
    for (int r = 0; r < kMR; ++r) {
      const float av = a[r * rs + p * ps];
      for (int q = 0; q < kNR; ++q) acc[r][q] = std::fma(av, b[q], acc[r][q]);
    }
  }
  for (int r = 0; r < kMR; ++r)
    for (int q = 0; q < kNR; ++q) out[r * ld_out + q] = acc[r][q];
}
#endif

// Packs B(p0 + p, j) for p < kc, j in [j0, j1) into panels of kNR columns: panel t holds columns
// j0 + t*kNR ... as [p][kNR], zero past j1. Reads B along its contiguous direction.
void pack_b(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t j1, float* out) {
  const int64_t panels = (j1 - j0 + kNR - 1) / kNR;
  for (int64_t t = 0; t < panels; ++t) {
    float* dst = out + t * kc * kNR;
    const int64_t jb = j0 + t * kNR, w = std::min<int64_t>(kNR, j1 - jb);
    if (w < kNR) {
      for (int64_t p = 0; p < kc; ++p)
        for (int64_t q = w; q < kNR; ++q) dst[p * kNR + q] = 0.0f;
    }
    if (g.b_cs == 1) {  // rows of B contiguous along j
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = g.b + (p0 + p) * g.b_rs + jb;
        std::memcpy(dst + p * kNR, src, static_cast<size_t>(w) * sizeof(float));
      }
    } else {  // columns of B contiguous along p (b_rs == 1), or any strides
      for (int64_t q = 0; q < w; ++q) {
        const float* src = g.b + (jb + q) * g.b_cs + p0 * g.b_rs;
        for (int64_t p = 0; p < kc; ++p) dst[p * kNR + q] = src[p * g.b_rs];
      }
    }
  }
}

// C(i, j) op= s for one register tile's valid entries (rows [i, i + rows), columns [j, j + cols)).
// gemm.cpp hands over row-major C (c_cs == 1) whenever C is stored by rows or by columns, so the
// inner loops are unit-stride and vectorise; other strides take the general loop.
void write_tile(const GemmArgs& g, int64_t i, int64_t j, int64_t rows, int64_t cols, const float* s,
                int64_t ld_s) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = s + r * ld_s;
    if (g.c_cs == 1) {
      float* dst = g.c + (i + r) * g.c_rs + j;
      if (g.mode == 0) {
        if (g.relu) {
          for (int64_t q = 0; q < cols; ++q) dst[q] = std::max(src[q], 0.0f);
        } else {
          std::memcpy(dst, src, static_cast<size_t>(cols) * sizeof(float));
        }
      } else if (g.mode > 0) {
        for (int64_t q = 0; q < cols; ++q) dst[q] += src[q];
      } else {
        for (int64_t q = 0; q < cols; ++q) dst[q] -= src[q];
      }
      continue;
    }
    float* dst = g.c + (i + r) * g.c_rs + j * g.c_cs;
    if (g.mode == 0) {
      if (g.relu) {
        for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] = std::max(src[q], 0.0f);
      } else {
        for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] = src[q];
      }
    } else if (g.mode > 0) {
      for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] += src[q];
    } else {
      for (int64_t q = 0; q < cols; ++q) dst[q * g.c_cs] -= src[q];
    }
  }
}

void task(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* scratch) {
  const int64_t mi = i1 - i0;
  const int64_t panels = (j1 - j0 + kNR - 1) / kNR;
  const int64_t ld_part = panels * kNR;
  float* bpack = scratch;                          // [panels][kc][kNR]
  float* pad = bpack + kDepth * (kTaskCols + 64);  // [kMR][kc]: the rows of a short last tile
  float* part = pad + kTailRows * kDepth;          // [mi][ld_part] partial sums
  float tile[kMR * kNR];
  if (g.k == 0) {  // S = 0
    std::fill(tile, tile + kMR * kNR, 0.0f);
    for (int64_t i = i0; i < i1; i += kMR)
      for (int64_t j = j0; j < j1; j += kNR)
        write_tile(g, i, j, std::min<int64_t>(kMR, i1 - i), std::min<int64_t>(kNR, j1 - j), tile,
                   kNR);
    return;
  }
  for (int64_t p0 = 0; p0 < g.k; p0 += kDepth) {
    const int64_t kc = std::min(kDepth, g.k - p0);
    const bool first = p0 == 0, last = p0 + kc == g.k;
    pack_b(g, p0, kc, j0, j1, bpack);
    for (int64_t r0 = 0; r0 < mi; r0 += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, mi - r0);
      const float* a = g.a + (i0 + r0) * g.a_rs + p0 * g.a_cs;
      int64_t rs = g.a_rs, ps = g.a_cs;
      if (rows < kMR) {
        // The last, short tile: its rows copied into kMR rows padded with zeros (their sums are
        // computed and dropped), so that every load stays inside A.
        for (int64_t r = 0; r < kMR; ++r)
          for (int64_t p = 0; p < kc; ++p)
            pad[r * kc + p] = r < rows ? a[r * g.a_rs + p * g.a_cs] : 0.0f;
        a = pad;
        rs = kc;
        ps = 1;
      }
      float* part_rows = part + r0 * ld_part;
      for (int64_t t = 0; t < panels; ++t) {
        const int64_t j = j0 + t * kNR;
        const int64_t cols = std::min<int64_t>(kNR, j1 - j);
        const float* init = first ? nullptr : part_rows + t * kNR;
        if (last) {
          micro(a, rs, ps, bpack + t * kc * kNR, kc, init, ld_part, tile, kNR);
          write_tile(g, i0 + r0, j, rows, cols, tile, kNR);
        } else {
          micro(a, rs, ps, bpack + t * kc * kNR, kc, init, ld_part, part_rows + t * kNR, ld_part);
        }
      }
    }
  }
}

}  // namespace
}  // namespace qmoe::core_detail
