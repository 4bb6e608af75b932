// Interface between hessian.cpp (built for the baseline ISA) and the block-product kernels of the
// Hessian sums: hessian_kernels_avx2.cpp and hessian_kernels_avx512.cpp compile
// hessian_kernels_impl.h with their own -m flags; the portable level is an Eigen GEMM in
// hessian.cpp. Only plain declarations live here:
// nothing with vague linkage (inline functions, templates) may be compiled with AVX flags, or the
// linker could hand an AVX-512 copy of it to code that runs on any CPU.
#pragma once

#include <cstdint>

namespace qmoe::gptq_detail {

// prod[i * ldp + j] = sum over t < nb of xi[t * ld + i] * xj[t * ld + j], for i < ni, j < nj.
// In the AVX2 and AVX-512 kernels every entry is one chain of fused multiply-adds in token order,
// starting from 0, so the two give the same bits; the portable level (an Eigen GEMM, no FMA on
// baseline x86-64) rounds differently. scratch holds (round_up(ni, rows) + round_up(nj, cols)) * nb
// floats.
using BlockProductFn = void (*)(const float* xi, const float* xj, int64_t ld, int64_t nb,
                                int64_t ni, int64_t nj, float* prod, int64_t ldp, float* scratch);

struct BlockKernel {
  const char* name;  // "portable", "avx2", "avx512"
  BlockProductFn fn;
  int rows;  // register block: rows of xi ...
  int cols;  // ... times columns of xj
};

BlockKernel block_kernel_avx2();
BlockKernel block_kernel_avx512();

}  // namespace qmoe::gptq_detail
