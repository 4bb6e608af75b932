// Kernel bodies, compiled once per SIMD level: kernels_scalar.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp include this file with their own -m flags. Everything here has internal
// linkage (anonymous namespace) and uses no inline function from another header, so no symbol
// compiled for one ISA can be merged by the linker into another level's code path.
//
// Two ways through a row:
//  * slots (qmoe-v1, a single token): every dictionary entry has at most 3 non-zero symbols, so a
//    codeword's inputs are one 4-float vector of its slot columns, split into low and high sums
//    by two AND masks. One pass, no stores, a handful of operations per codeword. With AVX-512
//    the same slots are picked by one two-source permute from the codeword's 32-column window
//    (rows_v1_perm), which takes about a quarter less time per codeword.
//  * lists (both codecs, any pass, the batch path): decode the row's codes once into the
//    ascending columns of its low-level and high-level symbols (at most 3 per v1 codeword, 5 per
//    p5 byte), then, for every pass of tokens, sum the inputs at those columns. With column-major
//    inputs a column is one contiguous vector of bp tokens, so each non-zero symbol costs one
//    vector add per 8 (16 with AVX-512) tokens, whatever the batch: ~12% of the columns are
//    visited, and the decode is shared by up to 8 passes of 32 tokens.
// A row's summation order depends only on its own codes and the level, never on the rows it is
// interleaved with or on the thread that runs it; that makes results thread-count independent.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
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

// Column-major tokens: column c is K vectors V at xt + c * K * lanes(V) (64-byte aligned, as the
// pass stride is a multiple of 8 floats and the buffer is 64-byte aligned). U partial sums per
// vector hide the add latency; they are combined in a fixed order. Writes K * lanes(V) floats.
template <class V, int K, int U>
inline void sum_cols(const float* xt, const int32_t* idx, int64_t n, float* out) {
  constexpr int64_t kStride = K * static_cast<int64_t>(sizeof(V) / sizeof(float));
  V acc[U][K] = {};
  int64_t i = 0;
  for (; i + U <= n; i += U) {
    for (int u = 0; u < U; ++u) {
      const V* p = reinterpret_cast<const V*>(xt + static_cast<int64_t>(idx[i + u]) * kStride);
      for (int v = 0; v < K; ++v) acc[u][v] += p[v];
    }
  }
  for (; i < n; ++i) {
    const V* p = reinterpret_cast<const V*>(xt + static_cast<int64_t>(idx[i]) * kStride);
    for (int v = 0; v < K; ++v) acc[0][v] += p[v];
  }
  for (int v = 0; v < K; ++v) {
    V s = acc[0][v];
    for (int u = 1; u < U; ++u) s += acc[u][v];
    std::memcpy(out + v * (sizeof(V) / sizeof(float)), &s, sizeof(V));
  }
}

inline void put(const Work& w, const Pass& p, int64_t r, int t, float v) {
  if (p.scale != nullptr) v *= p.scale[t];
  float* dst = p.y[t] + r;
  *dst = w.accumulate ? *dst + v : v;
}

// 8 * NV tokens: the row's result for each token of the pass, into out[0 .. 8 * NV).
template <int NV>
inline void finish_cols(const Pass& p, const int32_t* lo, int64_t n_lo, const int32_t* hi,
                        int64_t n_hi, float lo_level, float hi_level, float* out) {
  constexpr int U = NV == 1 ? 4 : 2;
  alignas(64) float sa[8 * NV];
  alignas(64) float sb[8 * NV];
#if defined(__AVX512F__)
  if constexpr (NV % 2 == 0) {  // whole 16-float vectors: half the instructions of 8-float ones
    typedef float v16f __attribute__((vector_size(64)));
    sum_cols<v16f, NV / 2, U>(p.xt, lo, n_lo, sa);
    sum_cols<v16f, NV / 2, U>(p.xt, hi, n_hi, sb);
  } else
#endif
  {
    sum_cols<v8f, NV, U>(p.xt, lo, n_lo, sa);
    sum_cols<v8f, NV, U>(p.xt, hi, n_hi, sb);
  }
  for (int t = 0; t < 8 * NV; ++t) out[t] = lo_level * sa[t] + hi_level * sb[t];
}

// ---- one token, qmoe-v1: three slots per codeword -----------------------------------------
// Every codeword has at most 3 non-zero symbols, so its inputs fit one 4-float vector: load the
// three slot columns (an absent slot reads the codeword's first column), then AND with the slot
// masks of the codeword's kinds, which zero absent slots exactly (whatever the input) and split
// low from high. No lists, no second pass. Two accumulator pairs (even / odd codewords) halve the
// add chain.
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

inline void v1_slots_step(const uint16_t*& c, int32_t& pos, const uint32_t* perm,
                          const int32_t* masks, const float* x, v4f& lo, v4f& hi) {
  // The codeword's v1_perm word (256 KiB table): 5-bit columns, 6 kind bits, the width.
  const uint32_t e = perm[*c++];
  const float* xp = x + pos;
  const v4f v = {xp[e & 31], xp[(e >> 5) & 31], xp[(e >> 10) & 31], 0.0f};
  const v4i* m = reinterpret_cast<const v4i*>(masks + 8 * ((e >> 15) & 63));
  lo += reinterpret_cast<v4f>(reinterpret_cast<v4i>(v) & m[0]);
  hi += reinterpret_cast<v4f>(reinterpret_cast<v4i>(v) & m[1]);
  pos += static_cast<int32_t>(e >> 27);
}

inline float hsum4(v4f v) {
  return (v[0] + v[1]) + (v[2] + v[3]);
}

struct SlotRow {
  const uint16_t* c;
  const uint16_t* end;
  int32_t pos;
  v4f lo_a, hi_a, lo_b, hi_b;  // even / odd codewords
};

inline SlotRow slot_row(const Matrix& m, int64_t r) {
  return {
      m.codes + m.row_offsets[r], m.codes + m.row_offsets[r + 1], 0, v4f{}, v4f{}, v4f{}, v4f{}};
}

// Runs a row to its end and stores its result; the same sequence of operations whether or not
// part of the row ran interleaved with another one.
inline void slot_row_finish(SlotRow& s, const Work& w, const Tables& tb, const int32_t* masks,
                            int64_t r) {
  const Pass& p = w.passes[0];
  while (s.end - s.c >= 2) {
    v1_slots_step(s.c, s.pos, tb.v1_perm, masks, p.xt, s.lo_a, s.hi_a);
    v1_slots_step(s.c, s.pos, tb.v1_perm, masks, p.xt, s.lo_b, s.hi_b);
  }
  if (s.c != s.end) v1_slots_step(s.c, s.pos, tb.v1_perm, masks, p.xt, s.lo_a, s.hi_a);
  const float lo_level = bf16_bits_to_float(w.m.levels[2 * r]);
  const float hi_level = bf16_bits_to_float(w.m.levels[2 * r + 1]);
  put(w, p, r, 0, lo_level * hsum4(s.lo_a + s.lo_b) + hi_level * hsum4(s.hi_a + s.hi_b));
}

#if defined(__AVX512F__)
// ---- one token, qmoe-v1, AVX-512: slots by permute ----------------------------------------
// A codeword's columns lie in [pos, pos + 28), so two unaligned 16-float loads hold all its
// inputs, and one two-source permute (vpermi2ps) moves its three slot inputs into lanes 0..2
// (low sum) and 4..6 (high sum) of the accumulator; the permute's zero mask drops absent slots
// and the other level. Index, mask and width all come from the codeword's 32-bit v1_perm word,
// broadcast to every lane: a variable shift gives the lane's slot column (the permute reads the
// low 5 bits only), a bit test the lane's mask. ~10 instructions per codeword, no branches; the
// 256 KiB table stays in L2. Lanes 8..15 stay 0. Codes are read four at a time (one 8-byte load
// instead of four 2-byte ones) and the input pointer itself advances by the codeword width, which
// together took about 5% off the time per codeword (wo 768x3072, one thread: 149 -> 142 us).
typedef uint32_t v16u __attribute__((vector_size(64)));
// A codeword starts at column <= cols (a row of odd width ends with a half pair) and its window
// is 32 floats wide.
static_assert(kColPad >= 33);

struct PermRow {
  const uint16_t* c;
  const uint16_t* end;
  const float* xp;  // the input at the next codeword's first column
  __m512 a, b;      // even / odd codewords
};

inline void v1_perm_code(uint32_t code, const float*& xp, const uint32_t* tab, __m512& acc) {
  const uint32_t e = tab[code];
  const v16u shift = {0, 5, 10, 0, 0, 5, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  const v16u kind = {1u << 15, 1u << 16, 1u << 17, 0, 1u << 18, 1u << 19, 1u << 20, 0,
                     0,        0,        0,        0, 0,        0,        0,        0};
  const v16u word = v16u{} + e;  // broadcast
  const __mmask16 k =
      _mm512_test_epi32_mask(reinterpret_cast<__m512i>(word), reinterpret_cast<__m512i>(kind));
  const __m512 v = _mm512_maskz_permutex2var_ps(
      k, _mm512_loadu_ps(xp), reinterpret_cast<__m512i>(word >> shift), _mm512_loadu_ps(xp + 16));
  acc = _mm512_add_ps(acc, v);
  xp += e >> 27;
}

inline void v1_perm_step(const uint16_t*& c, const float*& xp, const uint32_t* tab, __m512& acc) {
  v1_perm_code(*c++, xp, tab, acc);
}

inline void perm_row_finish(PermRow& s, const Work& w, const uint32_t* tab, int64_t r) {
  const Pass& p = w.passes[0];
  while (s.end - s.c >= 4) {
    uint64_t cs;
    std::memcpy(&cs, s.c, 8);
    s.c += 4;
    v1_perm_code(cs & 0xffff, s.xp, tab, s.a);
    v1_perm_code((cs >> 16) & 0xffff, s.xp, tab, s.b);
    v1_perm_code((cs >> 32) & 0xffff, s.xp, tab, s.a);
    v1_perm_code(cs >> 48, s.xp, tab, s.b);
  }
  while (s.end - s.c >= 2) {
    v1_perm_step(s.c, s.xp, tab, s.a);
    v1_perm_step(s.c, s.xp, tab, s.b);
  }
  if (s.c != s.end) v1_perm_step(s.c, s.xp, tab, s.a);
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(s.a, s.b));
  const float lo_level = bf16_bits_to_float(w.m.levels[2 * r]);
  const float hi_level = bf16_bits_to_float(w.m.levels[2 * r + 1]);
  put(w, p, r, 0,
      lo_level * ((t[0] + t[1]) + (t[2] + t[3])) + hi_level * ((t[4] + t[5]) + (t[6] + t[7])));
}

void rows_v1_perm(const Work& w, const Tables& tb, int64_t r0, int64_t r1) {
  const uint32_t* tab = tb.v1_perm;
  const float* x = w.passes[0].xt;
  const Matrix& m = w.m;
  auto row = [&](int64_t r) {
    return PermRow{m.codes + m.row_offsets[r], m.codes + m.row_offsets[r + 1], x,
                   _mm512_setzero_ps(), _mm512_setzero_ps()};
  };
  int64_t r = r0;
  // Two rows at a time, as in rows_v1_slots: the same operations per row either way.
  for (; r + 2 <= r1; r += 2) {
    PermRow s = row(r), t = row(r + 1);
    const int64_t ls = s.end - s.c, lt = t.end - t.c;
    // Four codes of each row per 8-byte load; codeword k of a row goes to accumulator a (k even)
    // or b (k odd), as in perm_row_finish.
    const int64_t common = (ls < lt ? ls : lt) / 4;
    for (int64_t i = 0; i < common; ++i) {
      uint64_t cs, ct;
      std::memcpy(&cs, s.c, 8);
      std::memcpy(&ct, t.c, 8);
      s.c += 4;
      t.c += 4;
      v1_perm_code(cs & 0xffff, s.xp, tab, s.a);
      v1_perm_code(ct & 0xffff, t.xp, tab, t.a);
      v1_perm_code((cs >> 16) & 0xffff, s.xp, tab, s.b);
      v1_perm_code((ct >> 16) & 0xffff, t.xp, tab, t.b);
      v1_perm_code((cs >> 32) & 0xffff, s.xp, tab, s.a);
      v1_perm_code((ct >> 32) & 0xffff, t.xp, tab, t.a);
      v1_perm_code(cs >> 48, s.xp, tab, s.b);
      v1_perm_code(ct >> 48, t.xp, tab, t.b);
    }
    perm_row_finish(s, w, tab, r);
    perm_row_finish(t, w, tab, r + 1);
  }
  if (r < r1) {
    PermRow s = row(r);
    perm_row_finish(s, w, tab, r);
  }
}
#endif

#if !defined(__AVX512F__)  // AVX-512 takes rows_v1_perm
void rows_v1_slots(const Work& w, const Tables& tb, int64_t r0, int64_t r1) {
  const int32_t* masks = tb.v1_slot_masks;
  const float* x = w.passes[0].xt;
  int64_t r = r0;
  // Two rows at a time: their codeword chains are independent, so the core overlaps them.
  for (; r + 2 <= r1; r += 2) {
    SlotRow s = slot_row(w.m, r), t = slot_row(w.m, r + 1);
    const int64_t ls = s.end - s.c, lt = t.end - t.c;
    const int64_t common = (ls < lt ? ls : lt) / 2;
    for (int64_t i = 0; i < common; ++i) {
      v1_slots_step(s.c, s.pos, tb.v1_perm, masks, x, s.lo_a, s.hi_a);
      v1_slots_step(t.c, t.pos, tb.v1_perm, masks, x, t.lo_a, t.hi_a);
      v1_slots_step(s.c, s.pos, tb.v1_perm, masks, x, s.lo_b, s.hi_b);
      v1_slots_step(t.c, t.pos, tb.v1_perm, masks, x, t.lo_b, t.hi_b);
    }
    slot_row_finish(s, w, tb, masks, r);
    slot_row_finish(t, w, tb, masks, r + 1);
  }
  if (r < r1) {
    SlotRow s = slot_row(w.m, r);
    slot_row_finish(s, w, tb, masks, r);
  }
}
#endif

// Results are staged per row block (scratch after the lists, kStageFloats floats) and written out
// token by token, so each output row gets one contiguous run of stores instead of one store per
// row and token.
void rows_lists(const Work& w, const Tables& tb, int64_t r0, int64_t r1, int32_t* scratch) {
  const Matrix& m = w.m;
  int32_t* lo = scratch;
  int32_t* hi = scratch + w.list_capacity;
  float* stage = reinterpret_cast<float*>(scratch + 2 * w.list_capacity);
  auto staged = [&](int q, int64_t r) { return stage + (q * kRowBlock + (r - r0)) * kPassTokens; };
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
      float* out = staged(q, r);
      switch (p.bp) {
        case 1:
          out[0] = lo_level * sum_at(p.xt, lo, n_lo) + hi_level * sum_at(p.xt, hi, n_hi);
          break;
        case 8:
          finish_cols<1>(p, lo, n_lo, hi, n_hi, lo_level, hi_level, out);
          break;
        case 16:
          finish_cols<2>(p, lo, n_lo, hi, n_hi, lo_level, hi_level, out);
          break;
        case 24:
          finish_cols<3>(p, lo, n_lo, hi, n_hi, lo_level, hi_level, out);
          break;
        default:
          finish_cols<4>(p, lo, n_lo, hi, n_hi, lo_level, hi_level, out);
          break;
      }
    }
  }
  for (int q = 0; q < w.num_passes; ++q) {
    const Pass& p = w.passes[q];
    for (int t = 0; t < p.n; ++t) {
      for (int64_t r = r0; r < r1; ++r) put(w, p, r, t, staged(q, r)[t]);
    }
  }
}

void rows(const Work& w, const Tables& tb, int64_t r0, int64_t r1, int32_t* scratch) {
  if (w.m.codec == 0 && w.num_passes == 1 && w.passes[0].bp == 1) {
#if defined(__AVX512F__)
    rows_v1_perm(w, tb, r0, r1);
#else
    rows_v1_slots(w, tb, r0, r1);
#endif
    return;
  }
  rows_lists(w, tb, r0, r1, scratch);
}

}  // namespace
}  // namespace qmoe::cpu::detail
