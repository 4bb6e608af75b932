// The avx512 level of the Hessian block products (see hessian_kernels_impl.h).
#include "hessian_kernels_impl.h"

namespace qmoe::gptq_detail {
BlockKernel block_kernel_avx512() {
  return {kName, &block_product, kRows, kCols};
}
}  // namespace qmoe::gptq_detail
