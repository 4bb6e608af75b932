// Fused decode x matrix products on the CPU: y = W x, Y = W X and one MoE layer's experts at once,
// computed straight from the codes of a CompressedView (any codec: qmoe-v1, -v2, -v3, -g4, -p5)
// without materialising W. Multi-threaded with OpenMP over rows; SIMD kernels are picked at run
// time (AVX-512, AVX2 or portable scalar code), so the library runs on any x86-64 (and non-x86)
// CPU.
//
// Numerics: a row's result is lo * (sum of x over its low-level columns) + hi * (sum of x over its
// high-level columns), summed in fp32 in an order fixed by the row's data and the SIMD level. The
// result of a call is bit-identical for any number of threads; it differs between SIMD levels and
// between batch paths (1 token vs several) by fp32 rounding only, except for qmoe-g4 at one token
// with int8 inputs (MatmulOptions::int8_activations), which rounds the input to int8 first. Tests
// bound the normalised error against matvec_ref() (format/reference.h).
//
// Calls are thread-safe; scratch buffers (inputs transposed per pass, per-row symbol lists) are
// kept per thread between calls and grow when needed.
//
// Preconditions shared by every call: `w` has passed validate() (format/reference.h) — views from
// the container reader and the encoder have; a view that fails validation is undefined behaviour
// here (the kernels read the streams without re-checking them). Sizes that do not fit together
// raise InvalidArgument; nothing is written then.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "qmoe/format/matrix.h"

namespace qmoe::cpu {

// ---- SIMD dispatch ------------------------------------------------------------------------------
enum class SimdLevel : uint8_t {
  kScalar = 0,  // portable C++ (the compiler's baseline ISA)
  kAvx2 = 1,    // AVX2 + FMA + BMI2
  kAvx512 = 2,  // AVX-512 F/BW/VL/DQ
};

// "scalar", "avx2", "avx512".
std::string_view simd_level_name(SimdLevel l);
std::optional<SimdLevel> simd_level_from_name(std::string_view s);

// Whether the kernels of level `l` were compiled into this library and the CPU (and OS) runs them.
bool simd_level_supported(SimdLevel l);
// The supported levels, lowest first (scalar always).
std::vector<SimdLevel> supported_simd_levels();
// The highest supported level.
SimdLevel best_simd_level();
// The level calls use when their options name none: the value of the environment variable
// QMOE_CPU_SIMD (scalar | avx2 | avx512) read on first use, else best_simd_level(), unless
// set_simd_level() changed it. Throws InvalidArgument if QMOE_CPU_SIMD names an unknown or
// unsupported level. Thread-safe.
SimdLevel simd_level();
// Sets the process-wide default level, for decoder_cpu and for the GEMM of core (gptq's Hessians
// and GPTQ, switch's forward pass: qmoe/core/cpu_env.h, set_cpu_simd()). Throws InvalidArgument if
// it is not supported.
void set_simd_level(SimdLevel l);
// Whether this build and CPU run the qmoe-g4 kernels of the avx512 level that need AVX-512 VBMI,
// VBMI2, VNNI and GFNI (Ice Lake, Zen 4 and later): the int8 single-token kernel and the vector
// batch decode. Without them the avx512 level runs qmoe-g4 like the avx2 level does.
bool g4_vnni_supported();
// Whether qmoe-g4 single-token products at level `l` take int8 inputs when
// MatmulOptions::int8_activations is set: the avx2 and avx512 levels, where this build and CPU run
// them. Every level that does gives the same bits (exact integer sums, the same rounding).
bool g4_int8_supported(SimdLevel l);

// ---- products -----------------------------------------------------------------------------------
struct MatmulOptions {
  // OpenMP threads; 0 = the OpenMP default (omp_get_max_threads()). Results do not depend on it.
  int threads = 0;
  // false: y = W x;  true: y += W x.
  bool accumulate = false;
  // SIMD level for this call; nullopt = simd_level(). Throws InvalidArgument if unsupported.
  std::optional<SimdLevel> simd;
  // qmoe-g4 at one token on the avx2 and avx512 levels (g4_int8_supported()), rows of up to 2^24
  // columns: the input is rounded to int8 once per call, at the scale 127 / max|x|, and the kernel
  // sums integers (decoder_cpu/README.md); both levels give the same bits. Each output then
  // differs from the float result by at most half a quantization step per weight,
  // sum_c |W[r][c]| * max|x| / 254, plus float rounding. false keeps float inputs (2-3 times
  // slower). Inputs holding a NaN or an infinity always take the float path.
  bool int8_activations = true;
};

// Tokens are processed in passes of up to kMaxPassTokens; each row is decoded once for up to 8
// passes (256 tokens) and applied to all of them, so larger batches decode the matrix again only
// every 256 tokens.
inline constexpr int64_t kMaxPassTokens = 32;

// y = W x (or y += W x). x: w.cols floats; y: w.rows floats; they must not overlap.
void matvec(const CompressedView& w, const float* x, float* y, const MatmulOptions& opt = {});

// Y = X W^T for n tokens, i.e. token t's output row is W times its input row (token-major, the
// layout of activations in a forward pass): X is n x w.cols with row stride ldx >= w.cols, Y is
// n x w.rows with row stride ldy >= w.rows (strides in floats). Each code is decoded once per pass
// of up to kMaxPassTokens tokens and applied to all of them. n = 0 does nothing; n = 1 is matvec().
void matmul(const CompressedView& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy,
            const MatmulOptions& opt = {});

// One expert of a grouped call: the tokens routed to it and where its outputs go.
struct ExpertBatch {
  CompressedView weight;              // rows x cols
  std::span<const int32_t> in_rows;   // n rows of X to read (gather)
  std::span<const int32_t> out_rows;  // n rows of Y to write (scatter); empty = in_rows
  std::span<const float> scale;       // empty, or n factors applied to the outputs (router probs)
};

// One MoE layer's active experts, the CPU twin of a grouped GPU launch. For every item e and every
// i < n_e:  Y[out_rows[i], 0:rows_e]  =  scale[i] * W_e X[in_rows[i], 0:cols_e]   (or += with
// opt.accumulate, e.g. the down projection summing top-k experts into each token's output).
// X has x_rows rows of stride ldx (>= every cols_e), Y has y_rows rows of stride ldy (>= every
// rows_e). Items are applied in order, so accumulation order and results are fixed; with
// accumulate = false, a Y row named by several items keeps the last one. Items with n = 0 cost
// nothing. Throws InvalidArgument for out-of-range rows, mismatched span sizes or strides (checked
// before anything is written). The whole call is one OpenMP region: all inputs are gathered
// first, then each thread runs every item over its own share of the output rows, in item order;
// results are bit-identical to running the items one at a time, for any thread count.
void grouped_matmul(std::span<const ExpertBatch> items, const float* x, int64_t x_rows, int64_t ldx,
                    float* y, int64_t y_rows, int64_t ldy, const MatmulOptions& opt = {});

}  // namespace qmoe::cpu
