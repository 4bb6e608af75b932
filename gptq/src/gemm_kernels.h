// Interface between the baseline-ISA code of qmoe_gptq (hessian.cpp, gptq.cpp) and its matrix
// product kernels: gemm_kernels_avx2.cpp and gemm_kernels_avx512.cpp compile gemm_kernels_impl.h
// with their own -m flags, and gemm_dispatch.cpp picks one at run time. Only plain
// declarations live here: nothing with vague linkage (inline functions, templates) may be compiled
// with AVX flags, or the linker could hand an AVX-512 copy of it to code that runs on any CPU.
#pragma once

#include <cstdint>

namespace qmoe::gptq_detail {

// C = S, C += S or C -= S (mode 0, 1, -1) for the m x n product S = A B of float matrices given
// by strides: A(i, p) = a[i * a_rs + p * a_cs], B(p, j) = b[p * b_rs + j * b_cs],
// C(i, j) = c[i * c_rs + j * c_cs]. Every S(i, j) is one chain of fused multiply-adds in p order
// starting from 0, so the AVX2 and AVX-512 kernels give the same bits. scratch holds
// gemm_scratch_floats(kernel, m, n, k) floats.
struct Gemm {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const float* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  float* c = nullptr;
  int64_t c_rs = 0, c_cs = 0;
  int mode = 0;
  float* scratch = nullptr;
};

using GemmFn = void (*)(const Gemm& g);

struct GemmKernel {
  const char* name;  // "avx2", "avx512"
  GemmFn fn;
  int rows;  // register block: rows of A ...
  int cols;  // ... times columns of B
};

GemmKernel gemm_kernel_avx2();
GemmKernel gemm_kernel_avx512();

// ---- run-time choice (gemm_dispatch.cpp, baseline ISA) ----
// The kernel in use: the best this CPU runs, or the level the environment variable QMOE_CPU_SIMD
// names (read once); nullptr for the portable level (QMOE_CPU_SIMD=scalar, or a CPU without AVX2
// and FMA), where callers use Eigen. Throws InvalidArgument for an unknown level or one this CPU
// does not run.
const GemmKernel* active_gemm_kernel();
// The kernel of level "avx2" or "avx512" if this build and CPU run it, else nullptr.
const GemmKernel* find_gemm_kernel(const char* level);
// Scratch floats gemm needs for an m x n product over k.
int64_t gemm_scratch_floats(const GemmKernel& kernel, int64_t m, int64_t n, int64_t k);

}  // namespace qmoe::gptq_detail
