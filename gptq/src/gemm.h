// The float32 product entry point of qmoe_gptq's baseline-ISA code (hessian.cpp, gptq.cpp), over
// the run-time kernels of gemm_kernels.h. Not included by the kernel files themselves.
#pragma once

#include <cstdint>
#include <vector>

#include "gemm_kernels.h"

namespace qmoe::gptq_detail {

// C = S, C += S or C -= S (mode 0, 1, -1) for S = A B, with the operands given by pointer and
// strides as in Gemm, run by `kernel` (one of active_gemm_kernel(), find_gemm_kernel()). scratch
// grows when it is too small, so a caller inside a parallel region passes one that is already
// big enough (gemm_scratch_floats()).
void run_gemm(const GemmKernel& kernel, int mode, int64_t m, int64_t n, int64_t k, const float* a,
              int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs, int64_t b_cs, float* c,
              int64_t c_rs, int64_t c_cs, std::vector<float>& scratch);

}  // namespace qmoe::gptq_detail
