// Decoding compressed matrices (or a range of their rows) to dense activations-typed weights in
// device memory, for the cuBLAS path at large token counts. Output values equal decode_ref()
// exactly: every weight is the row's lo or hi bf16 level or zero, converted to the output type.
#pragma once

#include "code_stream.cuh"

namespace qmoe::cuda::kern {

inline constexpr int kDenseWarps = 8;

template <class S>
struct DenseParams {
  MatrixDev m;
  int32_t row_begin;
  int32_t row_end;
  S* out;
  int64_t ld;
};

// Grid: x = groups of kDenseWarps rows of [row_begin, row_end).  Block: 32*kDenseWarps, a warp
// per row (qmoe-v1 or qmoe-v2). Each lane writes the columns of its own entries: the warp covers
// a contiguous stretch of ~22 columns per lane per chunk, so stores of a chunk stay within a few
// cache lines per lane. A qmoe-v2 row's last entry may reach past the row's end (over zeros):
// those columns are not written.
template <class E>
__global__ void __launch_bounds__(32 * kDenseWarps)
    decode_dense_kernel(const DenseParams<typename E::S> p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int32_t row = p.row_begin + static_cast<int32_t>(blockIdx.x) * kDenseWarps +
                      (static_cast<int32_t>(threadIdx.x) >> 5);
  if (row >= p.row_end) return;  // no barriers in this kernel: whole warps leave together
  const typename E::S lo = E::store(bf16_to_float(ldg(p.m.levels_dev + 2 * row)));
  const typename E::S hi = E::store(bf16_to_float(ldg(p.m.levels_dev + 2 * row + 1)));
  const typename E::S zero = E::store(0.0f);
  typename E::S* out = p.out + static_cast<int64_t>(row - p.row_begin) * p.ld;
  const int32_t cols = p.m.cols;
  int32_t next = ldg(p.m.row_offsets_dev + row);
  const int32_t row_end = ldg(p.m.row_offsets_dev + row + 1);
  int32_t col_base = 0;
  uint32_t codes[kCodesPerLane];
  load_codes(p.m.codes_dev, next, row_end, lane, codes);
  Chunk ch;
  while (next < row_end) {
    decode_chunk(p.m.entries_dev, codes, col_base, lane, ch);
    next += kChunkCodes;
    load_codes(p.m.codes_dev, next, row_end, lane, codes);  // prefetch the next chunk
    col_base = ch.end_col;
    QMOE_UNROLL
    for (int k = 0; k < kCodesPerLane; ++k) {
      const uint32_t e = ch.e[k];
      const int32_t first = ch.first_col[k];
      const int32_t end = first + v2::entry_width(e) < cols ? first + v2::entry_width(e) : cols;
      for (int32_t c = first; c < end; ++c) out[c] = zero;
      QMOE_UNROLL
      for (int j = 0; j < v2::kSlots; ++j) {  // the same thread overwrites its own zeros
        const int sym = v2::slot_symbol(e, j);
        const int32_t c = first + v2::slot_col(e, j);
        if (sym != 0 && c < cols) out[c] = sym == 1 ? lo : hi;
      }
    }
  }
}

// Grid: x = grid-stride over the (row, packed byte) pairs of [row_begin, row_end).
// Block: 256, a thread per packed byte (5 weights).
template <class E>
__global__ void __launch_bounds__(256)
    p5_decode_dense_kernel(const uint8_t* packed, const uint16_t* levels, int32_t cols,
                           int32_t row_begin, int32_t row_end, typename E::S* out, int64_t ld) {
  const int64_t nbytes = p5::row_bytes(cols);
  const int64_t total = static_cast<int64_t>(row_end - row_begin) * nbytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_begin + i / nbytes;
    const int64_t b = i % nbytes;
    const float lo = bf16_to_float(ldg(levels + 2 * r));
    const float hi = bf16_to_float(ldg(levels + 2 * r + 1));
    int v = ldg(packed + r * nbytes + b);
    typename E::S* o = out + (r - row_begin) * ld + 5 * b;
    QMOE_UNROLL
    for (int s = 0; s < p5::kSymbolsPerByte; ++s, v /= 3) {
      if (5 * b + s < cols) o[s] = E::store(symbol_value(v % 3, lo, hi));
    }
  }
}

}  // namespace qmoe::cuda::kern
