// CUDA instantiations and launch functions of the fused qmoe-v1 kernels (kernels/v1_fused.cuh).
#include "../kernels/dispatch.cuh"
#include "cuda_check.h"

namespace qmoe::cuda {
namespace {

struct FusedLauncher {
  cudaStream_t stream;
  template <class E, int NB>
  void fused(dim3 grid, const kern::FusedParams<typename E::S>& p) {
    kern::v1_fused_kernel<E, NB><<<grid, kern::kThreads<NB>, 0, stream>>>(p);
    QMOE_CUDA_CHECK_LAUNCH("v1_fused_kernel<<<>>>");
  }
  template <class E>
  void v1_dense(dim3, const kern::DenseParams<typename E::S>&) {}
  template <class E>
  void p5_dense(dim3, const uint8_t*, const uint16_t*, int32_t, int32_t, int32_t, typename E::S*,
                int64_t) {}
};

}  // namespace

void launch_v1_fused(const V1MatrixDev& m, const int32_t* table_dev, DType act, const void* x_dev,
                     int64_t ldx, void* y_dev, int64_t ldy, int64_t n_tokens, bool accumulate,
                     cudaStream_t stream) {
  FusedLauncher l{stream};
  kern::dispatch_v1_fused(l, m, table_dev, act, x_dev, ldx, y_dev, ldy, n_tokens, accumulate);
}

void launch_v1_grouped(const GroupedArgs& g, const int32_t* table_dev, DType act,
                       cudaStream_t stream) {
  FusedLauncher l{stream};
  kern::dispatch_v1_grouped(l, g, table_dev, act);
}

}  // namespace qmoe::cuda
