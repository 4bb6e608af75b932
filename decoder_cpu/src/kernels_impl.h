// Kernel bodies, compiled once per SIMD level: kernels_scalar.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp include this file with their own -m flags. Everything here has internal
// linkage (anonymous namespace) and uses no inline function from another header, so no symbol
// compiled for one ISA can be merged by the linker into another level's code path.
//
// Four ways through a row:
//  * slots (qmoe-v1 and qmoe-v2, a single token): every dictionary entry has at most 3 non-zero
//    symbols, so a codeword's inputs are one 4-float vector of its slot columns, split into low
//    and high sums by two AND masks. One pass, no stores, a handful of operations per codeword.
//    With AVX2 the slots are broadcast and blended into one 8-float vector (BlendKernel, same
//    sums); with AVX-512 they are picked by one two-source permute from the codeword's 32-column
//    window (PermKernel), which takes about a quarter less time per codeword.
//  * slot pairs (qmoe-v3, a single token): a codeword covers columns of two rows, its slots lie in
//    one 16-column window, and each slot feeds four sums (two rows, low and high): one load and
//    one single-source permute per codeword with AVX-512 (PairPermKernel).
//  * byte windows (qmoe-p5, a single token, AVX2 and AVX-512): a byte's 5 columns lie in one
//    8-float window of the input, masked into low and high lanes by the byte's table row (p5_row).
//  * lists (every codec, any pass, the batch path): decode the row's codes once into the
//    ascending columns of its low-level and high-level symbols (at most 3 per v1 codeword, 5 per
//    p5 byte; a qmoe-v3 pair's two rows from one decode), then, for every pass of tokens, sum the
//    inputs at those columns. With column-major inputs a column is one contiguous vector of bp
//    tokens, so each non-zero symbol costs one vector add per 8 (16 with AVX-512) tokens, whatever
//    the batch: ~12% of the columns are visited, and the decode is shared by up to 8 passes of 32
//    tokens.
// A row's summation order depends only on its own codes and the level, never on the rows it is
// interleaved with or on the thread that runs it; that makes results thread-count independent.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace qmoe::cpu::detail {
namespace {

// 8 and 16 floats; the compiler lowers them to whole registers where the ISA has them, else to
// several narrower ones or scalar code.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A row's result from its two sums, formed in double as the reference decoder does: with levels
// near the float range, a float product alone can overflow where the result does not.
inline float combine(float lo_level, float lo_sum, float hi_level, float hi_sum) {
  return static_cast<float>(static_cast<double>(lo_level) * lo_sum +
                            static_cast<double>(hi_level) * hi_sum);
}

// ---- phase 1: a row's codes -> columns of its low / high symbols ---------------------------
// Writes may run up to 4 (v1) or 7 (p5) entries past the final counts: list capacity has slack.
// One list record (Tables::v1_list layout) at column pos: its low and high columns appended.
inline void list_step(uint64_t rec, int32_t pos, int32_t* lo, int32_t* hi, int64_t& nl,
                      int64_t& nh) {
#if defined(__AVX2__)
  // All six column bytes widened and offset in one go; lanes 3 and 7 carry the counts and land
  // past the valid entries, where the next codeword overwrites them.
  const __m256i cols = _mm256_add_epi32(
      _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(rec))), _mm256_set1_epi32(pos));
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
}

inline void v1_lists(const uint16_t* c, const uint16_t* end, const uint64_t* table, int32_t* lo,
                     int32_t* hi, int64_t* n_lo, int64_t* n_hi) {
  int32_t pos = 0;
  int64_t nl = 0, nh = 0;
  for (; c < end; ++c) {
    const uint64_t rec = table[*c];
    list_step(rec, pos, lo, hi, nl, nh);
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
#if defined(__AVX2__)
    // Both halves of the record widened and offset at once (8 entries each; past the counts they
    // are overwritten by the next byte or lie in the lists' slack).
    const __m256i p = _mm256_set1_epi32(pos);
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(lo + nl),
        _mm256_add_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec))), p));
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(hi + nh),
        _mm256_add_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec + 8))), p));
#else
    for (int j = 0; j < 5; ++j) lo[nl + j] = pos + rec[j];
    for (int j = 0; j < 5; ++j) hi[nh + j] = pos + rec[8 + j];
#endif
    nl += rec[5];
    nh += rec[13];
  }
  *n_lo = nl;
  *n_hi = nh;
}

// qmoe-v3: a pair's codes -> the columns of the low and high symbols of each of its two rows, from
// two list records per codeword (V3Tables::list: row 0's, then row 1's; the width is in both).
inline void v3_lists(const uint16_t* c, const uint16_t* end, const uint64_t* table,
                     int32_t* const (&out)[4], int64_t (&n)[4]) {
  int32_t pos = 0;
  int64_t k0 = 0, k1 = 0, k2 = 0, k3 = 0;
  for (; c < end; ++c) {
    __builtin_prefetch(table + 2 * static_cast<size_t>(c + 24 < end ? c[24] : 0));
    const uint64_t* rec = table + 2 * static_cast<size_t>(*c);
    list_step(rec[0], pos, out[0], out[1], k0, k1);
    list_step(rec[1], pos, out[2], out[3], k2, k3);
    pos += static_cast<int32_t>((rec[0] >> 26) & 63);
  }
  n[0] = k0;
  n[1] = k1;
  n[2] = k2;
  n[3] = k3;
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
    sum_cols<v16f, NV / 2, U>(p.xt, lo, n_lo, sa);
    sum_cols<v16f, NV / 2, U>(p.xt, hi, n_hi, sb);
  } else
#endif
  {
    sum_cols<v8f, NV, U>(p.xt, lo, n_lo, sa);
    sum_cols<v8f, NV, U>(p.xt, hi, n_hi, sb);
  }
  for (int t = 0; t < 8 * NV; ++t) out[t] = combine(lo_level, sa[t], hi_level, sb[t]);
}

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

// ---- one token, qmoe-v1: the row driver ---------------------------------------------------
// Both single-token kernels below walk rows the same way; a kernel K supplies
//   K::Row                      a row in flight: c and end (its codes), plus its accumulators,
//   K::row(r)                   a fresh row,
//   K::code(row, code, odd)     one codeword into accumulator set `odd` (codeword index parity),
//   K::store(row, r)            the row's result.
// Rows go two at a time, their codeword chains interleaved so the core overlaps them; codes are
// read four per 8-byte load. Codeword k of a row always goes to accumulator set k % 2 and the sets
// are combined in a fixed order, so a row's result does not depend on the row it was paired with
// or on how its codes were loaded.
static_assert(std::endian::native == std::endian::little, "codes are read four per 64-bit load");

inline uint64_t load4(const uint16_t*& c) {
  uint64_t v;
  std::memcpy(&v, c, 8);
  c += 4;
  return v;
}

template <class K>
inline void finish_row(const K& k, typename K::Row& s, int64_t r) {
  while (s.end - s.c >= 4) {
    const uint64_t cs = load4(s.c);
    k.code(s, cs & 0xffff, 0);
    k.code(s, (cs >> 16) & 0xffff, 1);
    k.code(s, (cs >> 32) & 0xffff, 0);
    k.code(s, cs >> 48, 1);
  }
  for (int odd = 0; s.c != s.end; odd ^= 1) k.code(s, *s.c++, odd);
  k.store(s, r);
}

template <class K>
void rows_paired(const K& k, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    typename K::Row s = k.row(r), t = k.row(r + 1);
    const int64_t ls = s.end - s.c, lt = t.end - t.c;
    const int64_t common = (ls < lt ? ls : lt) / 4;
    for (int64_t i = 0; i < common; ++i) {
      const uint64_t cs = load4(s.c), ct = load4(t.c);
      k.code(s, cs & 0xffff, 0);
      k.code(t, ct & 0xffff, 0);
      k.code(s, (cs >> 16) & 0xffff, 1);
      k.code(t, (ct >> 16) & 0xffff, 1);
      k.code(s, (cs >> 32) & 0xffff, 0);
      k.code(t, (ct >> 32) & 0xffff, 0);
      k.code(s, cs >> 48, 1);
      k.code(t, ct >> 48, 1);
    }
    finish_row(k, s, r);
    finish_row(k, t, r + 1);
  }
  if (r < r1) {
    typename K::Row s = k.row(r);
    finish_row(k, s, r);
  }
}

inline float hsum4(v4f v) {
  return (v[0] + v[1]) + (v[2] + v[3]);
}

// The slot fields of a single-token kernel's 32-bit word per codeword: v1_perm (5-bit columns,
// tables.cpp) or a qmoe-v2 entry word, used as stored (6-bit columns, codec_layout.h). Both have
// the low-kind bits of slots 0..2 followed by their high-kind bits, which index v1_slot_masks.
struct V1Slots {
  static constexpr int kColBits = 5, kKindShift = 15, kWidthShift = 27;
};
struct V2Slots {
  static constexpr int kColBits = 6, kKindShift = 18, kWidthShift = 26;
};

// ---- one token, qmoe-v1 and qmoe-v2: three slots per codeword -----------------------------
// Every codeword has at most 3 non-zero symbols, so its inputs fit one 4-float vector: load the
// three slot columns (an absent slot reads the codeword's first column), then AND with the slot
// masks of the codeword's kinds, which zero absent slots exactly (whatever the input) and split
// low from high. No lists, no second pass. The codeword's word (256 KiB table) gives the columns,
// the 6 kind bits and the width.
template <class L>
struct SlotKernel {
  struct Row {
    const uint16_t* c;
    const uint16_t* end;
    const float* xp;   // the input at the next codeword's first column
    v4f lo[2], hi[2];  // even / odd codewords
  };
  const Work& w;
  const uint32_t* perm;
  const int32_t* masks;

  Row row(int64_t r) const {
    return {w.m.codes + w.m.row_offsets[r],
            w.m.codes + w.m.row_offsets[r + 1],
            w.passes[0].xt,
            {v4f{}, v4f{}},
            {v4f{}, v4f{}}};
  }
  void code(Row& s, uint32_t code, int odd) const {
    constexpr uint32_t kCol = (1u << L::kColBits) - 1;
    const uint32_t e = perm[code];
    const float* xp = s.xp;
    const v4f v = {xp[e & kCol], xp[(e >> L::kColBits) & kCol], xp[(e >> (2 * L::kColBits)) & kCol],
                   0.0f};
    const v4i* m = reinterpret_cast<const v4i*>(masks + 8 * ((e >> L::kKindShift) & 63));
    s.lo[odd] += reinterpret_cast<v4f>(reinterpret_cast<v4i>(v) & m[0]);
    s.hi[odd] += reinterpret_cast<v4f>(reinterpret_cast<v4i>(v) & m[1]);
    s.xp += e >> L::kWidthShift;
  }
  void store(const Row& s, int64_t r) const {
    const float lo_level = bf16_bits_to_float(w.m.levels[2 * r]);
    const float hi_level = bf16_bits_to_float(w.m.levels[2 * r + 1]);
    put(w, w.passes[0], r, 0,
        combine(lo_level, hsum4(s.lo[0] + s.lo[1]), hi_level, hsum4(s.hi[0] + s.hi[1])));
  }
};

#if defined(__AVX2__)
// A row in flight for the vector single-token kernels below; V is their accumulator (v8f or v16f,
// the plain vector types behind __m256 and __m512), lanes 0..3 for the low sums and 4..7 for the
// high sums.
template <class V>
struct VecRow {
  const uint16_t* c;
  const uint16_t* end;
  const float* xp;  // the input at the next codeword's first column
  V acc[2];         // even / odd codewords
};

template <class V>
VecRow<V> vec_row(const Work& w, int64_t r) {
  return {w.m.codes + w.m.row_offsets[r],
          w.m.codes + w.m.row_offsets[r + 1],
          w.passes[0].xt,
          {V{}, V{}}};
}

template <class V>
void vec_store(const Work& w, const VecRow<V>& s, int64_t r) {
  alignas(64) float t[sizeof(V) / sizeof(float)];
  const V sum = s.acc[0] + s.acc[1];
  std::memcpy(t, &sum, sizeof(V));
  const float lo_level = bf16_bits_to_float(w.m.levels[2 * r]);
  const float hi_level = bf16_bits_to_float(w.m.levels[2 * r + 1]);
  put(w, w.passes[0], r, 0,
      combine(lo_level, (t[0] + t[1]) + (t[2] + t[3]), hi_level, (t[4] + t[5]) + (t[6] + t[7])));
}
#endif

#if defined(__AVX2__)
// ---- one token, AVX2 (both dictionary codecs) and AVX-512 (qmoe-v2): broadcast and blend -----
// SlotKernel's arithmetic in one 8-float vector: each slot input is broadcast straight from
// memory (a load, no shuffle), two immediate blends put slot j in lanes j and 4 + j, and one AND
// with the 8-lane row of v1_slot_masks keeps the low kinds in lanes 0..2 and the high kinds in
// 4..6. Lane by lane these are SlotKernel's sums in SlotKernel's order; it takes 8-13% less time
// per call (wi and wo, one thread, Zen 4). A qmoe-v2 codeword spans up to 63 columns, more than
// the permute kernel's 32-column window, so AVX-512 runs this kernel for qmoe-v2.
template <class L>
struct BlendKernel {
  using Row = VecRow<v8f>;
  const Work& w;
  const uint32_t* perm;
  const int32_t* masks;

  Row row(int64_t r) const { return vec_row<v8f>(w, r); }
  void code(Row& s, uint32_t code, int odd) const {
    constexpr uint32_t kCol = (1u << L::kColBits) - 1;
    const uint32_t e = perm[code];
    const float* xp = s.xp;
    const __m256 b0 = _mm256_broadcast_ss(xp + (e & kCol));
    const __m256 b1 = _mm256_broadcast_ss(xp + ((e >> L::kColBits) & kCol));
    const __m256 b2 = _mm256_broadcast_ss(xp + ((e >> (2 * L::kColBits)) & kCol));
    const __m256 v = _mm256_blend_ps(_mm256_blend_ps(b0, b1, 0x22), b2, 0x44);
    const __m256 m =
        _mm256_loadu_ps(reinterpret_cast<const float*>(masks + 8 * ((e >> L::kKindShift) & 63)));
    s.acc[odd] = _mm256_add_ps(s.acc[odd], _mm256_and_ps(v, m));
    s.xp += e >> L::kWidthShift;
  }
  void store(const Row& s, int64_t r) const { vec_store(w, s, r); }
};
#endif

#if defined(__AVX512F__)
// ---- one token, qmoe-v1 and qmoe-v2, AVX-512: slots by permute ----------------------------
// A qmoe-v1 codeword's columns lie in [pos, pos + 28) (a qmoe-v2 codeword's non-zero ones in
// [pos + c0, pos + c0 + 32), c0 = slot 0's column), so two unaligned 16-float loads hold all its
// inputs, and one two-source permute (vpermi2ps) moves its three slot inputs into lanes 0..2
// (low sum) and 4..6 (high sum) of the accumulator; the permute's zero mask drops absent slots
// and the other level. Index, mask and width all come from the codeword's 32-bit v1_perm word,
// broadcast to every lane: a variable shift gives the lane's slot column (the permute reads the
// low 5 bits only), a bit test the lane's mask. ~10 instructions per codeword, no branches; the
// 256 KiB table stays in L2. Lanes 8..15 stay 0. Reading the codes four per load and advancing
// an input pointer by the codeword width took about 5% off the time per codeword (wo 768x3072,
// one thread: 149 -> 142 us).
// A codeword's window starts at a column <= cols (a qmoe-v1 row of odd width ends with a half
// pair; a qmoe-v2 slot lies inside the row) and is 32 floats wide.
static_assert(kColPad >= 33);

// Where a permute kernel finds its fields in a codeword's 32-bit word:
//   qmoe-v1 (v1_perm): slot columns in bits 0, 5, 10, kinds from bit 15, width from bit 27; the
//     window starts at the codeword's first column.
//   qmoe-v2 (V2Tables::perm): the window starts at slot 0's column (bits 10..15), so slot 0's
//     index is 0 (a shift by 32 gives 0) and slots 1 and 2 are relative to it (bits 0, 5); kinds
//     from bit 16, width from bit 26. A shift, a mask and an add more per codeword.
struct V1Perm {
  static constexpr bool kWindowed = false;
  static constexpr int kShift[3] = {0, 5, 10};
  static constexpr int kKind = 15, kWidthShift = 27;
};
struct V2Perm {
  static constexpr bool kWindowed = true;
  static constexpr int kShift[3] = {32, 0, 5};
  static constexpr int kKind = 16, kWidthShift = 26;
};

template <class L>
struct PermKernel {
  using Row = VecRow<v16f>;  // lanes 8..15 stay 0
  const Work& w;
  const uint32_t* perm;

  Row row(int64_t r) const { return vec_row<v16f>(w, r); }
  void code(Row& s, uint32_t code, int odd) const {
    const uint32_t e = perm[code];
    const __m512i shift =
        _mm512_setr_epi32(L::kShift[0], L::kShift[1], L::kShift[2], 32, L::kShift[0], L::kShift[1],
                          L::kShift[2], 32, 32, 32, 32, 32, 32, 32, 32, 32);
    constexpr int k = L::kKind;
    const __m512i kind = _mm512_setr_epi32(1 << k, 1 << (k + 1), 1 << (k + 2), 0, 1 << (k + 3),
                                           1 << (k + 4), 1 << (k + 5), 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i word = _mm512_set1_epi32(static_cast<int>(e));
    const __mmask16 m = _mm512_test_epi32_mask(word, kind);
    const float* base = L::kWindowed ? s.xp + ((e >> 10) & 63) : s.xp;
    // maskz: GCC 12's unmasked form reads an undefined vector (-Wmaybe-uninitialized).
    const __m512 v = _mm512_maskz_permutex2var_ps(m, _mm512_loadu_ps(base),
                                                  _mm512_maskz_srlv_epi32(0xffff, word, shift),
                                                  _mm512_loadu_ps(base + 16));
    s.acc[odd] = _mm512_add_ps(s.acc[odd], v);
    s.xp += e >> L::kWidthShift;
  }
  void store(const Row& s, int64_t r) const { vec_store(w, s, r); }
};
#endif

// ---- one token, qmoe-v3: a pair of rows per code stream --------------------------------------
// A qmoe-v3 codeword covers columns of two rows, with at most 3 non-zero columns (slots) within 16
// consecutive columns: its inputs lie in one 16-float window of x at slot 0's column. Each row's 6
// kind bits sit in the entry word as a qmoe-v1 slot word's do (low bits of slots 0..2, then high),
// so the broadcast kernels mask one vector of the three slot inputs with two rows of
// v1_slot_masks, one per row. The kernels walk pairs with rows_paired() (its "rows" are pairs:
// two pairs' codeword chains interleaved) and take the entry words as stored, without derived
// tables. A codeword's window starts at most 31 columns after its first column, which lies inside
// the row, and is 16 floats wide: 47 < kColPad.
static_assert(kColPad >= 47);

// The two rows of pair p from its 4 sums (row 0 low, row 0 high, row 1 low, row 1 high); the row
// that completes an odd height is not written.
inline void pair_store(const Work& w, int64_t p, const float (&sum)[4]) {
  const int64_t r = 2 * p;
  for (int h = 0; h < 2 && r + h < w.m.rows; ++h) {
    put(w, w.passes[0], r + h, 0,
        combine(bf16_bits_to_float(w.m.levels[2 * (r + h)]), sum[2 * h],
                bf16_bits_to_float(w.m.levels[2 * (r + h) + 1]), sum[2 * h + 1]));
  }
}

// A pair in flight for the portable and AVX2 pair kernels: its codes, the input at its next
// codeword's first column, and N accumulators of type V. One set, not one per codeword parity as
// in the kernels above: two pairs in flight already fill the registers, and each add waits only on
// the previous codeword of its own pair.
template <class V, int N>
struct PairRow {
  const uint16_t* c;
  const uint16_t* end;
  const float* xp;
  V acc[N];
};

template <class Row>
inline Row pair_row(const Work& w, int64_t p) {
  Row s{};
  s.c = w.m.codes + w.m.row_offsets[2 * p];
  s.end = w.m.codes + w.m.row_offsets[2 * p + 1];
  s.xp = w.passes[0].xt;
  return s;
}

// Portable: the three slot inputs in one 4-float vector, split into each row's low and high sums
// by the AND masks of its kind bits (SlotKernel's arithmetic, twice).
struct PairSlotKernel {
  using Row = PairRow<v4f, 4>;  // row 0 low, row 0 high, row 1 low, row 1 high
  const Work& w;
  const uint32_t* entries;
  const int32_t* masks;

  Row row(int64_t p) const { return pair_row<Row>(w, p); }
  void code(Row& s, uint32_t code, int /*odd*/) const {
    const uint32_t e = entries[code];
    const float* x = s.xp + ((e >> 20) & 31);
    const v4i v = reinterpret_cast<v4i>(v4f{x[0], x[e & 15], x[(e >> 4) & 15], 0.0f});
    const v4i* m0 = reinterpret_cast<const v4i*>(masks + 8 * ((e >> 8) & 63));
    const v4i* m1 = reinterpret_cast<const v4i*>(masks + 8 * ((e >> 14) & 63));
    s.acc[0] += reinterpret_cast<v4f>(v & m0[0]);
    s.acc[1] += reinterpret_cast<v4f>(v & m0[1]);
    s.acc[2] += reinterpret_cast<v4f>(v & m1[0]);
    s.acc[3] += reinterpret_cast<v4f>(v & m1[1]);
    s.xp += e >> 26;
  }
  void store(const Row& s, int64_t p) const {
    float sum[4];
    for (int h = 0; h < 4; ++h) sum[h] = hsum4(s.acc[h]);
    pair_store(w, p, sum);
  }
};

#if defined(__AVX2__)
// AVX2: BlendKernel's 8-float vector of the slot inputs (slot j in lanes j and 4 + j), taken from
// the codeword's 16-float window by two 8-lane permutes and a blend, and ANDed with the 8-lane
// v1_slot_masks row of each row's kind bits: one accumulator per row, low sums in lanes 0..2, high
// sums in 4..6. Broadcasting the three inputs from memory instead (as BlendKernel does) took 17-20%
// more time per call (wi and wo, one thread, Zen 4).
struct PairBlendKernel {
  using Row = PairRow<v8f, 2>;  // row 0, row 1
  const Work& w;
  const uint32_t* entries;
  const int32_t* masks;

  Row row(int64_t p) const { return pair_row<Row>(w, p); }
  void code(Row& s, uint32_t code, int /*odd*/) const {
    const uint32_t e = entries[code];
    const float* x = s.xp + ((e >> 20) & 31);
    // Slot j's input in lanes j and 4 + j: the 16-float window as two 8-float halves, each
    // permuted by the slot offsets (low 3 bits), the half chosen by bit 3 of the offset (moved to
    // the sign bit for the blend). Lanes 3 and 7 (and slot 0) get offset 0: a shift by 32.
    const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(e)),
                                          _mm256_setr_epi32(32, 0, 4, 32, 32, 0, 4, 32));
    const __m256 p0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), idx);
    const __m256 p1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), idx);
    const __m256 v = _mm256_blendv_ps(p0, p1, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    const __m256 m0 = _mm256_load_ps(reinterpret_cast<const float*>(masks + 8 * ((e >> 8) & 63)));
    const __m256 m1 = _mm256_load_ps(reinterpret_cast<const float*>(masks + 8 * ((e >> 14) & 63)));
    s.acc[0] += reinterpret_cast<v8f>(_mm256_and_ps(v, m0));
    s.acc[1] += reinterpret_cast<v8f>(_mm256_and_ps(v, m1));
    s.xp += e >> 26;
  }
  void store(const Row& s, int64_t p) const {
    float sum[4];
    for (int h = 0; h < 2; ++h) {
      const v8f a = s.acc[h];
      sum[2 * h] = (a[0] + a[1]) + a[2];
      sum[2 * h + 1] = (a[4] + a[5]) + a[6];
    }
    pair_store(w, p, sum);
  }
};
#endif

#if defined(__AVX512F__)
// AVX-512: the entry word broadcast to 16 lanes; lane L (< 12) stands for kind bit 8 + L, i.e.
// slot L % 3 with kind L / 3 (row 0 low, row 0 high, row 1 low, row 1 high). A variable shift
// gives each lane its slot's column within the window (slot 0's is 0: a shift by 32; the permute
// reads the low 4 bits), one bit test the lanes' mask, and one single-source permute of the
// 16-float window fills them. One load of x per codeword where qmoe-v1 and qmoe-v2 need two.
struct PairPermKernel {
  using Row = VecRow<v16f>;  // lanes 12..15 stay 0
  const Work& w;
  const uint32_t* entries;

  Row row(int64_t p) const { return pair_row<Row>(w, p); }
  void code(Row& s, uint32_t code, int odd) const {
    const uint32_t e = entries[code];
    const __m512i shift = _mm512_setr_epi32(32, 0, 4, 32, 0, 4, 32, 0, 4, 32, 0, 4, 32, 32, 32, 32);
    const __m512i bits =
        _mm512_setr_epi32(1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15,
                          1 << 16, 1 << 17, 1 << 18, 1 << 19, 0, 0, 0, 0);
    const __m512i word = _mm512_set1_epi32(static_cast<int>(e));
    const __mmask16 m = _mm512_test_epi32_mask(word, bits);
    // maskz forms: GCC 12's unmasked ones read an undefined vector (-Wmaybe-uninitialized).
    const __m512 v = _mm512_maskz_permutexvar_ps(m, _mm512_maskz_srlv_epi32(0xffff, word, shift),
                                                 _mm512_loadu_ps(s.xp + ((e >> 20) & 31)));
    s.acc[odd] = s.acc[odd] + reinterpret_cast<v16f>(v);
    s.xp += e >> 26;
  }
  void store(const Row& s, int64_t p) const {
    alignas(64) float t[16];
    const v16f a = s.acc[0] + s.acc[1];
    std::memcpy(t, &a, sizeof a);
    float sum[4];
    for (int k = 0; k < 4; ++k) sum[k] = (t[3 * k] + t[3 * k + 1]) + t[3 * k + 2];
    pair_store(w, p, sum);
  }
};
#endif

#if defined(__AVX2__)
// ---- one token, qmoe-p5 ---------------------------------------------------------------------
// A byte holds the symbols of 5 consecutive columns, so the 8 inputs from the byte's first column
// hold all of them: ANDed with the byte's 16-lane row of p5_lanes, the low inputs land in lanes
// 0..4 and the high ones in lanes 8..12. With AVX-512 the 8 inputs are broadcast to both halves of
// one vector (one AND, one add per byte); AVX2 works on the two 8-lane halves. Byte i of a row
// goes to accumulator i % 4, and the four are combined in a fixed order, so the result depends
// only on the row. No lists, no branches; the 16 KiB table stays in L1. wo 768x3072, one token,
// one thread, Zen 4: 272 us with AVX-512, 359 us for the two-half form, 1584 us for the lists
// path it replaces, 365 us for dense fp32.
inline float p5_row(const uint8_t* b, int64_t nb, const float* x, const Tables& tb, float lo_level,
                    float hi_level) {
  constexpr int U = 4;
  const int32_t* lanes = tb.p5_lanes;
#if defined(__AVX512F__)
  v16f acc[U] = {};
  auto step = [&](int u, uint8_t byte, const float* xp) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own _mm512_undefined_ps
#endif
    const __m512 w = _mm512_broadcast_f32x8(_mm256_loadu_ps(xp));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
    const __m512 m = _mm512_loadu_ps(reinterpret_cast<const float*>(lanes + 16 * byte));
    acc[u] += reinterpret_cast<v16f>(_mm512_and_ps(w, m));
  };
#else
  v8f acc_lo[U] = {}, acc_hi[U] = {};
  auto step = [&](int u, uint8_t byte, const float* xp) {
    const __m256 w = _mm256_loadu_ps(xp);
    const float* m = reinterpret_cast<const float*>(lanes + 16 * byte);
    acc_lo[u] += reinterpret_cast<v8f>(_mm256_and_ps(w, _mm256_loadu_ps(m)));
    acc_hi[u] += reinterpret_cast<v8f>(_mm256_and_ps(w, _mm256_loadu_ps(m + 8)));
  };
#endif
  int64_t i = 0;
  for (; i + U <= nb; i += U) {
    for (int u = 0; u < U; ++u) step(u, b[i + u], x + 5 * (i + u));
  }
  // The last 0..3 bytes, with constant accumulator indices (byte i goes to i % 4; i is a multiple
  // of 4 here) so that the accumulators can stay in registers.
  if (i < nb) step(0, b[i], x + 5 * i);
  if (i + 1 < nb) step(1, b[i + 1], x + 5 * (i + 1));
  if (i + 2 < nb) step(2, b[i + 2], x + 5 * (i + 2));
  float t[16];
#if defined(__AVX512F__)
  const v16f sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  std::memcpy(t, &sum, sizeof sum);
#else
  const v8f sum_lo = (acc_lo[0] + acc_lo[1]) + (acc_lo[2] + acc_lo[3]);
  const v8f sum_hi = (acc_hi[0] + acc_hi[1]) + (acc_hi[2] + acc_hi[3]);
  std::memcpy(t, &sum_lo, sizeof sum_lo);
  std::memcpy(t + 8, &sum_hi, sizeof sum_hi);
#endif
  const float lo = ((t[0] + t[1]) + (t[2] + t[3])) + t[4];
  const float hi = ((t[8] + t[9]) + (t[10] + t[11])) + t[12];
  return combine(lo_level, lo, hi_level, hi);
}

void p5_rows(const Work& w, const Tables& tb, int64_t r0, int64_t r1) {
  const Matrix& m = w.m;
  const int64_t nb = (m.cols + 4) / 5;
  for (int64_t r = r0; r < r1; ++r) {
    put(w, w.passes[0], r, 0,
        p5_row(m.packed + r * nb, nb, w.passes[0].xt, tb, bf16_bits_to_float(m.levels[2 * r]),
               bf16_bits_to_float(m.levels[2 * r + 1])));
  }
}
// A byte's window reads up to 2 columns past its last one (5 columns, 8 read).
static_assert(kColPad >= 3);
#endif

// ---- qmoe-g4: gap tokens over groups of 4 rows -----------------------------------------------
// A group's tokens cover its positions P = 4 * column + row (codec_layout.h, SPEC 4.5). No tables:
// a token is decoded by arithmetic. The batch path (and, with float inputs, the single-token one)
// lists the columns of each row's low and high symbols, 4 rows per decode; the AVX-512 single-token
// kernel takes 64 tokens at a time with int8 inputs (below).

// Up to 8 bytes of a stream from byte b, little endian; bytes at or past `size` read as 0 (never
// touched: a group's last kind bits may end a stream).
inline uint64_t g4_load64(const uint8_t* s, int64_t size, int64_t b) {
  if (b + 8 <= size) {
    uint64_t v;
    std::memcpy(&v, s + b, 8);
    return v;
  }
  uint64_t v = 0;
  for (int64_t i = b; i < size; ++i) v |= uint64_t{s[i]} << (8 * (i - b));
  return v;
}

// The 64 kind bits from bit k of the kind stream (bit 0 = bit k).
inline uint64_t g4_kind_bits(const Matrix& m, int64_t k) {
  const int64_t b = k >> 3;
  const unsigned sh = static_cast<unsigned>(k & 7);
  if (__builtin_expect(b + 9 <= m.g4_kind_bytes, 1)) {  // all but the stream's last bytes
    uint64_t lo;
    std::memcpy(&lo, m.g4_kinds + b, 8);
    // (two shifts: one by 64 - sh would be undefined for sh = 0)
    return (lo >> sh) | ((uint64_t{m.g4_kinds[b + 8]} << 1) << (63 - sh));
  }
  const uint64_t lo = g4_load64(m.g4_kinds, m.g4_kind_bytes, b);
  return sh == 0 ? lo : (lo >> sh) | (g4_load64(m.g4_kinds, m.g4_kind_bytes, b + 8) << (64 - sh));
}

// Group g's non-zero symbols as lists of columns: row j's low ones in out[j], its high ones in
// out[4 + j], ascending. Writes exactly n[c] entries to out[c]. The 8 list lengths live in two
// registers, 16 bits each (the lengths of one kind in one word): keeping them in an array indexed
// by the class made every load of a length wait on the store of another one (about 35 cycles a
// token, Zen 4). Rows of more than 65535 columns use the array.
inline void g4_lists_scalar(const Matrix& m, int64_t g, int32_t* const (&out)[8], int64_t (&n)[8]) {
  const int64_t t0 = m.g4_offsets[2 * g], t1 = m.g4_offsets[2 * g + 2];
  const uint8_t* tokens = m.g4_tokens;
  const uint8_t* kinds = m.g4_kinds;
  int64_t k = m.g4_offsets[2 * g + 1], pos = 0;
  if (m.cols > 65535) {
    int64_t cnt[8] = {};
    for (int64_t i = t0; i < t1; ++i) {
      const int t = (tokens[i >> 1] >> (4 * (i & 1))) & 15;
      if (t == 15) {
        pos += 15;
        continue;
      }
      pos += t;
      const int cls = static_cast<int>(pos & 3) + 4 * ((kinds[k >> 3] >> (k & 7)) & 1);
      out[cls][cnt[cls]++] = static_cast<int32_t>(pos >> 2);
      ++k;
      ++pos;
    }
    for (int c = 0; c < 8; ++c) n[c] = cnt[c];
    return;
  }
  // (lo_len >> 16 * row) & 0xffff: the length of list row (low); hi_len: of list 4 + row (high).
  uint64_t lo_len = 0, hi_len = 0;
  for (int64_t i = t0; i < t1; ++i) {
    const int t = (tokens[i >> 1] >> (4 * (i & 1))) & 15;
    if (t == 15) {
      pos += 15;
      continue;
    }
    pos += t;
    const int row = static_cast<int>(pos & 3);
    const uint64_t high = (kinds[k >> 3] >> (k & 7)) & 1;
    const uint64_t lens = high ? hi_len : lo_len;
    const unsigned sh = 16 * static_cast<unsigned>(row);
    out[row + 4 * static_cast<int>(high)][(lens >> sh) & 0xffff] = static_cast<int32_t>(pos >> 2);
    const uint64_t inc = uint64_t{1} << sh, mask = 0 - high;
    lo_len += inc & ~mask;
    hi_len += inc & mask;
    ++k;
    ++pos;
  }
  for (int j = 0; j < 4; ++j) {
    n[j] = static_cast<int64_t>((lo_len >> (16 * j)) & 0xffff);
    n[4 + j] = static_cast<int64_t>((hi_len >> (16 * j)) & 0xffff);
  }
}

// One token with float inputs (where the int8 kernel does not run), with no branch on the data:
// escapes are too irregular to predict (a version that branched on them was about 3 times slower).
// Portable: token by token, each input ANDed with the 8-lane mask of its class (lane j: row j low,
// lane 4 + j: row j high; the AND zeroes every other lane exactly, whatever the input; an escape's
// mask is zero) and added to accumulator i % 4, i the token's index in the group. AVX2: 16 tokens
// a step (g4_decode16), their inputs by 8-lane gathers, and one accumulator per class.
// wo 768x3072, one thread, Zen 4: 455-462 us, against 154 us for qmoe-v3's AVX2 kernel (the
// decode alone takes 218 us: a step's vector work is about 40 cycles for 16 tokens).
inline const std::array<v8i, 16>& g4_class_masks() {
  static const auto masks = [] {
    std::array<v8i, 16> a{};  // class row + 4 * kind; 8 and up: an escape
    for (int c = 0; c < 8; ++c) a[static_cast<size_t>(c)][(c & 3) + 4 * (c >> 2)] = -1;
    return a;
  }();
  return masks;
}

#if defined(__AVX2__)
// The 16 tokens from token i as nibbles of one word (token j: bits 4j..4j+3), zero past the stream.
// No branch on the parity of i (it is as good as random from one step to the next).
inline uint64_t g4_token_bits(const Matrix& m, int64_t i) {
  const int64_t b = i >> 1;
  const unsigned sh = 4 * static_cast<unsigned>(i & 1);
  if (__builtin_expect(b + 9 <= m.g4_token_bytes, 1)) {  // all but the stream's last bytes
    uint64_t lo;
    std::memcpy(&lo, m.g4_tokens + b, 8);
    // (two shifts: one by 64 - sh would be undefined for sh = 0)
    return (lo >> sh) | ((uint64_t{m.g4_tokens[b + 8]} << 1) << (63 - sh));
  }
  const uint64_t lo = g4_load64(m.g4_tokens, m.g4_token_bytes, b);
  const uint64_t next = b + 8 < m.g4_token_bytes ? m.g4_tokens[b + 8] : 0;
  return sh == 0 ? lo : (lo >> 4) | (next << 60);
}

// 16 consecutive tokens of a group (`bits`, from kind bit k, at position base), decoded at once:
// a 16-lane prefix sum of (t + real) and, in the upper 16 bits of the same lanes, of real (the
// rank of each non-zero symbol among the step's, for its kind bit), then each token's column and
// class (row + 4 * kind, + 8 for an escape). Tokens past the group's end are decoded too and must
// be ignored. The step's advance is computed apart from this (g4_advance16()), from the bits alone,
// so that the next step does not wait for this one's vector work. f(h, col, cls) takes the tokens
// 8h..8h+7 (each half as soon as it is decoded, which keeps fewer vectors live).
template <class F>
inline void g4_decode16(const Matrix& m, uint64_t bits, int64_t k, int64_t base, F&& f) {
  const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(bits));
  const __m128i nib = _mm_set1_epi8(15);
  const __m128i t8 = _mm_unpacklo_epi8(
      _mm_and_si128(v, nib), _mm_and_si128(_mm_srli_epi16(v, 4), nib));  // token j: byte j
  const __m256i one = _mm256_set1_epi32(1), fifteen = _mm256_set1_epi32(15);
  const __m256i t[2] = {_mm256_cvtepu8_epi32(t8), _mm256_cvtepu8_epi32(_mm_srli_si128(t8, 8))};
  __m256i real[2], inc[2], sum[2];
  for (int h = 0; h < 2; ++h) {
    real[h] = _mm256_andnot_si256(_mm256_cmpeq_epi32(t[h], fifteen), one);
    inc[h] = _mm256_add_epi32(_mm256_add_epi32(t[h], real[h]), _mm256_slli_epi32(real[h], 16));
    __m256i x = _mm256_add_epi32(inc[h], _mm256_slli_si256(inc[h], 4));
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));  // inclusive within each 128-bit half
    const __m256i carry = _mm256_permutevar8x32_epi32(x, _mm256_set1_epi32(3));
    sum[h] = _mm256_add_epi32(x, _mm256_blend_epi32(_mm256_setzero_si256(), carry, 0xf0));
  }
  sum[1] = _mm256_add_epi32(sum[1], _mm256_permutevar8x32_epi32(sum[0], _mm256_set1_epi32(7)));
  // Positions relative to base & ~3 (small), so that the columns need no 64-bit lanes.
  const __m256i rel0 = _mm256_set1_epi32(static_cast<int32_t>(base & 3));
  const __m256i col0 = _mm256_set1_epi32(static_cast<int32_t>(base >> 2));
  const __m256i kinds = _mm256_set1_epi32(static_cast<int32_t>(g4_kind_bits(m, k) & 0xffff));
  const __m256i low16 = _mm256_set1_epi32(0xffff), three = _mm256_set1_epi32(3);
  for (int h = 0; h < 2; ++h) {
    const __m256i excl = _mm256_sub_epi32(sum[h], inc[h]);
    const __m256i pos =
        _mm256_add_epi32(_mm256_add_epi32(rel0, _mm256_and_si256(excl, low16)), t[h]);
    const __m256i kind =
        _mm256_and_si256(_mm256_srlv_epi32(kinds, _mm256_srli_epi32(excl, 16)), one);
    const __m256i cls =
        _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(pos, three), _mm256_slli_epi32(kind, 2)),
                         _mm256_slli_epi32(_mm256_xor_si256(real[h], one), 3));
    f(h, _mm256_add_epi32(col0, _mm256_srli_epi32(pos, 2)), cls);
  }
}

// Past a step of `len` <= 16 tokens (`bits`, as g4_token_bits(), zero past the step): the next
// token i, position pos and kind bit k. Its positions are the sum of its tokens and its count of
// non-escapes, computed from the bits alone, apart from the step's vector work.
inline void g4_advance16(uint64_t bits, int len, int64_t& i, int64_t& pos, int64_t& k) {
  const uint64_t nibbles = 0x0f0f0f0f0f0f0f0full;
  const uint64_t bytes = (bits & nibbles) + ((bits >> 4) & nibbles);  // pairs, <= 30 each
  const int64_t t_sum = static_cast<int64_t>((bytes * 0x0101010101010101ull) >> 56);
  const int64_t reals =
      len - std::popcount(bits & (bits >> 1) & (bits >> 2) & (bits >> 3) & 0x1111111111111111ull);
  i += len;
  pos += t_sum + reals;
  k += reals;
}

// For each 8-bit lane mask, the indices of its set lanes in ascending order, one per byte (the
// bytes past popcount(mask) are 0): a vpermd index vector that packs those lanes to the front.
inline constexpr std::array<uint64_t, 256> kPackLanes = [] {
  std::array<uint64_t, 256> t{};
  for (unsigned mask = 0; mask < 256; ++mask) {
    int n = 0;
    for (unsigned lane = 0; lane < 8; ++lane) {
      if ((mask >> lane) & 1) t[mask] |= uint64_t{lane} << (8 * n++);
    }
  }
  return t;
}();

// The batch path's lists of group g (as g4_lists_scalar()), 16 tokens a step (g4_decode16): per
// class and half step, the lanes of that class packed to the front by one vpermd and stored at the
// list's end. No branch on the data (g4_lists_scalar() mispredicts on escapes, one token in six
// at P(0) = 0.885). Writes up to 8 entries past n[c] in each list. wi 3072x768, 8 tokens, one
// thread, Zen 4 at the avx2 level: 1291 -> 687 us (qmoe-v2: 336 us). The packs are most of the
// rest: with two plain stores in their place (wrong lists, timing only) it took 275 us, so a
// step's 16 packs cost about 60 cycles; a table of ready 32-byte index vectors was slower.
inline void g4_lists_avx2(const Matrix& m, int64_t g, int32_t* const (&out)[8], int64_t (&n)[8]) {
  const int32_t* off = m.g4_offsets + 2 * g;
  const int64_t t1 = off[2];
  int64_t cnt[8] = {};
  int64_t k = off[1], pos = 0;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = off[0]; i < t1;) {
    const int len = static_cast<int>(std::min<int64_t>(16, t1 - i));
    uint64_t bits = g4_token_bits(m, i);
    if (len < 16) bits &= (uint64_t{1} << (4 * len)) - 1;
    g4_decode16(m, bits, k, pos, [&](int h, __m256i col, __m256i cls) {
      // Lanes past the group's end: no class (tokens of the next group, or 0 past the stream).
      const __m256i past = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(len - 1 - 8 * h));
      cls = _mm256_or_si256(cls, _mm256_and_si256(past, _mm256_set1_epi32(8)));
      for (int c = 0; c < 8; ++c) {
        const unsigned mask = static_cast<unsigned>(
            _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(cls, _mm256_set1_epi32(c)))));
        const __m256i idx =
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kPackLanes[mask])));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[c] + cnt[c]),
                            _mm256_permutevar8x32_epi32(col, idx));
        cnt[c] += std::popcount(mask);
      }
    });
    g4_advance16(bits, len, i, pos, k);
  }
  for (int c = 0; c < 8; ++c) n[c] = cnt[c];
}
#endif

void g4_rows_float(const Work& w, int64_t r0, int64_t r1) {
  const Matrix& m = w.m;
  const float* x = w.passes[0].xt;
  for (int64_t g = r0 / 4; 4 * g < r1; ++g) {
    const int64_t t0 = m.g4_offsets[2 * g], t1 = m.g4_offsets[2 * g + 2];
    int64_t k = m.g4_offsets[2 * g + 1], pos = 0;
    float sums[8];  // class row + 4 * kind
#if defined(__AVX2__)
    // Lanes are token slots, one accumulator per class: class c adds the inputs of the step's
    // tokens of class c (an 8-lane gather of their columns, compared with c and ANDed).
    __m256 cacc[8];
    for (int c = 0; c < 8; ++c) cacc[c] = _mm256_setzero_ps();
    auto add8 = [&](__m256i col, __m256i cls) {
      const __m256 v = _mm256_i32gather_ps(x, col, 4);  // an escape's column is < cols too
      for (int c = 0; c < 8; ++c) {
        const __m256 is = _mm256_castsi256_ps(_mm256_cmpeq_epi32(cls, _mm256_set1_epi32(c)));
        cacc[c] = _mm256_add_ps(cacc[c], _mm256_and_ps(v, is));
      }
    };
    for (int64_t i = t0; i < t1;) {
      const int len = static_cast<int>(std::min<int64_t>(16, t1 - i));
      uint64_t bits = g4_token_bits(m, i);
      // Tokens past the group's end: 0 for the advance below, and class 8 (none) at column 0.
      if (len < 16) bits &= (uint64_t{1} << (4 * len)) - 1;
      g4_decode16(m, bits, k, pos, [&](int h, __m256i col, __m256i cls) {
        if (8 * h >= len) return;
        if (len < 8 * h + 8) {
          const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
          const __m256i past = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(len - 1 - 8 * h));
          cls = _mm256_or_si256(cls, _mm256_and_si256(past, _mm256_set1_epi32(8)));
          col = _mm256_andnot_si256(past, col);
        }
        add8(col, cls);
      });
      g4_advance16(bits, len, i, pos, k);
    }
    for (int c = 0; c < 8; ++c) {
      const __m128 q =
          _mm_add_ps(_mm256_castps256_ps128(cacc[c]), _mm256_extractf128_ps(cacc[c], 1));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      sums[c] = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
    }
#else
    // Tokens one by one: each input ANDed with the 8-lane mask of its class and added to
    // accumulator i % 4 (an escape: a zero mask).
    const std::array<v8i, 16>& masks = g4_class_masks();
    const uint8_t* tokens = m.g4_tokens;
    const uint8_t* kinds = m.g4_kinds;
    const int64_t k_end = m.g4_offsets[2 * g + 3];
    v8f acc[4] = {};
    auto token = [&](int64_t i, v8f& to) {
      const int t = (tokens[i >> 1] >> (4 * (i & 1))) & 15;
      const int real = t != 15;
      const int64_t p = pos + t;
      // Read whether used or not: the kind bit at k, or (when the stream ends at k) its last one.
      const int64_t kb = k < k_end ? k : k_end - 1;
      const int cls =
          (static_cast<int>(p & 3) + 4 * ((kinds[kb >> 3] >> (kb & 7)) & 1)) | ((real ^ 1) << 3);
      const float v = x[p >> 2];  // an escape's column is below the next token's: < cols
      pos = p + real;
      k += real;
      const v8i b = reinterpret_cast<v8i>(v8f{v, v, v, v, v, v, v, v});
      to += reinterpret_cast<v8f>(b & masks[static_cast<size_t>(cls)]);
    };
    int64_t i = t0;
    for (; i + 4 <= t1; i += 4) {
      token(i, acc[0]);
      token(i + 1, acc[1]);
      token(i + 2, acc[2]);
      token(i + 3, acc[3]);
    }
    for (int u = 0; i < t1; ++i, ++u) token(i, acc[u]);
    const v8f sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int c = 0; c < 8; ++c) sums[c] = sum[c];
#endif
    for (int j = 0; j < 4 && 4 * g + j < r1; ++j) {
      const int64_t r = 4 * g + j;
      put(w, w.passes[0], r, 0,
          combine(bf16_bits_to_float(m.levels[2 * r]), sums[j],
                  bf16_bits_to_float(m.levels[2 * r + 1]), sums[4 + j]));
    }
  }
}

// The vector qmoe-g4 kernels need AVX-512 VBMI (byte permutes), VBMI2 (byte compress), VNNI
// (vpdpbusd) and GFNI (a per-byte shift) on top of the avx512 level: kernels_g4_vnni.cpp compiles
// this file with them, and the dispatcher runs that copy for qmoe-g4 matrices on CPUs that have
// them (Ice Lake, Zen 4 and later). Elsewhere qmoe-g4 takes the lists path with float inputs.
#if defined(__AVX512VBMI__) && defined(__AVX512VBMI2__) && defined(__AVX512VNNI__) && \
    defined(__GFNI__)
#define QMOE_G4_VNNI 1
#endif

// The int8 kernels' results for group g (rows 4g .. 4g + 3 below r1) from its exact integer sums:
// max|x| / 127 * (lo * low sum + hi * high sum), formed in double, so that every int8 kernel gives
// the same bits.
inline void g4_put_int8(const Work& w, const Pass& p, int64_t g, int64_t r1,
                        const int64_t (&lo_sum)[4], const int64_t (&hi_sum)[4]) {
  const Matrix& m = w.m;
  for (int j = 0; j < 4 && 4 * g + j < r1; ++j) {
    const int64_t r = 4 * g + j;
    const double v =
        static_cast<double>(bf16_bits_to_float(m.levels[2 * r])) * static_cast<double>(lo_sum[j]) +
        static_cast<double>(bf16_bits_to_float(m.levels[2 * r + 1])) *
            static_cast<double>(hi_sum[j]);
    put(w, p, r, 0, static_cast<float>(static_cast<double>(p.xq_inv) * v));
  }
}

#if defined(__AVX2__)
// The results of group g's first `rows` rows (out[j]: row 4g + j), each scaled and accumulated as
// put() does: one 16-byte store for a whole group.
inline void g4_put4(const Work& w, const Pass& p, int64_t g, int rows, __m128 out) {
  if (rows < 4) {
    alignas(16) float o[4];
    _mm_store_ps(o, out);
    for (int j = 0; j < rows; ++j) put(w, p, 4 * g + j, 0, o[j]);
    return;
  }
  if (p.scale != nullptr) out = _mm_mul_ps(out, _mm_set1_ps(p.scale[0]));
  float* dst = p.y[0] + 4 * g;
  if (w.accumulate) out = _mm_add_ps(_mm_loadu_ps(dst), out);
  _mm_storeu_ps(dst, out);
}
#endif

#if defined(QMOE_G4_VNNI)
// Up to 64 consecutive tokens of a group, decoded at once:
//   * the tokens as bytes t: steps start at an even token, so the 32 bytes that hold them are
//     one load, zero-extended to words (vpmovzxbw), whose two nibbles go to their two bytes by a
//     shift and one ternary-logic OR-AND (a group that starts at an odd token leaves lane 0 of
//     its first step out); a lane advances min(t + 1, 15) positions (a vpshufb table), an
//     escape's lane holds no symbol;
//   * the position of each lane's symbol: an inclusive prefix sum of the advances, within each
//     8-lane qword by one multiplication by 0x0101..01 (sums <= 120 fit a byte), across qwords by
//     a masked permute of the 8 qword totals (qword q gets those of qwords < q) and one vpsadbw;
//     kept as column - c0 (< 241: 64 tokens cover at most 960 positions) and a byte whose low two
//     bits are the row (below 128: a vpshufb index);
//   * the kinds: the next popcount(real) kind bits deposited (pdep) on the lanes with a symbol.
struct G4Step {
  __m512i col;      // column of the lane's symbol, minus c0
  __m512i row;      // its row within the group in bits 0..1; bits 2..6 other, bit 7 clear
  uint64_t real;    // lanes that hold a non-zero symbol
  uint64_t hi;      // ... of high kind
  int64_t advance;  // positions the step's tokens cover
};

struct G4Consts {
  __m512i advance;  // vpshufb table, each 16-byte lane: t -> min(t + 1, 15)
  __m512i totals;   // byte p of each qword <- byte 8p + 7 (qword p's inclusive total)
  uint64_t before;  // bytes p < q of qword q
  __m512i bcast;    // byte 0 of each qword to all 8 of its bytes (in-lane vpshufb)
  G4Consts() {
    alignas(64) uint8_t adv[64], tot[64], bc[64];
    before = 0;
    for (int j = 0; j < 64; ++j) {
      const int q = j >> 3, b = j & 7;
      adv[j] = static_cast<uint8_t>(std::min((j & 15) + 1, 15));
      tot[j] = static_cast<uint8_t>(8 * b + 7);
      if (b < q) before |= uint64_t{1} << j;
      bc[j] = static_cast<uint8_t>(j & 8);
    }
    advance = _mm512_load_si512(adv);
    totals = _mm512_load_si512(tot);
    bcast = _mm512_load_si512(bc);
  }
};

// Tokens i + skip .. i + n - 1 of the stream (i even, skip 0 or 1, skip < n <= 64) from position
// `base` of the group (the position after the previous token's), kind bits from k. Lane j holds
// token i + j; lanes below skip hold none.
inline G4Step g4_step(const Matrix& m, const G4Consts& cs, int64_t i, int n, int skip, int64_t k,
                      int64_t base) {
  const __m512i zero = _mm512_setzero_si512();
  const uint64_t valid =
      (n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1) & ~static_cast<uint64_t>(skip);
  // The bytes holding the tokens (a whole 32 where the stream has them: the bytes past the step's
  // tokens only reach lanes outside `valid`).
  const uint8_t* at = m.g4_tokens + (i >> 1);
  const __m256i src =
      __builtin_expect((i >> 1) + 32 <= m.g4_token_bytes, 1)
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
          : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t{1} << ((n + 1) / 2)) - 1), at);
  // maskz forms throughout: GCC 12's unmasked ones read an undefined vector
  // (-Wmaybe-uninitialized).
  // Word w = byte w = (token 2w + 1) << 4 | token 2w; (w | w << 4) & 0x0f0f puts the two tokens in
  // its two bytes (ternary logic 0xa8: (A | B) & C).
  const __m512i wd = _mm512_maskz_cvtepu8_epi16(~__mmask32{0}, src);
  const __m512i t = _mm512_maskz_ternarylogic_epi32(~__mmask16{0}, wd,
                                                    _mm512_maskz_slli_epi16(~__mmask32{0}, wd, 4),
                                                    _mm512_set1_epi16(0x0f0f), 0xa8);
  const uint64_t esc = _mm512_mask_cmpeq_epi8_mask(valid, t, _mm512_set1_epi8(15));
  const __m512i a = _mm512_maskz_shuffle_epi8(valid, cs.advance, t);
  G4Step s;
  s.real = valid & ~esc;
  s.hi = _pdep_u64(g4_kind_bits(m, k), s.real);
  // In-qword inclusive prefix; E, the exclusive prefix of the qword totals, by one sum of
  // absolute differences over the totals of the qwords before.
  const __m512i mq = _mm512_mullo_epi64(a, _mm512_set1_epi64(0x0101010101010101LL));
  const __m512i e = _mm512_sad_epu8(_mm512_maskz_permutexvar_epi8(cs.before, cs.totals, mq), zero);
  // Lane k's symbol is at base + S_k - 1 (S_k the inclusive prefix), column c0 + ((s + 4) >> 2) - 1
  // with s = r0 + 3 + S_k: split E + r0 - 1 = 4 h + l per qword (h >= -1, arithmetic shift), so
  // that the per-lane part (in-qword prefix + l <= 123) stays a byte.
  const __m512i b = _mm512_add_epi64(e, _mm512_set1_epi64((base & 3) - 1));
  const __m512i l = _mm512_and_si512(b, _mm512_set1_epi64(3));
  s.row = _mm512_add_epi8(mq, _mm512_shuffle_epi8(l, cs.bcast));
  // h as a byte in every byte of its qword: bits 2..9 of b (two's complement: h = -1 gives 0xff),
  // by one multishift.
  const __m512i h = _mm512_maskz_multishift_epi64_epi8(~uint64_t{0}, _mm512_set1_epi8(2), b);
  // row >> 2 in each byte: one GF(2) affine transform (bit i of a byte <- its bit i + 2).
  s.col = _mm512_add_epi8(h, _mm512_maskz_gf2p8affine_epi64_epi8(
                                 ~uint64_t{0}, s.row, _mm512_set1_epi64(0x0408102040800000LL), 0));
  const __m512i total = _mm512_add_epi64(e, _mm512_maskz_srli_epi64(0xff, mq, 56));  // qword 7
  s.advance = _mm_extract_epi64(_mm512_maskz_extracti64x2_epi64(0xff, total, 3), 1);
  return s;
}

// The batch path's lists of group g (as g4_lists_scalar()), a step at a time: per row and kind,
// the step's columns compressed into consecutive bytes and widened. Writes up to 64 entries past
// n[c] in each list.
inline void g4_lists_avx512(const Matrix& m, const G4Consts& cs, int64_t g,
                            int32_t* const (&out)[8], int64_t (&n)[8]) {
  const int32_t* off = m.g4_offsets + 2 * g;
  int64_t cnt[8] = {};
  int64_t k = off[1], base = 0;
  int skip = off[0] & 1;
  for (int64_t i = off[0] - skip; i + skip < off[2];) {
    const int len = static_cast<int>(std::min<int64_t>(64, off[2] - i));
    const G4Step s = g4_step(m, cs, i, len, skip, k, base);
    skip = 0;
    const __m512i c0 = _mm512_set1_epi32(static_cast<int>(base >> 2));
    const __m512i row = _mm512_and_si512(s.row, _mm512_set1_epi8(3));
    for (int j = 0; j < 4; ++j) {
      const uint64_t in_row =
          _mm512_cmpeq_epi8_mask(row, _mm512_set1_epi8(static_cast<char>(j))) & s.real;
      for (int kind = 0; kind < 2; ++kind) {
        const uint64_t lanes = kind ? in_row & s.hi : in_row & ~s.hi;
        const int c = j + 4 * kind;
        const int64_t num = std::popcount(lanes);
        const __m512i packed = _mm512_maskz_compress_epi8(lanes, s.col);
        int32_t* dst = out[c] + cnt[c];
        auto put16 = [&](int32_t* at, __m128i bytes16) {
          _mm512_storeu_si512(at,
                              _mm512_add_epi32(_mm512_maskz_cvtepu8_epi32(0xffff, bytes16), c0));
        };
        put16(dst, _mm512_maskz_extracti32x4_epi32(0xf, packed, 0));
        if (num > 16) {
          put16(dst + 16, _mm512_maskz_extracti32x4_epi32(0xf, packed, 1));
          if (num > 32) {
            put16(dst + 32, _mm512_maskz_extracti32x4_epi32(0xf, packed, 2));
            if (num > 48) put16(dst + 48, _mm512_maskz_extracti32x4_epi32(0xf, packed, 3));
          }
        }
        cnt[c] += num;
      }
    }
    i += len;
    k += std::popcount(s.real);
    base += s.advance;
  }
  for (int c = 0; c < 8; ++c) n[c] = cnt[c];
}

// The results of group g's four rows (g4_put_int8()) from its 8 accumulators of 16 int32 lanes,
// in vectors: the accumulators folded together (halves, then quarters of the vectors, then pairs
// of lanes), then the same operations as g4_put_int8() in the same order, so the same bits. A
// row's sums stay int32: each is at most 127 * cols < 2^31 in magnitude (cols <= 2^24 here).
// Done with scalars (the sums added in int64, then g4_put_int8()) it took about 40 cycles a group,
// a sixth of a product with a wi 3072x768 matrix.
inline void g4_finish_vnni(const Work& w, const Pass& p, int64_t g, int64_t r1,
                           const __m512i (&lo)[4], const __m512i (&hi)[4]) {
  // a's 256-bit halves added into lanes 0..7, b's into lanes 8..15.
  auto halves = [](__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_maskz_shuffle_i64x2(0xff, a, b, 0x44),
                            _mm512_maskz_shuffle_i64x2(0xff, a, b, 0xee));
  };
  // 128-bit lane j of the result: the 4 partial sums of row j.
  auto quarters = [](__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_maskz_shuffle_i64x2(0xff, a, b, 0x88),
                            _mm512_maskz_shuffle_i64x2(0xff, a, b, 0xdd));
  };
  const __m512i l = quarters(halves(lo[0], lo[1]), halves(lo[2], lo[3]));
  const __m512i h = quarters(halves(hi[0], hi[1]), halves(hi[2], hi[3]));
  // 128-bit lane j: (low, high, low, high) partial sums of row j; then (low, high) sums in its
  // first two ints, and those of the four rows gathered: low 0, high 0, low 1, ... high 3.
  const __m512i u = _mm512_add_epi32(_mm512_maskz_unpacklo_epi32(0xffff, l, h),
                                     _mm512_maskz_unpackhi_epi32(0xffff, l, h));
  const __m512i v = _mm512_add_epi32(u, _mm512_maskz_shuffle_epi32(0xffff, u, _MM_PERM_BADC));
  const __m256i sums = _mm512_maskz_extracti64x4_epi64(
      0xf, _mm512_maskz_permutexvar_epi64(0xff, _mm512_set_epi64(6, 4, 2, 0, 6, 4, 2, 0), v), 0);
  const int rows = static_cast<int>(std::min<int64_t>(4, r1 - 4 * g));
  // The rows' (low, high) levels, bf16 -> float -> double; none read past the matrix's rows.
  const __m128i lv =
      _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << (2 * rows)) - 1), w.m.levels + 8 * g);
  const __m512d levels = _mm512_maskz_cvtps_pd(
      0xff, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lv), 16)));
  const __m512d prod = _mm512_mul_pd(levels, _mm512_maskz_cvtepi32_pd(0xff, sums));
  // Element 2 j: row j's low product + high product, times max|x| / 127.
  const __m512d row = _mm512_mul_pd(_mm512_add_pd(prod, _mm512_maskz_permute_pd(0xff, prod, 0x55)),
                                    _mm512_set1_pd(static_cast<double>(p.xq_inv)));
  __m128 out = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(
      _mm512_maskz_cvtpd_ps(0xff, row), _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  g4_put4(w, p, g, rows, out);
}

// One token, AVX-512: 64 tokens at a time (g4_step), their int8 inputs from the 256 columns at
// the step's first column (two two-source byte permutes and a blend), split by kind into two
// vectors, and each row's sums by vpdpbusd with a 0/1 byte mask of the row's lanes (a vpshufb of
// the row bytes): four rows x two kinds int32 accumulators per group, exact integer sums. The row
// result is max|x| / 127 * (lo * low sum + hi * high sum), formed in double.
void g4_rows_int8(const Work& w, int64_t r0, int64_t r1) {
  static const G4Consts cs;
  const Matrix& m = w.m;
  const Pass& p = w.passes[0];
  const int8_t* xq = p.xq;
  __m512i onehot[4];  // byte 1 at the indices i of each 16-byte lane with i % 4 == j
  for (int j = 0; j < 4; ++j) {
    alignas(64) int8_t t[64];
    for (int i = 0; i < 64; ++i) t[i] = (i & 3) == j ? 1 : 0;
    onehot[j] = _mm512_load_si512(t);
  }
  for (int64_t g = r0 / 4; 4 * g < r1; ++g) {
    const int32_t* off = m.g4_offsets + 2 * g;
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm512_setzero_si512();
    // Software-pipelined: the next step's decode (a long dependency chain that does not depend on
    // this step) is issued before this step's gathers and sums, whose inputs are ready by then.
    // wo 768x3072, one thread, Zen 4: 94 -> 73 us (two steps ahead: 76 us).
    const int skip = off[0] & 1;
    int64_t i = off[0] - skip, k = off[1], base = 0;
    const int64_t end = off[2];
    if (off[0] < end) {
      int len = static_cast<int>(std::min<int64_t>(64, end - i));
      G4Step s = g4_step(m, cs, i, len, skip, k, base);
      for (;;) {
        const int64_t c0 = base >> 2;
        i += len;
        k += std::popcount(s.real);
        base += s.advance;
        G4Step next{};
        const bool more = i < end;
        if (more) {
          len = static_cast<int>(std::min<int64_t>(64, end - i));
          next = g4_step(m, cs, i, len, 0, k, base);
        }
        const int8_t* xw = xq + c0;
        const uint64_t upper = _mm512_movepi8_mask(s.col);  // column >= 128 of the window
        const __m512i xv = _mm512_mask_blend_epi8(
            upper,
            _mm512_permutex2var_epi8(_mm512_loadu_si512(xw), s.col, _mm512_loadu_si512(xw + 64)),
            _mm512_permutex2var_epi8(_mm512_loadu_si512(xw + 128), s.col,
                                     _mm512_loadu_si512(xw + 192)));
        const __m512i xl = _mm512_maskz_mov_epi8(s.real & ~s.hi, xv);
        const __m512i xh = _mm512_maskz_mov_epi8(s.hi, xv);
        for (int j = 0; j < 4; ++j) {
          const __m512i in_row = _mm512_shuffle_epi8(onehot[j], s.row);
          lo[j] = _mm512_dpbusd_epi32(lo[j], in_row, xl);
          hi[j] = _mm512_dpbusd_epi32(hi[j], in_row, xh);
        }
        if (!more) break;
        s = next;
      }
    }
    g4_finish_vnni(w, p, g, r1, lo, hi);
  }
}
#endif  // QMOE_G4_VNNI

#if defined(__AVX2__) && !defined(QMOE_G4_VNNI)
// The constant vectors of g4_rows_int8_avx2(), read from memory as instruction operands (16
// registers hold the accumulators and the step's values; broadcasts rebuilt each step cost more).
struct alignas(32) G4Avx2Consts {
  int8_t advance[32];      // t -> min(t + 1, 15), each lane: the positions a token advances
  int8_t kind_spread[32];  // byte i of lane L <- byte 2L + i / 8 of the step's 32 kind bits
  int8_t bit_of[32];       // 1 << (i % 8)
  int8_t onehot[4][32];    // byte 1 at index j of each lane
  int8_t low4[32];         // 15
  int8_t row_mask[32];     // 3
  int8_t top[32];          // 0x80
  int16_t ones[16];        // 1
  G4Avx2Consts() {
    for (int i = 0; i < 32; ++i) {
      const int j = i & 15;
      advance[i] = static_cast<int8_t>(std::min(j + 1, 15));
      kind_spread[i] = static_cast<int8_t>(i / 8);
      bit_of[i] = static_cast<int8_t>(static_cast<uint8_t>(1u << (i % 8)));
      for (int r = 0; r < 4; ++r) onehot[r][i] = j == r ? 1 : 0;
      low4[i] = 15;
      row_mask[i] = 3;
      top[i] = static_cast<int8_t>(-128);
    }
    for (int16_t& o : ones) o = 1;
  }
};

inline __m256i g4_c(const int8_t (&v)[32]) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
}

// At least the 16 kind bits from bit k of the kind stream (bit 0 = bit k): one load and a shift.
inline uint64_t g4_kind_bits16(const Matrix& m, int64_t k) {
  const int64_t b = k >> 3;
  if (__builtin_expect(b + 8 <= m.g4_kind_bytes, 1)) {
    uint64_t v;
    std::memcpy(&v, m.g4_kinds + b, 8);
    return v >> (k & 7);
  }
  return g4_kind_bits(m, k);
}

// A lane of g4_rows_int8_avx2(): its group, next token, end token, next kind bit and position in
// the group; `mask`, ORed into the step's token bits (escapes): 0, the tokens past the group's end
// on its last step, all of them when the lane is idle; `stop`, the token from which the step
// needs the lane's attention (its last step, or its end); `keep`, ~0 when active and 0 when idle
// (an idle lane's token and position stay 0).
struct G4Lane {
  int64_t g = 0, i = 0, e = 0, k = 0, b = 0;
  uint64_t mask = ~uint64_t{0};
  int64_t stop = INT64_MAX;
  int64_t keep = 0;
  // Called when i >= stop: true when the group is done, else the mask of its last step.
  bool last_step() {
    const int64_t left = e - i;
    if (left <= 0) return true;
    mask = ~uint64_t{0} << (4 * left);
    stop = e;
    return false;
  }
};

// The lane of the next group in [*g_next, g_end) with tokens, or an idle lane; groups without any
// get their (zero) results here.
inline G4Lane g4_next_lane(const Work& w, int64_t* g_next, int64_t g_end, int64_t r1) {
  const int32_t* off = w.m.g4_offsets;
  while (*g_next < g_end) {
    const int64_t g = (*g_next)++;
    if (off[2 * g] < off[2 * g + 2]) {
      G4Lane l{g, off[2 * g], off[2 * g + 2],      off[2 * g + 1],
               0, 0,          off[2 * g + 2] - 15, ~int64_t{0}};
      if (l.i >= l.stop) l.last_step();
      return l;
    }
    const int64_t zero[4] = {0, 0, 0, 0};
    g4_put_int8(w, w.passes[0], g, r1, zero, zero);
  }
  return G4Lane{};
}

// Lane `lane`'s group is done: its rows' results from acc32 (class c = j: row j low, 4 + j: high;
// the lane's partial sums in ints 4 lane .. 4 lane + 3), which are cleared. In vectors, the same
// operations as g4_put_int8() in the same order, so the same bits: the partial sums added by two
// levels of vphaddd (int32 is exact: a row's sum is at most 127 * cols < 2^31 in magnitude), the
// two products of each row in double (exact: a bf16 level times an int32), their sum, the factor
// and one rounding to float. With scalars (the sums in int64, then g4_put_int8()) a product took
// 147 (wi) and 125 us (wo) on one thread of a Zen 4 at the avx2 level; now 136 and 120 (medians
// of five alternating rounds).
inline void g4_finish_lane(const Work& w, const G4Lane& l, int lane, int32_t (&acc32)[8][8],
                           int64_t r1) {
  __m128i part[8];
  for (int c = 0; c < 8; ++c) {
    __m128i* at = reinterpret_cast<__m128i*>(acc32[c] + 4 * lane);
    part[c] = _mm_load_si128(at);
    _mm_store_si128(at, _mm_setzero_si128());
  }
  // Lane j of each: row j's low (high) sum.
  const __m128i lo =
      _mm_hadd_epi32(_mm_hadd_epi32(part[0], part[1]), _mm_hadd_epi32(part[2], part[3]));
  const __m128i hi =
      _mm_hadd_epi32(_mm_hadd_epi32(part[4], part[5]), _mm_hadd_epi32(part[6], part[7]));
  const Matrix& m = w.m;
  const Pass& p = w.passes[0];
  const int64_t g = l.g;
  const int rows = static_cast<int>(std::min<int64_t>(4, r1 - 4 * g));
  // Row j's (low, high) levels as dword j: low in its bits 0..15, high in 16..31.
  __m128i lv;
  if (rows == 4) {
    lv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m.levels + 8 * g));
  } else {
    alignas(16) uint16_t part_levels[8] = {};
    std::memcpy(part_levels, m.levels + 8 * g, static_cast<size_t>(rows) * 2 * sizeof(uint16_t));
    lv = _mm_load_si128(reinterpret_cast<const __m128i*>(part_levels));
  }
  const __m256d lo_level = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(lv, 16)));
  const __m256d hi_level =
      _mm256_cvtps_pd(_mm_castsi128_ps(_mm_and_si128(lv, _mm_set1_epi32(-65536))));
  const __m256d v = _mm256_add_pd(_mm256_mul_pd(lo_level, _mm256_cvtepi32_pd(lo)),
                                  _mm256_mul_pd(hi_level, _mm256_cvtepi32_pd(hi)));
  __m128 out = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_set1_pd(static_cast<double>(p.xq_inv)), v));
  g4_put4(w, p, g, rows, out);
}

// One token, AVX2, int8 inputs: the same sums as g4_rows_int8() without its byte permutes. Two
// groups go at a time, one per 128-bit lane, 16 tokens of each a step; a lane that finishes its
// group takes the block's next one, so the two lanes' groups are independent chains.
//   * tokens: one 32-byte load (16 bytes from each lane's first token), two variable shifts that
//     align each lane's 16 nibbles, split into bytes by two ANDs and an unpack; tokens past a
//     group's end are made escapes (no symbol);
//   * positions: the advances min(t + 1, 15) by a vpshufb table, their inclusive prefix sum S
//     within each lane by four shift-and-adds (at most 240: a byte); a lane's symbol sits at
//     (base & 3) + S - 1 from its lane's first column c0 = base / 4, so its column offset (<= 60)
//     and row are that byte's bits 2..7 and 0..1;
//   * inputs: the 64 columns from c0, four 16-byte chunks per lane, each permuted by the low 4
//     bits of the column offset (vpshufb), the right one picked by three blends on its bits 4, 5;
//   * kinds: the lane's next kind bits deposited (pdep) on its non-escape tokens, spread to a byte
//     mask;
//   * sums: per row j, a 0/1 byte mask of the lanes of that row (a vpshufb of the row, escapes
//     zeroed by bit 7), and one vpmaddubsw per kind into int16 accumulators (at most 254 a step in
//     magnitude), folded into int32 every 128 steps and at each group's end.
// Exact integer sums, as the VNNI kernel's, so both give the same bits.
void g4_rows_int8_avx2(const Work& w, int64_t r0, int64_t r1) {
  static const G4Avx2Consts k;
  const Matrix& m = w.m;
  const int8_t* xq = w.passes[0].xq;
  const int64_t g_end = (r1 + 3) / 4;
  int64_t g_next = r0 / 4;
  alignas(32) int32_t acc32[8][8] = {};
  // The int16 sums, one variable per class (row j low: lo_j, high: hi_j), which GCC keeps in
  // registers (an array of them it kept on the stack: a load and a store per class and step).
  __m256i lo0 = _mm256_setzero_si256(), lo1 = lo0, lo2 = lo0, lo3 = lo0;
  __m256i hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0;
  int steps = 0;  // since acc was last folded into acc32
  G4Lane l0 = g4_next_lane(w, &g_next, g_end, r1);
  G4Lane l1 = g4_next_lane(w, &g_next, g_end, r1);
  // Per lane (qwords 0 and 2), what changes only with its group or its last step: the bits its
  // tokens start at within their first byte (0 or 4; a lane's token index keeps its parity within
  // a group), 64 minus that, and its mask of escapes.
  // Kept in memory and read as operands: in registers they pushed the int16 sums out to the stack.
  alignas(32) uint64_t lane_words[3][4] = {};  // tshift, tshift2, tmask
  auto lanes_changed = [&] {
    const auto sh = [](const G4Lane& l) { return static_cast<uint64_t>(4 * (l.i & 1)); };
    lane_words[0][0] = sh(l0);
    lane_words[0][2] = sh(l1);
    lane_words[1][0] = 64 - sh(l0);
    lane_words[1][2] = 64 - sh(l1);
    lane_words[2][0] = l0.mask;
    lane_words[2][2] = l1.mask;
  };
  auto lane_vec = [&](int q) {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_words[q]));
  };
  lanes_changed();
  const uint8_t* tokens = m.g4_tokens;
  while ((l0.keep | l1.keep) != 0) {
    // Each lane's 16 tokens as 64 bits in its low qword: 16 bytes from the byte of its first
    // token, shifted right by 0 or 4 bits across the lane's two qwords (a shift by 64 gives 0).
    const int64_t b0 = l0.i >> 1, b1 = l1.i >> 1;
    __m256i raw;
    if (__builtin_expect(std::max(b0, b1) + 16 <= m.g4_token_bytes, 1)) {
      raw = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(tokens + b1),
                                reinterpret_cast<const __m128i*>(tokens + b0));
    } else {  // a lane near the stream's end: zeros past it
      alignas(32) uint8_t tail[32] = {};
      std::memcpy(tail, tokens + b0,
                  static_cast<size_t>(std::min<int64_t>(16, m.g4_token_bytes - b0)));
      std::memcpy(tail + 16, tokens + b1,
                  static_cast<size_t>(std::min<int64_t>(16, m.g4_token_bytes - b1)));
      raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    const __m256i v =
        _mm256_or_si256(_mm256_or_si256(_mm256_srlv_epi64(raw, lane_vec(0)),
                                        _mm256_sllv_epi64(_mm256_srli_si256(raw, 8), lane_vec(1))),
                        lane_vec(2));
    const __m256i t = _mm256_unpacklo_epi8(_mm256_and_si256(v, g4_c(k.low4)),
                                           _mm256_and_si256(_mm256_srli_epi16(v, 4), g4_c(k.low4)));
    const __m256i esc = _mm256_cmpeq_epi8(t, g4_c(k.low4));
    const __m256i adv = _mm256_shuffle_epi8(g4_c(k.advance), t);
    __m256i s = _mm256_add_epi8(adv, _mm256_slli_si256(adv, 1));
    s = _mm256_add_epi8(s, _mm256_slli_si256(s, 2));
    s = _mm256_add_epi8(s, _mm256_slli_si256(s, 4));
    s = _mm256_add_epi8(s, _mm256_slli_si256(s, 8));
    // (base & 3) + S - 1, in [0, 242]: the symbol's position minus 4 c0.
    const __m256i pr =
        _mm256_add_epi8(s, _mm256_set_m128i(_mm_set1_epi8(static_cast<char>((l1.b & 3) - 1)),
                                            _mm_set1_epi8(static_cast<char>((l0.b & 3) - 1))));
    // The column offset's low 4 bits: all a vpshufb reads (its chunk is picked below).
    const __m256i col = _mm256_and_si256(_mm256_srli_epi16(pr, 2), g4_c(k.low4));
    const int8_t* x0 = xq + (l0.b >> 2);
    const int8_t* x1 = xq + (l1.b >> 2);
    auto chunk = [&](int q) {
      return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(x1 + 16 * q),
                                 reinterpret_cast<const __m128i*>(x0 + 16 * q));
    };
    // Chunk q = col / 16 = the byte's bits 6..7 (bit 7 of pr << 1, bit 7 of pr): each chunk
    // permuted by the column's low 4 bits, then two levels of blends.
    const __m256i bit4 = _mm256_slli_epi16(pr, 1);
    const __m256i xv =
        _mm256_blendv_epi8(_mm256_blendv_epi8(_mm256_shuffle_epi8(chunk(0), col),
                                              _mm256_shuffle_epi8(chunk(1), col), bit4),
                           _mm256_blendv_epi8(_mm256_shuffle_epi8(chunk(2), col),
                                              _mm256_shuffle_epi8(chunk(3), col), bit4),
                           pr);
    const uint32_t real = ~static_cast<uint32_t>(_mm256_movemask_epi8(esc));
    const uint32_t real0 = real & 0xffff, real1 = real >> 16;
    const uint32_t high = static_cast<uint32_t>(_pdep_u64(g4_kind_bits16(m, l0.k), real0)) |
                          (static_cast<uint32_t>(_pdep_u64(g4_kind_bits16(m, l1.k), real1)) << 16);
    const __m256i hm = _mm256_cmpeq_epi8(
        _mm256_and_si256(
            _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(high)), g4_c(k.kind_spread)),
            g4_c(k.bit_of)),
        g4_c(k.bit_of));
    // The row in bits 0..1, bit 7 set for an escape: a 0/1 mask per row by one vpshufb.
    const __m256i sel =
        _mm256_or_si256(_mm256_and_si256(pr, g4_c(k.row_mask)), _mm256_and_si256(esc, g4_c(k.top)));
    const __m256i xh = _mm256_and_si256(hm, xv), xl = _mm256_andnot_si256(hm, xv);
    const auto add_row = [&](int j, __m256i lo, __m256i hi, __m256i* lo_out, __m256i* hi_out) {
      const __m256i in_row = _mm256_shuffle_epi8(g4_c(k.onehot[j]), sel);
      *lo_out = _mm256_add_epi16(lo, _mm256_maddubs_epi16(in_row, xl));
      *hi_out = _mm256_add_epi16(hi, _mm256_maddubs_epi16(in_row, xh));
    };
    add_row(0, lo0, hi0, &lo0, &hi0);
    add_row(1, lo1, hi1, &lo1, &hi1);
    add_row(2, lo2, hi2, &lo2, &hi2);
    add_row(3, lo3, hi3, &lo3, &hi3);
    // Each lane's advance is the last byte of its prefix sum (what follows a group's end is
    // unused); an idle lane stays at token 0 and column 0.
    l0.b = (l0.b + _mm256_extract_epi8(s, 15)) & l0.keep;
    l1.b = (l1.b + _mm256_extract_epi8(s, 31)) & l1.keep;
    l0.i = (l0.i + 16) & l0.keep;
    l1.i = (l1.i + 16) & l1.keep;
    l0.k += std::popcount(real0);
    l1.k += std::popcount(real1);
    if (__builtin_expect(++steps == 128 || l0.i >= l0.stop || l1.i >= l1.stop, 0)) {
      const __m256i ones = _mm256_load_si256(reinterpret_cast<const __m256i*>(k.ones));
      const auto fold = [&](int c, __m256i a) {
        __m256i* a32 = reinterpret_cast<__m256i*>(acc32[c]);
        _mm256_store_si256(a32,
                           _mm256_add_epi32(_mm256_load_si256(a32), _mm256_madd_epi16(a, ones)));
        return _mm256_setzero_si256();
      };
      lo0 = fold(0, lo0);
      lo1 = fold(1, lo1);
      lo2 = fold(2, lo2);
      lo3 = fold(3, lo3);
      hi0 = fold(4, hi0);
      hi1 = fold(5, hi1);
      hi2 = fold(6, hi2);
      hi3 = fold(7, hi3);
      steps = 0;
      if (l0.i >= l0.stop && l0.last_step()) {
        g4_finish_lane(w, l0, 0, acc32, r1);
        l0 = g4_next_lane(w, &g_next, g_end, r1);
      }
      if (l1.i >= l1.stop && l1.last_step()) {
        g4_finish_lane(w, l1, 1, acc32, r1);
        l1 = g4_next_lane(w, &g_next, g_end, r1);
      }
      lanes_changed();
    }
  }
}
#endif  // __AVX2__ && !QMOE_G4_VNNI

// Results are staged per row block (scratch after the lists, kStageFloats floats) and written out
// token by token, so each output row gets one contiguous run of stores instead of one store per
// row and token.
// qmoe-v3 rows come in pairs (r0 is even): both rows' lists from one decode of the pair's codes,
// each list region split in two halves (list_capacity is sized for that).
void rows_lists(const Work& w, const Tables& tb, int64_t r0, int64_t r1, int32_t* scratch) {
  const Matrix& m = w.m;
  int32_t* lo = scratch;
  int32_t* hi = scratch + w.list_capacity;
  float* stage = reinterpret_cast<float*>(scratch + 2 * w.list_capacity);
  auto staged = [&](int q, int64_t r) { return stage + (q * kRowBlock + (r - r0)) * kPassTokens; };
  // Row r's results for every pass from its lists.
  auto finish = [&](int64_t r, const int32_t* l, int64_t n_lo, const int32_t* h, int64_t n_hi) {
    const float lo_level = bf16_bits_to_float(m.levels[2 * r]);
    const float hi_level = bf16_bits_to_float(m.levels[2 * r + 1]);
    for (int q = 0; q < w.num_passes; ++q) {
      const Pass& p = w.passes[q];
      float* out = staged(q, r);
      switch (p.bp) {
        case 1:
          out[0] = combine(lo_level, sum_at(p.xt, l, n_lo), hi_level, sum_at(p.xt, h, n_hi));
          break;
        case 8:
          finish_cols<1>(p, l, n_lo, h, n_hi, lo_level, hi_level, out);
          break;
        case 16:
          finish_cols<2>(p, l, n_lo, h, n_hi, lo_level, hi_level, out);
          break;
        case 24:
          finish_cols<3>(p, l, n_lo, h, n_hi, lo_level, hi_level, out);
          break;
        default:
          finish_cols<4>(p, l, n_lo, h, n_hi, lo_level, hi_level, out);
          break;
      }
    }
  };
  const int64_t p5_bytes = (m.cols + 4) / 5;
  if (m.codec == Codec::kG4) {
    // Four rows per decode, each list region split in quarters (list_capacity is sized for it).
    const int64_t q = w.list_capacity / 4;
    int32_t* const lists[8] = {lo, lo + q, lo + 2 * q, lo + 3 * q,
                               hi, hi + q, hi + 2 * q, hi + 3 * q};
#if defined(QMOE_G4_VNNI)
    static const G4Consts cs;
#endif
    for (int64_t r = r0; r < r1; r += 4) {
      int64_t n[8];
#if defined(QMOE_G4_VNNI)
      g4_lists_avx512(m, cs, r / 4, lists, n);
#elif defined(__AVX2__)
      g4_lists_avx2(m, r / 4, lists, n);
#else
      g4_lists_scalar(m, r / 4, lists, n);
#endif
      for (int j = 0; j < 4 && r + j < r1; ++j)
        finish(r + j, lists[j], n[j], lists[4 + j], n[4 + j]);
    }
  } else if (m.codec == Codec::kV3) {
    const int64_t half = w.list_capacity / 2;
    int32_t* const lists[4] = {lo, hi, lo + half, hi + half};
    for (int64_t r = r0; r < r1; r += 2) {
      int64_t n[4];
      v3_lists(m.codes + m.row_offsets[r], m.codes + m.row_offsets[r + 1], m.v3_list, lists, n);
      finish(r, lists[0], n[0], lists[1], n[1]);
      if (r + 1 < r1) finish(r + 1, lists[2], n[2], lists[3], n[3]);
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t n_lo = 0, n_hi = 0;
      if (m.codec != Codec::kP5) {
        v1_lists(m.codes + m.row_offsets[r], m.codes + m.row_offsets[r + 1],
                 m.codec == Codec::kV1 ? tb.v1_list : m.v2_list, lo, hi, &n_lo, &n_hi);
      } else {
        p5_lists(m.packed + r * p5_bytes, p5_bytes, tb.p5_list, lo, hi, &n_lo, &n_hi);
      }
      finish(r, lo, n_lo, hi, n_hi);
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
#if defined(__AVX2__)
  if (w.m.codec == Codec::kP5 && w.num_passes == 1 && w.passes[0].bp == 1) {
    p5_rows(w, tb, r0, r1);
    return;
  }
#endif
  if (w.m.codec == Codec::kV1 && w.num_passes == 1 && w.passes[0].bp == 1) {
#if defined(__AVX512F__)
    rows_paired(PermKernel<V1Perm>{w, tb.v1_perm}, r0, r1);
#elif defined(__AVX2__)
    rows_paired(BlendKernel<V1Slots>{w, tb.v1_perm, tb.v1_slot_masks}, r0, r1);
#else
    rows_paired(SlotKernel<V1Slots>{w, tb.v1_perm, tb.v1_slot_masks}, r0, r1);
#endif
    return;
  }
  if (w.m.codec == Codec::kV2 && w.num_passes == 1 && w.passes[0].bp == 1) {
#if defined(__AVX512F__)
    if (w.m.v2_perm != nullptr) {
      rows_paired(PermKernel<V2Perm>{w, w.m.v2_perm}, r0, r1);
      return;
    }
#endif
#if defined(__AVX2__)
    rows_paired(BlendKernel<V2Slots>{w, w.m.v2_entries, tb.v1_slot_masks}, r0, r1);
#else
    rows_paired(SlotKernel<V2Slots>{w, w.m.v2_entries, tb.v1_slot_masks}, r0, r1);
#endif
    return;
  }
  if (w.m.codec == Codec::kG4 && w.num_passes == 1 && w.passes[0].bp == 1) {
    if (w.passes[0].xq != nullptr) {
#if defined(QMOE_G4_VNNI)
      g4_rows_int8(w, r0, r1);
      return;
#elif defined(__AVX2__)
      g4_rows_int8_avx2(w, r0, r1);
      return;
#endif
    }
    g4_rows_float(w, r0, r1);
    return;
  }
  if (w.m.codec == Codec::kV3 && w.num_passes == 1 && w.passes[0].bp == 1) {
#if defined(__AVX512F__)
    rows_paired(PairPermKernel{w, w.m.v3_entries}, r0 / 2, (r1 + 1) / 2);
#elif defined(__AVX2__)
    rows_paired(PairBlendKernel{w, w.m.v3_entries, tb.v1_slot_masks}, r0 / 2, (r1 + 1) / 2);
#else
    rows_paired(PairSlotKernel{w, w.m.v3_entries, tb.v1_slot_masks}, r0 / 2, (r1 + 1) / 2);
#endif
    return;
  }
  rows_lists(w, tb, r0, r1, scratch);
}

}  // namespace
}  // namespace qmoe::cpu::detail
