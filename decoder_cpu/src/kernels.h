// Interface between the dispatcher (matmul.cpp, built for the baseline ISA) and the kernel
// translation units, one per SIMD level, each built with its own -m flags. Only plain structs live
// here: no inline functions or templates, because a weak symbol compiled with AVX-512 flags could
// be picked by the linker for the baseline path (see kernels_impl.h).
#pragma once

#include <cstdint>

#include "qmoe/format/codec.h"

namespace qmoe::cpu::detail {

// Per-dictionary data derived once from the decode tables (tables.cpp).
struct Tables {
  // qmoe-v1, indexed by codeword, 8 bytes each:
  //   v1_list: bytes 0..2 = columns of the low-level symbols, byte 3 = n_low | (columns << 2),
  //            bytes 4..6 = columns of the high-level symbols, byte 7 = n_high. Unused column
  //            bytes are 0. Every dictionary entry has at most 3 non-zero symbols (checked when
  //            the tables are built), which is what makes this fit.
  const uint64_t* v1_list = nullptr;
  // 64 combinations of the v1_perm kind bits (bits 15..20 of a v1_perm word: bit j = slot j is
  // low, bit 3 + j = slot j is high) x 2 (low, high) x 4 int32 lane masks: lane j is all ones when
  // slot j has that kind; lane 3 is 0. A qmoe-v3 entry word's kind bits of each row (8..13,
  // 14..19) index it the same way.
  const int32_t* v1_slot_masks = nullptr;
  //   v1_perm, 32 bits, for the single-token kernels: the non-zero symbols as three slots in
  //            column order; bits 5j..5j+4 = column of slot j
  //            (0 when absent), bit 15 + j set when slot j is low, bit 18 + j when it is high,
  //            bits 27..31 = columns the codeword covers. (A qmoe-v2 entry word has the same
  //            fields with 6-bit columns: bits 6j.., kinds 18..23, width 26..31.)
  const uint32_t* v1_perm = nullptr;
  // qmoe-p5, indexed by byte (256 entries, 16 bytes each): bytes 0..4 = columns of the low-level
  // symbols, byte 5 = n_low, bytes 8..12 = columns of the high-level symbols, byte 13 = n_high.
  const uint8_t* p5_list = nullptr;
  // qmoe-p5, indexed by byte (256 entries, 16 int32 each), for the single-token kernels: lane i
  // (i < 5) is all ones when symbol i of the byte is low, lane 8 + i when it is high; the other
  // lanes and the entries of bytes > 242 are 0.
  const int32_t* p5_lanes = nullptr;
};

// The tables, built on first use from v1_decode_table(); thread-safe, valid forever. Throws Error
// if the dictionary breaks an assumption the layout above relies on.
const Tables& tables();

// Tables of a qmoe-v2 dictionary, built on first use per dictionary id and kept (a process holds a
// handful of dictionaries); thread-safe.
//   list: v1_list-shaped (see Tables).
//   perm: for the AVX-512 single-token kernel, when every entry's non-zero symbols lie within
//         v2::kSpan columns (the qmoe encoder's dictionaries), else null. 32 bits per codeword:
//         bits 0..4 / 5..9 = column of slot 1 / slot 2 relative to slot 0's, bits 10..15 =
//         slot 0's column (where the entry's 32-column input window starts), bits 16..18 = slot j
//         low, 19..21 = slot j high, bits 26..31 = width.
struct V2Tables {
  const uint64_t* list = nullptr;
  const uint32_t* perm = nullptr;
};
V2Tables v2_tables(const uint32_t* dictionary, uint64_t id);

// List records of a qmoe-v3 dictionary for the batch path, built on first use per dictionary id
// and kept, like v2_tables(): two v1_list-shaped records per codeword, row 0's then row 1's (the
// columns of the row's low and high symbols within the entry, the entry's width in both).
const uint64_t* v3_list_table(const uint32_t* dictionary, uint64_t id);

// The matrix, as raw pointers (no std::span in kernel code, see above).
struct Matrix {
  Codec codec = Codec::kV1;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint16_t* codes = nullptr;       // v1, v2
  const int32_t* row_offsets = nullptr;  // v1, v2: rows + 1
  const uint32_t* v2_entries = nullptr;  // v2: the dictionary's entry words (codec_layout.h)
  const uint64_t* v2_list = nullptr;     // v2: v2_tables().list of the dictionary
  const uint32_t* v2_perm = nullptr;     // v2: v2_tables().perm of the dictionary (may be null)
  const uint32_t* v3_entries = nullptr;  // v3: the dictionary's entry words, read as they are
  const uint64_t* v3_list = nullptr;     // v3: v3_list_table() of the dictionary
  const uint8_t* packed = nullptr;       // p5, rows * ceil(cols / 5)
  const uint16_t* levels = nullptr;      // 2 * rows bf16 bits
  // g4: the token and kind streams (their sizes in bytes: kernels never read past them) and the
  // group offsets, 2 * (groups + 1) int32 (CompressedView::group_offsets).
  const uint8_t* g4_tokens = nullptr;
  int64_t g4_token_bytes = 0;
  const uint8_t* g4_kinds = nullptr;
  int64_t g4_kind_bytes = 0;
  const int32_t* g4_offsets = nullptr;
};

// Up to 32 tokens that share a pass over the codes.
struct Pass {
  // Inputs, column-major: xt[c * bp + t] is token t's input at column c, for c < cols + kColPad;
  // tokens n..bp-1 and columns >= cols are 0. 64-byte aligned.
  const float* xt = nullptr;
  int bp = 1;                 // 1 (a single token, stored contiguously) or a multiple of 8 up to 32
  int n = 1;                  // real tokens, <= bp
  float* const* y = nullptr;  // n output rows: token t's result for row r goes to y[t][r]
  const float* scale = nullptr;  // n factors, or null
  // A single-token pass of a qmoe-g4 matrix at the AVX-512 level: the input quantized to int8
  // (xq[c] = round(x[c] * 127 / max|x|), zero for cols <= c < cols + kG4XqPad) and the factor back
  // (max|x| / 127). Null where the kernels use the float input (the lists path): other levels,
  // batches, inputs with a NaN or infinity, MatmulOptions::int8_activations = false.
  const int8_t* xq = nullptr;
  float xq_inv = 0.0f;
};

// Zero columns after the last one, so kernels may read a full codeword's span past the row end.
inline constexpr int64_t kColPad = 64;
// Zero int8 columns after the last one in Pass::xq: the qmoe-g4 kernel reads 256 columns from the
// column of a step's first token.
inline constexpr int64_t kG4XqPad = 256;

// Rows per call of a RowsFn at most (the OpenMP work item; results do not depend on it), passes
// per sweep over the codes, and tokens per pass.
inline constexpr int64_t kRowBlock = 64;
static_assert(kRowBlock % 2 == 0, "a qmoe-v3 pair never straddles two row blocks");
inline constexpr int kMaxPasses = 8;
inline constexpr int kPassTokens = 32;
// Floats of per-thread scratch a RowsFn uses after its two lists: the results of a row block,
// kept until the block is done so that each token's outputs are written as one contiguous run.
inline constexpr int64_t kStageFloats = kRowBlock * kMaxPasses * kPassTokens;

struct Work {
  Matrix m;
  const Pass* passes = nullptr;
  int num_passes = 0;
  bool accumulate = false;
  // Per-thread scratch: list_capacity int32 for each of two lists, then kStageFloats floats.
  int64_t list_capacity = 0;
};

// Computes rows [r0, r1) of every pass, r1 - r0 <= kRowBlock. scratch: 2 * work.list_capacity
// int32 followed by kStageFloats floats, 64-byte aligned. For qmoe-v3 (rows coded in pairs) r0 is
// even: callers start blocks at multiples of kRowBlock.
using RowsFn = void (*)(const Work& work, const Tables& tables, int64_t r0, int64_t r1,
                        int32_t* scratch);

RowsFn rows_fn_scalar();
RowsFn rows_fn_avx2();
RowsFn rows_fn_avx512();
// The avx512 kernels built with VBMI, VBMI2, VNNI and GFNI too, for qmoe-g4 (kernels_g4_vnni.cpp).
RowsFn rows_fn_g4_vnni();

}  // namespace qmoe::cpu::detail
