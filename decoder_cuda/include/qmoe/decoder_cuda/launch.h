// Raw-pointer launch functions of the qmoe CUDA decoder, for embedding in other inference engines.
// Host-only header: every pointer with a _dev suffix is device memory; sizes are in elements
// unless stated; cudaStream_t comes last. All functions only enqueue work on `stream` (no
// synchronisation, no allocation) and throw qmoe::CudaError naming the failing CUDA call, or
// qmoe::InvalidArgument for bad shapes. They are thread-safe for distinct streams. Launch
// configuration errors are reported by the launching call; faults while a kernel runs surface,
// as always in CUDA, at the caller's next synchronising call.
#pragma once

#include <cstdint>

#include "qmoe/core/dtype.h"

// Forward declarations of the CUDA handle types, so that this header needs no CUDA headers.
typedef struct CUstream_st* cudaStream_t;      // NOLINT(modernize-use-using)
typedef struct cublasContext* cublasHandle_t;  // NOLINT(modernize-use-using)

namespace qmoe::cuda {

// Device pointers of one dictionary-coded matrix, qmoe-v1 or qmoe-v2 (layout of CompressedView,
// format/matrix.h): codes_dev: row_offsets_dev[rows] uint16 codewords; row_offsets_dev: rows+1
// int32; levels_dev: 2*rows bf16 bit patterns (lo, hi); entries_dev: the 65536 entry words
// (qmoe-v2 layout, format/SPEC.md section 4.3.2) the codes index: the matrix's qmoe-v2 dictionary
// (v2_dictionary_dev()), or v1_entries_dev() for qmoe-v1. rows and cols < 2^31. The matrix must
// be valid (qmoe::validate): the kernels do not check the codes. Never a qmoe-v3 matrix: its rows
// are coded in pairs with entry words of another layout, which the kernels do not read (MatrixDev
// carries no codec, so this cannot be checked here; see codecs.h).
struct MatrixDev {
  const uint16_t* codes_dev = nullptr;
  const int32_t* row_offsets_dev = nullptr;
  const uint16_t* levels_dev = nullptr;
  const uint32_t* entries_dev = nullptr;
  int32_t rows = 0;
  int32_t cols = 0;
};

// Token batches the fused kernels are built for; a call with more tokens is split into chunks of
// the largest of these, each chunk decoding every codeword once.
inline constexpr int kMaxFusedTokens = 32;

// Activations: x/y element type (DType::kBF16, kF16 or kF32); accumulation is always fp32.
//
// y = W x (accumulate = false) or y += W x (accumulate = true) for n_tokens tokens:
// token t reads x_dev[t*ldx + c] (c < cols) and writes y_dev[t*ldy + r] (r < rows).
// Requires ldx >= cols, ldy >= rows, n_tokens >= 0. Reads each codeword once per chunk of up to
// kMaxFusedTokens tokens.
void launch_fused(const MatrixDev& m, DType act, const void* x_dev, int64_t ldx, void* y_dev,
                  int64_t ldy, int64_t n_tokens, bool accumulate, cudaStream_t stream);

// A grouped MoE launch: the same weight slot (e.g. wi) of many experts in one launch.
// experts_dev: num_experts MatrixDev (device memory; qmoe-v1 and qmoe-v2 experts may be mixed);
// all of them have `cols` columns and at most `max_rows` rows. Expert e processes the slots
// [expert_offsets_dev[e], expert_offsets_dev[e+1]) (num_experts+1 int32, non-decreasing, starting
// at 0). Slot s gathers its input row token_ids_dev[s] of x (x_dev + token_ids_dev[s]*ldx) and
// writes output row out_ids_dev[s] of y (out_ids_dev == nullptr: the same row as its input),
// multiplied by scales_dev[s] if scales_dev is not null (the router probability):
//   y[out] = scale * W_e x[token]   or, with accumulate, y[out] += scale * W_e x[token].
// Output rows must be distinct across slots unless accumulate is set and act is kF32, in which
// case additions are atomic (top-k > 1 routing into one output row). `total_slots` (host value)
// must be >= expert_offsets_dev[num_experts]; it sizes the grid.
struct GroupedArgs {
  const MatrixDev* experts_dev = nullptr;
  int32_t num_experts = 0;
  int32_t max_rows = 0;
  int32_t cols = 0;
  const int32_t* expert_offsets_dev = nullptr;
  const int32_t* token_ids_dev = nullptr;
  const int32_t* out_ids_dev = nullptr;
  const float* scales_dev = nullptr;
  int64_t total_slots = 0;
  const void* x_dev = nullptr;
  int64_t ldx = 0;
  void* y_dev = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  // Tokens decoded together per codeword: 1, 8 or 32 (0 = chosen from total_slots/num_experts).
  int tokens_per_pass = 0;
};
void launch_grouped(const GroupedArgs& g, DType act, cudaStream_t stream);

// Decodes rows [row_begin, row_end) of a qmoe-v1 or qmoe-v2 matrix to dense `out` (kBF16, kF16 or
// kF32): row r goes to out_dev + (r - row_begin)*ld_out, ld_out >= cols. Bit-exact with
// decode_ref().
void launch_decode_dense(const MatrixDev& m, int64_t row_begin, int64_t row_end, DType out,
                         void* out_dev, int64_t ld_out, cudaStream_t stream);

// Same for qmoe-p5: packed_dev holds rows * ceil(cols/5) bytes, levels_dev 2*rows bf16.
void launch_p5_decode_dense(const uint8_t* packed_dev, const uint16_t* levels_dev, int64_t rows,
                            int64_t cols, int64_t row_begin, int64_t row_end, DType out,
                            void* out_dev, int64_t ld_out, cudaStream_t stream);

// y (n_tokens x rows, ld ldy) = w (rows x cols, row-major, ld ldw) applied to x (n_tokens x cols,
// ld ldx), all of type `act`, fp32 accumulation (tensor cores for kBF16/kF16), beta = accumulate.
// The handle must be bound to `stream` by the caller or is bound here (cublasSetStream).
void gemm_dense(cublasHandle_t handle, DType act, const void* w_dev, int64_t ldw, int64_t rows,
                int64_t cols, const void* x_dev, int64_t ldx, void* y_dev, int64_t ldy,
                int64_t n_tokens, bool accumulate, cudaStream_t stream);

}  // namespace qmoe::cuda
