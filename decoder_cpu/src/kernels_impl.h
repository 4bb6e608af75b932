// Kernel bodies, compiled once per SIMD level: kernels_scalar.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp include this file with their own -m flags. Everything here has internal
// linkage (anonymous namespace) and uses no inline function from another header, so no symbol
// compiled for one ISA can be merged by the linker into another level's code path.
//
// Two ways through a row:
//  * lists (every level, both codecs, any pass): decode the row's codes once into the ascending
//    columns of its low-level and high-level symbols (at most 3 per v1 codeword, 5 per p5 byte),
//    then, for every pass of tokens, sum the inputs at those columns. With column-major inputs a
//    column is one contiguous vector of bp tokens, so each non-zero symbol costs one vector add
//    per 8 tokens, whatever the batch: ~12% of the columns are visited.
//  * masks (AVX-512, qmoe-v1, a single token): a codeword covers at most 28 columns, so two
//    16-float loads at the codeword's column and four masked adds (low/high x two halves) add it
//    in. The serial dependency (a codeword's width moves the column) is hidden by running four
//    rows at once, each with its own accumulators.
// A row's summation order depends only on its own codes and the level, never on the rows it is
// interleaved with or on the thread that runs it; that makes results thread-count independent.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace qmoe::cpu::detail {
namespace {

// 8 floats; the compiler lowers it to one ymm (AVX2/AVX-512), two xmm (SSE2) or scalar code.
typedef float v8f __attribute__((vector_size(32)));

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- phase 1: a row's codes -> columns of its low / high symbols ---------------------------
// Writes may run up to 4 (v1) or 5 (p5) entries past the final counts: list capacity has slack.
inline void v1_lists(const uint16_t* c, const uint16_t* end, const uint64_t* table, int32_t* lo,
                     int32_t* hi, int64_t* n_lo, int64_t* n_hi) {
  int32_t pos = 0;
  int64_t nl = 0, nh = 0;
  for (; c < end; ++c) {
    const uint64_t rec = table[*c];
#if defined(__AVX2__)
    // All six column bytes widened and offset in one go; lanes 3 and 7 carry the counts and land
    // past the valid entries, where the next codeword overwrites them.
    const __m256i cols =
        _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(rec))),
                         _mm256_set1_epi32(pos));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + nl), _mm256_castsi256_si128(cols));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + nh), _mm256_extracti128_si256(cols, 1));
#else
    lo[nl] = pos + static_cast<int32_t>(rec & 0xff);
    lo[nl + 1] = pos + static_cast<int32_t>((rec >> 8) & 0xff);
    lo[nl + 2] = pos + static_cast<int32_t>((rec >> 16) & 0xff);
    hi[nh] = pos + static_cast<int32_t>((rec >> 32) & 0xff);
    hi[nh + 1] = pos + static_cast<int32_t>((rec >> 40) & 0xff);
    hi[nh + 2] = pos + static_cast<int32_t>((rec >> 48) & 0xff);
#endif
    nl += static_cast<int64_t>((rec >> 24) & 3);
    nh += static_cast<int64_t>(rec >> 56);
    pos += static_cast<int32_t>((rec >> 26) & 63);
  }
  *n_lo = nl;
  *n_hi = nh;
}

inline void p5_lists(const uint8_t* b, int64_t nbytes, const uint8_t* table, int32_t* lo,
                     int32_t* hi, int64_t* n_lo, int64_t* n_hi) {
  int32_t pos = 0;
  int64_t nl = 0, nh = 0;
  for (int64_t i = 0; i < nbytes; ++i, pos += 5) {
    const uint8_t* rec = table + 16 * b[i];
    for (int j = 0; j < 5; ++j) lo[nl + j] = pos + rec[j];
    for (int j = 0; j < 5; ++j) hi[nh + j] = pos + rec[8 + j];
    nl += rec[5];
    nh += rec[13];
  }
  *n_lo = nl;
  *n_hi = nh;
}

// ---- phase 2: sums over the listed columns ------------------------------------------------
// One token: four partial sums (the adds of one chain would otherwise wait on each other), then
// combined in a fixed order.
inline float sum_at(const float* x, const int32_t* idx, int64_t n) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += x[idx[i]];
    s1 += x[idx[i + 1]];
    s2 += x[idx[i + 2]];
    s3 += x[idx[i + 3]];
  }
  for (; i < n; ++i) s0 += x[idx[i]];
  return (s0 + s1) + (s2 + s3);
}

// 8*NV tokens, column-major: column c is NV vectors at xt + c * 8 * NV (64-byte aligned rows of
// 32-byte multiples). U partial sums per vector hide the add latency.
template <int NV, int U>
inline void sum_cols(const float* xt, const int32_t* idx, int64_t n, v8f* out) {
  v8f acc[U][NV] = {};
  int64_t i = 0;
  for (; i + U <= n; i += U) {
    for (int u = 0; u < U; ++u) {
      const v8f* p = reinterpret_cast<const v8f*>(xt + static_cast<int64_t>(idx[i + u]) * (8 * NV));
      for (int v = 0; v < NV; ++v) acc[u][v] += p[v];
    }
  }
  for (; i < n; ++i) {
    const v8f* p = reinterpret_cast<const v8f*>(xt + static_cast<int64_t>(idx[i]) * (8 * NV));
    for (int v = 0; v < NV; ++v) acc[0][v] += p[v];
  }
  for (int v = 0; v < NV; ++v) {
    v8f s = acc[0][v];
    for (int u = 1; u < U; ++u) s += acc[u][v];
    out[v] = s;
  }
}

inline void put(const Work& w, const Pass& p, int64_t r, int t, float v) {
  if (p.scale != nullptr) v *= p.scale[t];
  float* dst = p.y[t] + r;
  *dst = w.accumulate ? *dst + v : v;
}

template <int NV>
inline void finish_cols(const Work& w, const Pass& p, int64_t r, const int32_t* lo, int64_t n_lo,
                        const int32_t* hi, int64_t n_hi, float lo_level, float hi_level) {
  constexpr int U = NV == 1 ? 4 : 2;
  v8f a[NV], b[NV];
  sum_cols<NV, U>(p.xt, lo, n_lo, a);
  sum_cols<NV, U>(p.xt, hi, n_hi, b);
  float sa[8 * NV], sb[8 * NV];
  std::memcpy(sa, a, sizeof sa);
  std::memcpy(sb, b, sizeof sb);
  for (int t = 0; t < p.n; ++t) put(w, p, r, t, lo_level * sa[t] + hi_level * sb[t]);
}

void rows_lists(const Work& w, const Tables& tb, int64_t r0, int64_t r1, int32_t* scratch) {
  const Matrix& m = w.m;
  int32_t* lo = scratch;
  int32_t* hi = scratch + w.list_capacity;
  const int64_t p5_bytes = (m.cols + 4) / 5;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t n_lo = 0, n_hi = 0;
    if (m.codec == 0) {
      v1_lists(m.codes + m.row_offsets[r], m.codes + m.row_offsets[r + 1], tb.v1_list, lo, hi,
               &n_lo, &n_hi);
    } else {
      p5_lists(m.packed + r * p5_bytes, p5_bytes, tb.p5_list, lo, hi, &n_lo, &n_hi);
    }
    const float lo_level = bf16_bits_to_float(m.levels[2 * r]);
    const float hi_level = bf16_bits_to_float(m.levels[2 * r + 1]);
    for (int q = 0; q < w.num_passes; ++q) {
      const Pass& p = w.passes[q];
      switch (p.bp) {
        case 1:
          put(w, p, r, 0, lo_level * sum_at(p.xt, lo, n_lo) + hi_level * sum_at(p.xt, hi, n_hi));
          break;
        case 8:
          finish_cols<1>(w, p, r, lo, n_lo, hi, n_hi, lo_level, hi_level);
          break;
        case 16:
          finish_cols<2>(w, p, r, lo, n_lo, hi, n_hi, lo_level, hi_level);
          break;
        case 24:
          finish_cols<3>(w, p, r, lo, n_lo, hi, n_hi, lo_level, hi_level);
          break;
        default:
          finish_cols<4>(w, p, r, lo, n_lo, hi, n_hi, lo_level, hi_level);
          break;
      }
    }
  }
}

#if defined(__AVX512F__)
// ---- AVX-512 masked path (qmoe-v1, one token) ---------------------------------------------
// GCC 12's AVX-512 headers build casts and extracts on self-initialised "undefined" vectors, which
// -Wmaybe-uninitialized reports at every use once inlined; the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
struct Lane {
  const uint16_t* c;
  const uint16_t* end;
  int64_t row;
  int32_t pos;
  __m512 lo0, lo1, hi0, hi1;  // low / high sums, columns 0..15 and 16..31 of each codeword
};

inline void lane_step(Lane& l, const float* x, const uint64_t* mask, __m512 one) {
  const uint64_t m = mask[*l.c++];
  const float* xp = x + l.pos;
  const __m512 x0 = _mm512_loadu_ps(xp);
  const __m512 x1 = _mm512_loadu_ps(xp + 16);
  l.lo0 = _mm512_mask_add_ps(l.lo0, static_cast<__mmask16>(m), l.lo0, x0);
  l.lo1 = _mm512_mask_add_ps(l.lo1, static_cast<__mmask16>(m >> 16), l.lo1, x1);
  // The high sums go through the FMA units (x * 1 + acc rounds exactly like an add): cores with
  // separate add and FMA pipes (Zen 4) then run all four updates of a codeword in parallel.
  l.hi0 = _mm512_mask3_fmadd_ps(x0, one, l.hi0, static_cast<__mmask16>(m >> 32));
  l.hi1 = _mm512_mask3_fmadd_ps(x1, one, l.hi1, static_cast<__mmask16>((m >> 48) & 0x0fffu));
  l.pos += static_cast<int32_t>((m >> 59) & 0x1eu);  // 2 * pairs
}

// Horizontal sum in a fixed order.
inline float hsum(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

inline void lane_finish(const Lane& l, const Work& w, const Pass& p) {
  const float lo_level = bf16_bits_to_float(w.m.levels[2 * l.row]);
  const float hi_level = bf16_bits_to_float(w.m.levels[2 * l.row + 1]);
  const float s_lo = hsum(_mm512_add_ps(l.lo0, l.lo1));
  const float s_hi = hsum(_mm512_add_ps(l.hi0, l.hi1));
  put(w, p, l.row, 0, lo_level * s_lo + hi_level * s_hi);
}

// Starts the next row with at least one code on lane l; rows without codes (zero columns) are
// finished on the way. Returns false when the range is exhausted.
inline bool lane_load(Lane& l, const Work& w, const Pass& p, int64_t& next, int64_t r1) {
  while (next < r1) {
    const int64_t r = next++;
    l.row = r;
    l.c = w.m.codes + w.m.row_offsets[r];
    l.end = w.m.codes + w.m.row_offsets[r + 1];
    l.pos = 0;
    l.lo0 = l.lo1 = l.hi0 = l.hi1 = _mm512_setzero_ps();
    if (l.c != l.end) return true;
    lane_finish(l, w, p);
  }
  return false;
}

void rows_v1_masked(const Work& w, const Tables& tb, int64_t r0, int64_t r1) {
  const Pass& p = w.passes[0];
  const float* x = p.xt;
  const uint64_t* mask = tb.v1_mask;
  const __m512 one = _mm512_set1_ps(1.0f);
  constexpr int kLanes = 4;
  Lane lanes[kLanes];
  bool live[kLanes];
  int64_t next = r0;
  bool all = true;
  for (int k = 0; k < kLanes; ++k) {
    live[k] = lane_load(lanes[k], w, p, next, r1);
    all = all && live[k];
  }
  // Steady state: every lane busy; a lane whose row ends takes the next row of the range.
  while (all) {
#pragma GCC unroll 4
    for (int k = 0; k < kLanes; ++k) {
      lane_step(lanes[k], x, mask, one);
      if (lanes[k].c == lanes[k].end) [[unlikely]] {
        lane_finish(lanes[k], w, p);
        if (!lane_load(lanes[k], w, p, next, r1)) {
          live[k] = false;
          all = false;
        }
      }
    }
  }
  // Drain: the rows still open run to their end one by one.
  for (int k = 0; k < kLanes; ++k) {
    if (!live[k]) continue;
    while (lanes[k].c != lanes[k].end) lane_step(lanes[k], x, mask, one);
    lane_finish(lanes[k], w, p);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

void rows(const Work& w, const Tables& tb, int64_t r0, int64_t r1, int32_t* scratch) {
#if defined(__AVX512F__)
  if (w.m.codec == 0 && w.num_passes == 1 && w.passes[0].bp == 1) {
    rows_v1_masked(w, tb, r0, r1);
    return;
  }
#endif
  rows_lists(w, tb, r0, r1, scratch);
}

}  // namespace
}  // namespace qmoe::cpu::detail
