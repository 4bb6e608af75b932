// The avx512 level of the matrix product kernels (see gemm_kernels_impl.h).
#include "gemm_kernels_impl.h"

namespace qmoe::gptq_detail {
GemmKernel gemm_kernel_avx512() {
  return {kName, &gemm, kRows, kCols};
}
}  // namespace qmoe::gptq_detail
