// CUDA instantiations and launch functions of the fused kernels (kernels/fused.cuh).
#include "../kernels/dispatch.cuh"
#include "cuda_check.h"

namespace qmoe::cuda {
namespace {

struct FusedLauncher {
  cudaStream_t stream;
  template <class E, int NB>
  void fused(dim3 grid, const kern::FusedParams<typename E::S>& p) {
    kern::fused_kernel<E, NB><<<grid, kern::kThreads<NB>, 0, stream>>>(p);
    QMOE_CUDA_CHECK_LAUNCH("fused_kernel<<<>>>");
  }
  template <class E>
  void dense(dim3, const kern::DenseParams<typename E::S>&) {}
  template <class E>
  void p5_dense(dim3, const uint8_t*, const uint16_t*, int32_t, int32_t, int32_t, typename E::S*,
                int64_t) {}
};

}  // namespace

void launch_fused(const MatrixDev& m, DType act, const void* x_dev, int64_t ldx, void* y_dev,
                  int64_t ldy, int64_t n_tokens, bool accumulate, cudaStream_t stream) {
  FusedLauncher l{stream};
  kern::dispatch_single_fused(l, m, act, x_dev, ldx, y_dev, ldy, n_tokens, accumulate);
}

void launch_grouped(const GroupedArgs& g, DType act, cudaStream_t stream) {
  FusedLauncher l{stream};
  kern::dispatch_grouped(l, g, act);
}

}  // namespace qmoe::cuda
