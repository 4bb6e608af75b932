// Dense float32 matrix products for every module of qmoe that multiplies dense matrices: the
// forward pass of switch/ (projections, attention, dense feed-forward layers, the experts of
// calibration), the Hessian sums and GPTQ of gptq/.
//
// Numerics, the contract every caller relies on: S = A B is computed so that every entry S(i, j)
// is ONE chain of fused multiply-adds over p = 0, 1, ..., k-1 in that order, starting from +0:
//   s = 0; for p in 0..k-1: s = fma(A(i, p), B(p, j), s)
// whatever the tiling, the thread count, the SIMD level (AVX-512, AVX2 or the portable code, which
// calls std::fma) and whatever other rows and columns are in the call. Consequences:
//   - results are bit-identical for any thread count and on every x86-64 CPU;
//   - row i of the result depends only on row i of A and on B: a batch of tokens multiplied
//     together or in any split (across calls, threads or processes) gives the same bits, which is
//     what lets calibration be split across machines and still write the same container.
// The fused multiply-adds round once per term; summation error grows with k like any sequential
// sum (about k * 2^-24 relative in the worst case, sqrt(k) * 2^-24 typically).
//
// Speed: register tiles of 12 x 32 (AVX-512) or 6 x 16 (AVX2) outputs held in registers while p
// runs, B packed in panels once per task, A read in place when its rows are contiguous. Measured
// against OpenBLAS in bench/core_bench.cpp.
#pragma once

#include <cstdint>
#include <string_view>

namespace qmoe {

enum class GemmMode : uint8_t {
  kSet,  // C = S
  kAdd,  // C += S  (C + S rounded once: S is formed first)
  kSub,  // C -= S
};

struct GemmOptions {
  GemmMode mode = GemmMode::kSet;
  bool relu = false;  // with kSet: C = max(S, 0)
  // 1: run in the calling thread; 0: the OpenMP default; n > 1: at most n threads. Inside an
  // OpenMP parallel region the call always runs in the calling thread. The bits never depend on it.
  int threads = 1;
};

// C = / += / -= S for S = A B, A m x k, B k x n, C m x n, operands given by pointer and strides in
// floats: A(i, p) = a[i * a_rs + p * a_cs], B(p, j) = b[p * b_rs + j * b_cs],
// C(i, j) = c[i * c_rs + j * c_cs]. C must not overlap A or B. m, n or k may be 0 (k = 0: S = 0).
// Throws InvalidArgument for negative sizes or null pointers with non-zero sizes.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
          const float* b, int64_t b_rs, int64_t b_cs, float* c, int64_t c_rs, int64_t c_cs,
          const GemmOptions& opt = {});

// Y = X W^T, the product of a linear layer: X [rows, in] row-major with row stride ldx, W [out, in]
// row-major (HF's layout, y = W x), Y [rows, out] with row stride ldy.
inline void matmul_xwt(int64_t rows, int64_t out, int64_t in, const float* x, int64_t ldx,
                       const float* w, float* y, int64_t ldy, const GemmOptions& opt = {}) {
  gemm(rows, out, in, x, ldx, 1, w, 1, in, y, ldy, 1, opt);
}

// The level gemm() runs: "avx512", "avx2" or "portable"; the best this CPU and build run, unless
// cpu_simd() (core/cpu_env.h: set_cpu_simd(), which decoder_cpu's set_simd_level() calls, or
// QMOE_CPU_SIMD) names a lower one ("scalar" means "portable"). Looked up at each call. Throws
// InvalidArgument when that level is one this CPU does not run.
std::string_view gemm_level();

namespace detail {
// gemm() at a given level ("portable", "avx2", "avx512"), for tests and benchmarks. Returns false,
// doing nothing, when this build or CPU lacks it.
bool gemm_at_level(std::string_view level, int64_t m, int64_t n, int64_t k, const float* a,
                   int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs, float* c,
                   int64_t c_rs, int64_t c_cs, const GemmOptions& opt);
}  // namespace detail

}  // namespace qmoe
