// gemm()'s task function at the portable level (see gemm_kernels_impl.h).
#include "gemm_kernels_impl.h"

namespace qmoe::core_detail {
GemmKernel gemm_kernel_portable() {
  return {kName, &task};
}
}  // namespace qmoe::core_detail
