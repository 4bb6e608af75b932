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
//   These are the defaults (QMoE's recipe); TernaryOptions changes how ternary levels are chosen
//   and how weights are rounded to them, and compress_matrix() can aim at a size (RateControl):
//
// Ternary options (TernaryOptions; gptq/README.md "Beyond QMoE's recipe"):
//   - zero threshold t and zero penalty mu: column k of row r becomes hi if
//       w > max(t hi + mu S / (2 hi d_k), 0),  lo if  w < min(t lo + mu S / (2 lo d_k), 0),  else
//       0,
//     where d_k = V_kk^2 / mean_j V_jj^2 is the column's weight in GPTQ's loss relative to the
//     mean (1 without a Hessian) and S the mean square weight of the matrix. t = 1/2, mu = 0 is
//     rounding to the nearest level. mu > 0 is entropy-constrained rounding: each symbol minimises
//     d_k (w - q)^2 + (mu S) [q != 0], trading squared error for non-zero symbols (bits) where
//     they buy the least.
//   - initial levels: QMoE's (min, max), or fitted: Lloyd iterations of the rounding rule and
//     per-row least squares, weighted by diag H.
//   - refit: after the column sweep, each row's levels are replaced by the pair that minimises
//     GPTQ's loss (W - Q) Hd (W - Q)^T for the row's symbols (a 2x2 linear system, closed form;
//     bf16-rounded; kept only where it lowers the loss). With refit = k > 1, the sweep runs again
//     on the refitted grid and is refitted again, k rounds in all; the round of least loss is
//     returned. The Cholesky factor is computed once for all rounds.
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

// Initial per-row levels of a ternary grid.
enum class TernaryLevels : uint8_t {
  kMinMax,  // lo = bf16(min(row, 0)), hi = bf16(max(row, 0)) (QMoE; exactly ternarize_rtn())
  kFit,     // Lloyd: round with the rule, refit each level to the mean of its weights (weighted
            // by diag H), 8 times from (min, max)
};

// "minmax", "fit".
std::string_view ternary_levels_name(TernaryLevels l);

// How ternary levels are chosen and weights rounded to them (see the header comment). The
// defaults are QMoE's recipe and give exactly its bits. Ignored by the uniform grids, which
// require the defaults.
struct TernaryOptions {
  TernaryLevels levels = TernaryLevels::kMinMax;
  double zero_threshold = 0.5;  // t > 0, finite
  double zero_penalty = 0.0;    // mu, finite (negative: fewer zeros)
  int refit = 0;                // rounds of sweep + level refit, 0..64 (0: levels stay)

  bool is_default() const {
    return levels == TernaryLevels::kMinMax && zero_threshold == 0.5 && zero_penalty == 0.0 &&
           refit == 0;
  }
};

// The refit rounds of the default recipe, for every way in (`qmoe compress` and `qmoe eval
// --quantize` without --recipe, Python's compress_checkpoint() without refit): one for GPTQ at a
// target size (the lowest loss there in every run of tools/switch_accuracy/RESULTS.md), else none
// (QMoE's recipe: at QMoE's own size the refit buys nothing, and round to nearest is QMoE's rule).
constexpr int default_refit(bool gptq, double target_bits) {
  return gptq && target_bits > 0 ? 1 : 0;
}

struct GptqOptions {
  GptqGrid grid = GptqGrid::kTernary;
  double percdamp = 0.1;          // lambda = percdamp * mean(diag H); must be >= 0 and finite
  int64_t blocksize = 128;        // columns per lazy-update block; >= 1
  bool actorder = false;          // columns by descending diag H
  bool double_precision = false;  // float64 throughout (reference checks); float32 otherwise
  int threads = 0;                // OpenMP threads for one matrix (0 = the OpenMP default)
  TernaryOptions ternary;         // ternary grids only
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
  int rounds = 1;           // column sweeps run (refit: the rounds; the result is the best one)

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

// Which rounding parameter rate control moves (TernaryOptions).
enum class RateKnob : uint8_t {
  kThreshold,  // zero_threshold t (searched on a log scale; the penalty stays as given)
  kPenalty,    // zero_penalty mu (the threshold stays as given)
};

// "threshold", "penalty".
std::string_view rate_knob_name(RateKnob k);

// Where a target applies when many matrices are compressed together (rate_targets()).
enum class RateScope : uint8_t {
  kMatrix,  // every matrix at the target
  kAll,     // the mean over all matrices at the target: every matrix spends the same bits per
            // weight on codes (the target minus the mean overhead, plus its own overhead); the
            // Switch block loop raises the targets of later blocks by what matrices that cannot
            // reach theirs leave unspent
};

// "matrix", "all".
std::string_view rate_scope_name(RateScope s);
RateScope rate_scope_from_name(std::string_view s);

// A size to aim at: bits per weight of the encoded matrix, everything counted (codes, row
// offsets, levels: CompressedView::bits_per_weight()), with the codec of the EncodeOptions.
// Bits fall as zeros rise, and zeros rise with the threshold and the penalty: the knob is searched
// (bracketed, then bisected) until the encoded size is within `tolerance` of the target.
struct RateControl {
  double target_bits = 0;  // 0: off; else > 0
  RateKnob knob = RateKnob::kThreshold;
  double tolerance = 0.002;              // > 0
  int max_steps = 48;                    // encodings tried at most
  RateScope scope = RateScope::kMatrix;  // for many matrices (compress_matrix() ignores it)
  // A target above every size the knob reaches (the search ran to the knob's end, |log2 t| or |mu|
  // at its limit, and every size was below the target) gives the largest size found, marked
  // below_target, instead of an error. Sizes seen on both sides of the target still have to
  // meet the tolerance.
  bool accept_below = false;

  bool enabled() const { return target_bits > 0; }
};

// The target of each of many matrices of the given shapes (rows, cols) under rate.scope: all
// rate.target_bits (kMatrix), or target_bits - mean overhead + own overhead (kAll), the overhead
// being the row offsets and levels of a codeword codec, (rows + 1) * 32 + rows * 32 bits per
// matrix, per weight (the mean weighted by the matrices' sizes).
std::vector<double> rate_targets(std::span<const std::pair<int64_t, int64_t>> shapes,
                                 const RateControl& rate);

// "threshold", "penalty" -> RateKnob (InvalidArgument otherwise).
RateKnob rate_knob_from_name(std::string_view s);
// "minmax", "fit" -> TernaryLevels (InvalidArgument otherwise).
TernaryLevels ternary_levels_from_name(std::string_view s);

// Throws InvalidArgument for options gptq_quantize() / compress_matrix() would refuse (bad
// percdamp, blocksize, grid, ternary options, rate control), so that callers can check them
// before any work.
void gptq_validate_options(const GptqOptions& opt, const RateControl& rate = {});

// compress_matrix()'s result: the encoded matrix and how GPTQ went. (Not sw::CompressedExpert,
// switch/'s pair of compressed wi and wo.)
struct CompressResult {
  CompressedMatrix matrix;
  GptqStatus status = GptqStatus::kOk;
  std::string reason;
  double loss = 0.0;
  double output_loss = 0.0;
  double zero_fraction = 0.0;
  double bits_per_weight = 0.0;  // matrix.view().bits_per_weight()
  // The rounding parameters used (rate control: those found) and the encodings tried (1 without
  // rate control).
  double zero_threshold = 0.5;
  double zero_penalty = 0.0;
  int rate_steps = 1;
  // Rate control whose search ended between sizes on either side of the tolerance band: the
  // non-zero weights set to zero after it (the cheapest by d_c q^2; loss and output_loss are then
  // recomputed exactly). 0 otherwise.
  int64_t trimmed = 0;
  // Rate control with accept_below: no setting of the knob reached the target; this is the
  // largest size found.
  bool below_target = false;
};

// GPTQ with a ternary grid (opt.grid must be kTernary or kTernarySymmetric, else InvalidArgument),
// then encode(). h may be nullptr (round-to-nearest, with opt.ternary's rounding). With
// rate.enabled(), the knob is searched so that the encoded size is within rate.tolerance of
// rate.target_bits (the Hessian is factored once for all tries); InvalidArgument when the target
// cannot be reached (the message gives the range found). Errors as gptq_quantize() and encode().
CompressResult compress_matrix(const float* w, int64_t rows, int64_t cols, const float* h,
                               const GptqOptions& opt = {}, const EncodeOptions& enc = {},
                               const RateControl& rate = {});
CompressResult compress_matrix(const float* w, int64_t rows, int64_t cols,
                               const HessianAccumulator& acc, const GptqOptions& opt = {},
                               const EncodeOptions& enc = {}, const RateControl& rate = {});

}  // namespace qmoe
