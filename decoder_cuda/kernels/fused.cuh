// Fused decode x activations for the dictionary codecs (qmoe-v1 and qmoe-v2): y = W x for 1..NB
// tokens per pass, any shape, one matrix or one weight slot of many experts (grouped MoE launch;
// experts may mix the two codecs and any qmoe-v2 dictionaries). Each codeword is decoded once per
// pass and applied to all of the pass's tokens.
//
// Work split: a block of kWarps<NB> warps owns as many consecutive rows (a warp per row) of one
// expert and one pass of up to NB tokens. For NB = 8 and 32 the tokens' activations are staged in
// shared memory as fp32 [column][token], one window of kWindowCols<NB> columns at a time (32 KiB,
// static, so every architecture from sm_75 runs it without an opt-in); a warp walks its row's
// code stream through the windows in column order, carrying a decoded chunk across window
// boundaries, so arbitrary widths need no more shared memory. A single token (NB = 1) reads its
// activations straight from global memory (L1) instead: no staging, no barriers. Only non-zero
// symbols do arithmetic (~11.5% of weights at QMoE's sparsity): each costs one read of NB
// activations and NB FMAs.
#pragma once

#include "code_stream.cuh"

namespace qmoe::cuda::kern {

// Warps (= rows) per block. Staging costs NB elements per column per block, so for 8 and 32
// tokens 16 rows share each staged window (half the staging work per weight); the register file
// then holds one such block per SM (<= 128 registers per thread), the same 16 warps per SM as two
// 8-warp blocks. One token asks for four 8-warp blocks per SM (<= 64 registers per thread; it
// needs 60-64 without spills): 32 warps in flight hide the latency of the table lookups.
template <int NB>
inline constexpr int kWarps = NB >= 8 ? 16 : 8;
template <int NB>
inline constexpr int kThreads = 32 * kWarps<NB>;
template <int NB>
inline constexpr int kMinBlocksPerSm = NB >= 8 ? 1 : 4;
inline constexpr int kSmemFloats = 8192;  // 32 KiB of staged activations
template <int NB>
inline constexpr int kWindowCols = kSmemFloats / NB;

template <class S>
struct FusedParams {
  MatrixDev single;          // used when experts == nullptr
  const MatrixDev* experts;  // grouped: one per blockIdx.y
  const S* x;
  int64_t ldx;
  S* y;
  int64_t ldy;
  const int32_t* expert_offsets;  // num_experts+1 slot offsets; nullptr: slots [0, num_tokens)
  const int32_t* token_ids;       // input row per slot; nullptr: the slot index
  const int32_t* out_ids;         // output row per slot; nullptr: the input row
  const float* scales;            // per slot; nullptr: 1
  int32_t num_tokens;
  int32_t accumulate;
  int32_t atomic;  // F32 accumulate into shared output rows
};

// Shared-memory layout of the staged activations: column c's NB tokens are contiguous (one
// LDS.128 per 4 tokens), with their 4-token groups XOR-swizzled by the column so that the staging
// stores of 8 consecutive columns x 4 tokens hit 32 different banks.
template <int NB>
QMOE_DEV int xs_index(int c, int b) {
  if constexpr (NB < 4) {
    return c * NB + b;
  } else {
    return c * NB + 4 * ((b >> 2) ^ (c & (NB / 4 - 1))) + (b & 3);
  }
}

// acc[b] += v * x[c][b] for the NB staged tokens of window column c.
template <int NB>
QMOE_DEV void fma_tokens(float v, const float* xs, int c, float (&acc)[NB]) {
  if constexpr (NB % 4 == 0) {
    QMOE_UNROLL
    for (int b = 0; b < NB; b += 4) {
      const float4 q = load_float4(xs + xs_index<NB>(c, b));
      acc[b] = fmaf(v, q.x, acc[b]);
      acc[b + 1] = fmaf(v, q.y, acc[b + 1]);
      acc[b + 2] = fmaf(v, q.z, acc[b + 2]);
      acc[b + 3] = fmaf(v, q.w, acc[b + 3]);
    }
  } else {
    QMOE_UNROLL
    for (int b = 0; b < NB; ++b) acc[b] = fmaf(v, xs[xs_index<NB>(c, b)], acc[b]);
  }
}

// Sums acc[b] over the warp and leaves token (lane % NB)'s total in acc[0]: a reduce-scatter
// (NB-1 shuffles, each lane keeping the half its lane bit selects) then a butterfly over the lane
// bits above NB, instead of NB full butterflies (5*NB shuffles).
template <int S, int NB>
QMOE_DEV void reduce_scatter_step(float (&acc)[NB], int lane) {
  if constexpr (S >= 1) {
    const bool upper = (lane & S) != 0;
    QMOE_UNROLL
    for (int j = 0; j < S; ++j) {
      const float send = upper ? acc[j] : acc[j + S];
      const float keep = upper ? acc[j + S] : acc[j];
      acc[j] = keep + __shfl_xor_sync(kFullMask, send, S);  // the partner lane holds the other half
    }
    reduce_scatter_step<S / 2, NB>(acc, lane);  // compile-time S keeps acc[] in registers
  }
}

template <int NB>
QMOE_DEV void warp_reduce_scatter(float (&acc)[NB], int lane) {
  reduce_scatter_step<NB / 2, NB>(acc, lane);
  QMOE_UNROLL
  for (int m = NB; m < 32; m <<= 1) acc[0] += __shfl_xor_sync(kFullMask, acc[0], m);
}

// Where the activations of the non-zero weights come from.
// StagedX: the block's shared-memory window, NB tokens per column (NB = 8, 32).
template <int NB>
struct StagedX {
  const float* xs;
  QMOE_DEV void fma(float v, int c, float (&acc)[NB]) const { fma_tokens<NB>(v, xs, c, acc); }
};
// DirectX: one token straight from global memory. A 6144-column bf16 row is 12 KiB and stays in
// L1, so a single token needs no staging, no barriers and no shared-memory carve-out, which
// leaves the L1 to the dictionary's hot entries.
template <class E>
struct DirectX {
  const typename E::S* x;
  QMOE_DEV void fma(float v, int c, float (&acc)[1]) const {
    acc[0] = fmaf(v, E::load(ldg(x + c)), acc[0]);  // read-only path: L1-cached
  }
};

// Applies the non-zero symbols of one entry (first column `first`) that lie in the window
// [c0, c1).
template <int NB, class Src>
QMOE_DEV void apply_entry(uint32_t e, int32_t first, int32_t c0, int32_t c1, float lo, float hi,
                          const Src& src, float (&acc)[NB]) {
  auto slot = [&](int j) {
    const int sym = v2::slot_symbol(e, j);
    const int32_t col = first + v2::slot_col(e, j);
    if (sym != 0 && col >= c0 && col < c1) src.fma(sym == 1 ? lo : hi, col - c0, acc);
  };
  if constexpr (NB >= 32) {
    // One slot at a time: unrolled, the loads of three slots' 32 tokens would be live at once
    // and spill (sm_90).
    QMOE_NO_UNROLL
    for (int j = 0; j < v2::kSlots; ++j) slot(j);
  } else {
    QMOE_UNROLL
    for (int j = 0; j < v2::kSlots; ++j) slot(j);
  }
}

// Consumes the warp's row from its current chunk up to column c1 (window [c0, c1)), decoding
// further chunks as needed; a chunk reaching past c1 is kept for the next window.
template <int NB, class Src>
QMOE_DEV void consume_window(const uint16_t* codes_dev, const uint32_t* entries, int lane,
                             int32_t c0, int32_t c1, float lo, float hi, const Src& src, Chunk& ch,
                             uint32_t (&codes)[kCodesPerLane], int32_t& next, int32_t row_end,
                             float (&acc)[NB]) {
  for (;;) {
    QMOE_UNROLL
    for (int k = 0; k < kCodesPerLane; ++k) {
      const int32_t first = ch.first_col[k];
      if (first < c1 && first + v2::entry_width(ch.e[k]) > c0)
        apply_entry<NB>(ch.e[k], first, c0, c1, lo, hi, src, acc);
    }
    // Warp-uniform: the chunk reaches past this window, or the row has no more codes.
    if (ch.end_col > c1 || next >= row_end) break;
    decode_chunk(entries, codes, ch.end_col, lane, ch);
    next += kChunkCodes;
    load_codes(codes_dev, next, row_end, lane, codes);  // prefetch
  }
}

// Grid: x = row groups of kWarps<NB> rows (grid-stride), y = expert (1 without grouping),
//       z = passes of NB slots (grid-stride).  Block: kThreads<NB> (a warp per row).
template <class E, int NB>
__global__ void __launch_bounds__(kThreads<NB>, kMinBlocksPerSm<NB>)
    fused_kernel(const FusedParams<typename E::S> p) {
  using S = typename E::S;
  constexpr int WC = kWindowCols<NB>;
  alignas(16) __shared__ float xs[kSmemFloats];
  __shared__ int64_t in_row[NB];

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const MatrixDev m = p.experts != nullptr ? p.experts[blockIdx.y] : p.single;
  int32_t slot_begin = 0, slot_end = p.num_tokens;
  if (p.expert_offsets != nullptr) {
    slot_begin = p.expert_offsets[blockIdx.y];
    slot_end = p.expert_offsets[blockIdx.y + 1];
  }
  const int32_t n_slots = slot_end - slot_begin;
  const int32_t groups = (m.rows + kWarps<NB> - 1) / kWarps<NB>;
  // One token reads its activations from global memory in a single window over the whole row.
  constexpr bool kDirect = NB == 1;
  const int32_t wc = kDirect ? m.cols : WC;
  const int32_t windows = kDirect ? (m.cols > 0 ? 1 : 0) : (m.cols + WC - 1) / WC;
  // Every loop bound below is uniform over the block, so all threads meet every barrier.
  for (int32_t pass = blockIdx.z; pass * NB < n_slots; pass += gridDim.z) {
    const int32_t s0 = slot_begin + pass * NB;
    const int nb = n_slots - pass * NB < NB ? n_slots - pass * NB : NB;
    bool staged = false;
    const int64_t in0 = p.token_ids != nullptr ? p.token_ids[s0] : s0;  // the DirectX token
    for (int32_t g = blockIdx.x; g < groups; g += gridDim.x) {
      const int32_t row = g * kWarps<NB> + warp;
      const bool row_ok = row < m.rows;
      float acc[NB];
      QMOE_UNROLL
      for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
      float lo = 0.0f, hi = 0.0f;
      int32_t next = 0, row_end = 0;
      uint32_t codes[kCodesPerLane];
      Chunk ch{};
      if (row_ok) {
        lo = bf16_to_float(ldg(m.levels_dev + 2 * row));
        hi = bf16_to_float(ldg(m.levels_dev + 2 * row + 1));
        next = ldg(m.row_offsets_dev + row);
        row_end = ldg(m.row_offsets_dev + row + 1);
        load_codes(m.codes_dev, next, row_end, lane, codes);
        decode_chunk(m.entries_dev, codes, 0, lane, ch);
        next += kChunkCodes;
        load_codes(m.codes_dev, next, row_end, lane, codes);  // prefetch
      }
      for (int32_t win = 0; win < windows; ++win) {
        const int32_t c0 = win * wc;
        const int32_t c1 = c0 + wc < m.cols ? c0 + wc : m.cols;
        if constexpr (!kDirect) {
          if (windows > 1 || !staged) {
            __syncthreads();  // the previous window is no longer read
            if (threadIdx.x < static_cast<unsigned>(NB)) {
              const int b = static_cast<int>(threadIdx.x);
              const int32_t slot = s0 + (b < nb ? b : 0);
              in_row[b] = p.token_ids != nullptr ? p.token_ids[slot] : slot;
            }
            __syncthreads();
            // Thread i stages token b = 4*(i/32 / (WC/8)) + i%4 of column c = 8*(i/32 % (WC/8)) +
            // i/4%8: global reads of 8 consecutive columns per token (full 32-byte sectors for
            // fp32) and, with the swizzle, conflict-free shared stores.
            for (int i = static_cast<int>(threadIdx.x); i < WC * NB; i += kThreads<NB>) {
              int b, c;
              if constexpr (NB < 4) {
                b = i / WC;
                c = i - b * WC;
              } else {
                const int rest = i >> 5;
                b = 4 * (rest / (WC / 8)) + (i & 3);
                c = 8 * (rest % (WC / 8)) + ((i >> 2) & 7);
              }
              const int64_t col = static_cast<int64_t>(c0) + c;
              float v = 0.0f;
              if (b < nb && col < m.cols) v = E::load(ldg(p.x + in_row[b] * p.ldx + col));
              xs[xs_index<NB>(c, b)] = v;
            }
            __syncthreads();
            staged = true;
          }
        }
        if (!row_ok) continue;
        if constexpr (kDirect) {
          consume_window<NB>(m.codes_dev, m.entries_dev, lane, c0, c1, lo, hi,
                             DirectX<E>{p.x + in0 * p.ldx}, ch, codes, next, row_end, acc);
        } else {
          consume_window<NB>(m.codes_dev, m.entries_dev, lane, c0, c1, lo, hi, StagedX<NB>{xs}, ch,
                             codes, next, row_end, acc);
        }
      }
      if (!row_ok) continue;
      warp_reduce_scatter<NB>(acc, lane);
      if (lane < nb) {
        float v = acc[0];  // token `lane`'s sum
        const int32_t slot = s0 + lane;
        const int64_t in = p.token_ids != nullptr ? p.token_ids[slot] : slot;
        const int64_t out = p.out_ids != nullptr ? p.out_ids[slot] : in;
        if (p.scales != nullptr) v *= p.scales[slot];
        S* dst = p.y + out * p.ldy + row;
        bool done = false;
        if constexpr (sizeof(S) == 4) {
          if (p.atomic) {
            atomicAdd(dst, v);  // several slots may share an output row (top-k routing)
            done = true;
          }
        }
        if (!done) {
          if (p.accumulate) v += E::load(*dst);
          *dst = E::store(v);
        }
      }
    }
  }
}

}  // namespace qmoe::cuda::kern
