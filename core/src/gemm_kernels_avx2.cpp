// gemm()'s task function at the avx2 level (see gemm_kernels_impl.h).
#include "gemm_kernels_impl.h"

namespace qmoe::core_detail {
GemmKernel gemm_kernel_avx2() {
  return {kName, &task};
}
}  // namespace qmoe::core_detail
