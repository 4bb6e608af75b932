// GPTQ (Frantar et al., arXiv 2210.17323) on the CPU with QMoE's ternary grid (arXiv 2310.16795):
// one matrix, a batch of experts under a memory cap, and one call from (W, H) to an encoded matrix.
//
// Conventions: W is rows x cols, row-major float32 (a linear layer y = W x, so cols = input
// features). H is cols x cols, float32, symmetric (only its upper triangle is read): the Hessian
// of the layer-wise objective, normally (2/n) X^T X over the n calibration inputs X (n x cols)
// routed to the expert (hessian.h). Rows are independent problems sharing H.
//
// Algorithm (QMoE's batch_gptq semantics):
//   1. Inputs with H_ii = 0 (never active) get H_ii = 1 and their weights are set to 0.
//   2. Dampening: H += lambda I with lambda = max(percdamp * mean(diag H), 1e-6).
//   3. act-order (optional): columns in order of descending diag H (ties: lower index first),
//      undone at the end.
//   4. Columns are quantized one after another; the error of each is fed back to the columns
//      not yet quantized through the upper Cholesky factor of H^-1, inside blocks of `blocksize`
//      columns, with one GEMM per block for the columns after it.
//   Per-row grids are fixed from the row before quantization. Ternary: lo = bf16(min(row, 0)),
//   hi = bf16(max(row, 0)), a zero row gets (-1, +1); a weight w becomes hi if w > hi/2, lo if
//   w < lo/2, else 0 -- exactly encoder/ternarize_rtn(), so the identity Hessian reproduces it.
//
// Numerics: the upper Cholesky factor U of H^-1 is never formed. With V = U^-1 (upper, V V^T = H,
// obtained as one Cholesky factorisation of H with rows and columns reversed), the GPTQ update
// w_j -= sum_{k<j} e_k U_kj with e_k = (w_k - q_k)/U_kk is, exactly in real arithmetic,
// w_j += sum_{k<j} (w0_k - q_k) V_kj / V_jj with w0 the weights before quantization. That costs
// one n^3/3 factorisation instead of the three (Cholesky, inverse, Cholesky) of the reference.
//
// Determinism: every result is bit-identical for any thread count (work is split into fixed row
// chunks and fixed Cholesky tiles; Eigen's own threading is disabled). In float32 the large
// products (block updates, Cholesky trailing updates) run on AVX2 / AVX-512 kernels picked at run
// time, which agree with each other bit for bit; CPUs without AVX2 + FMA (or QMOE_CPU_SIMD=scalar)
// use Eigen, whose rounding differs in the last bits.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/matrix.h"
#include "qmoe/gptq/hessian.h"

namespace qmoe {

enum class GptqGrid : uint8_t {
  kTernary,           // per-row (lo <= 0, 0, hi >= 0), QMoE's grid
  kTernarySymmetric,  // per-row (-m, 0, m), m = bf16(max|row|); (0, 0, m) for a row without
                      // negative weights (QMoE's sym=True)
  kUniform2,          // per-row asymmetric uniform grids with 2^b levels (comparison only)
  kUniform3,
  kUniform4,
};

// "ternary", "ternary-sym", "uniform2", "uniform3", "uniform4".
std::string_view gptq_grid_name(GptqGrid g);
bool gptq_grid_is_ternary(GptqGrid g);

struct GptqOptions {
  GptqGrid grid = GptqGrid::kTernary;
  double percdamp = 0.1;          // lambda = percdamp * mean(diag H); must be >= 0 and finite
  int64_t blocksize = 128;        // columns per lazy-update block; >= 1
  bool actorder = false;          // columns by descending diag H
  bool double_precision = false;  // float64 throughout (reference checks); float32 otherwise
  int threads = 0;                // OpenMP threads for one matrix (0 = the OpenMP default)
};

enum class GptqStatus : uint8_t {
  kOk,           // GPTQ ran with the given Hessian
  kFallbackRtn,  // no Hessian / no tokens, or a Hessian that stays singular after dampening:
                 // round-to-nearest (identity Hessian) was used; `reason` says why
  kFailed,       // only from gptq_quantize_batch(): the problem itself was invalid (`reason`)
};

struct GptqResult {
  GptqStatus status = GptqStatus::kOk;
  std::string reason;  // empty for kOk
  // Ternary grids: symbols and bf16 levels (rows x cols). Uniform grids: empty.
  TernaryMatrix ternary;
  // Uniform grids: dequantized weights, rows*cols floats, row-major. Ternary grids: empty (use
  // ternary.to_dense()).
  std::vector<float> dequantized;
  // GPTQ's layer loss 0.5 * tr((W - Q) Hd (W - Q)^T), Hd the dampened Hessian actually used
  // (for a fallback: Hd = (1 + percdamp) I). With H = (2/n) X^T X this is
  // ||(W - Q) X^T||^2 / n + lambda/2 ||W - Q||^2 (W with never-active inputs set to 0).
  double loss = 0.0;
  // loss - lambda/2 ||W - Q||^2, i.e. ||(W - Q) X^T||^2 / n for H = (2/n) X^T X.
  double output_loss = 0.0;
  double lambda = 0.0;      // dampening added to diag H
  int64_t dead_inputs = 0;  // inputs with H_ii = 0

  bool fallback() const { return status == GptqStatus::kFallbackRtn; }
};

// GPTQ of one matrix. w: rows*cols floats, row-major. h: cols*cols floats (symmetric) or nullptr
// for "no Hessian" (an expert that saw no tokens), which falls back to round-to-nearest, as do an
// all-zero Hessian, a Hessian with non-finite entries and one that is not positive definite after
// dampening (the result says so; these never throw). Throws InvalidArgument for negative shapes,
// null w with rows*cols > 0, non-finite weights or invalid options. Thread-safe (no shared state).
GptqResult gptq_quantize(const float* w, int64_t rows, int64_t cols, const float* h,
                         const GptqOptions& opt = {});

// The same with H = acc.hessian() (round-to-nearest when acc saw no tokens). acc.dim() must equal
// cols (else InvalidArgument).
GptqResult gptq_quantize(const float* w, int64_t rows, int64_t cols, const HessianAccumulator& acc,
                         const GptqOptions& opt = {});

// Round-to-nearest on the same grid (what the fallback does); loss as for the fallback.
GptqResult rtn_quantize(const float* w, int64_t rows, int64_t cols, const GptqOptions& opt = {});

// ---- many experts ---------------------------------------------------------------------------

// One matrix of a batch; the pointers must stay valid during the call.
struct GptqProblem {
  const float* w = nullptr;  // rows*cols, row-major
  int64_t rows = 0;
  int64_t cols = 0;
  const float* h = nullptr;  // cols*cols, or nullptr (no tokens: round-to-nearest)
};

struct GptqBatchOptions {
  int threads = 0;  // threads in all (0 = the OpenMP default)
  // Threads inside one matrix. 0 = automatic: 1 when there are at least as many problems as
  // threads (parallelism across experts), else threads / problems.
  int threads_per_matrix = 0;
  // Upper bound on the sum of gptq_workspace_bytes() of the matrices in flight (0 = none). A
  // matrix whose workspace alone exceeds it runs by itself. Inputs and results are not counted.
  int64_t memory_limit_bytes = 0;
};

// Floating-point operations gptq_quantize() executes for a rows x cols matrix with a Hessian: the
// Cholesky factorisation (cols^3 / 3 multiply-adds), the feedback inside blocks of `blocksize`
// columns and the lazy block products.
double gptq_flops(int64_t rows, int64_t cols, int64_t blocksize);

// Scratch memory gptq_quantize() needs for one matrix with `threads` threads (H factor, per-thread
// working rows), excluding the inputs and the result.
int64_t gptq_workspace_bytes(int64_t rows, int64_t cols, const GptqOptions& opt, int threads);

// GPTQ of many matrices, several at a time. Returns one result per problem, in order. Never
// throws for a bad problem: an invalid one gets status kFailed with the error message, a singular
// or empty Hessian falls back to round-to-nearest. `opt.threads` is ignored (see batch options).
// Results are bit-identical to gptq_quantize() of each problem alone, for any thread counts.
std::vector<GptqResult> gptq_quantize_batch(std::span<const GptqProblem> problems,
                                            const GptqOptions& opt = {},
                                            const GptqBatchOptions& batch = {});

// ---- (W, H) -> encoded matrix ---------------------------------------------------------------

struct CompressedExpert {
  CompressedMatrix matrix;
  GptqStatus status = GptqStatus::kOk;
  std::string reason;
  double loss = 0.0;
  double output_loss = 0.0;
  double zero_fraction = 0.0;
};

// GPTQ with a ternary grid (opt.grid must be kTernary or kTernarySymmetric, else InvalidArgument),
// then encode(). h may be nullptr (round-to-nearest). Errors as gptq_quantize() and encode().
CompressedExpert compress_matrix(const float* w, int64_t rows, int64_t cols, const float* h,
                                 const GptqOptions& opt = {}, const EncodeOptions& enc = {});
CompressedExpert compress_matrix(const float* w, int64_t rows, int64_t cols,
                                 const HessianAccumulator& acc, const GptqOptions& opt = {},
                                 const EncodeOptions& enc = {});

}  // namespace qmoe
