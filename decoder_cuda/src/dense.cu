// CUDA instantiations and launch functions of the decode-to-dense kernels
// (kernels/decode_dense.cuh).
#include "../kernels/dispatch.cuh"
#include "cuda_check.h"

namespace qmoe::cuda {
namespace {

struct DenseLauncher {
  cudaStream_t stream;
  template <class E, int NB>
  void fused(dim3, const kern::FusedParams<typename E::S>&) {}
  template <class E>
  void dense(dim3 grid, const kern::DenseParams<typename E::S>& p) {
    kern::decode_dense_kernel<E><<<grid, 32 * kern::kDenseWarps, 0, stream>>>(p);
    QMOE_CUDA_CHECK_LAUNCH("decode_dense_kernel<<<>>>");
  }
  template <class E>
  void p5_dense(dim3 grid, const uint8_t* packed, const uint16_t* levels, int32_t cols,
                int32_t row_begin, int32_t row_end, typename E::S* out, int64_t ld) {
    kern::p5_decode_dense_kernel<E>
        <<<grid, 256, 0, stream>>>(packed, levels, cols, row_begin, row_end, out, ld);
    QMOE_CUDA_CHECK_LAUNCH("p5_decode_dense_kernel<<<>>>");
  }
};

}  // namespace

void launch_decode_dense(const MatrixDev& m, int64_t row_begin, int64_t row_end, DType out,
                         void* out_dev, int64_t ld_out, cudaStream_t stream) {
  DenseLauncher l{stream};
  kern::dispatch_dense(l, m, row_begin, row_end, out, out_dev, ld_out);
}

void launch_p5_decode_dense(const uint8_t* packed_dev, const uint16_t* levels_dev, int64_t rows,
                            int64_t cols, int64_t row_begin, int64_t row_end, DType out,
                            void* out_dev, int64_t ld_out, cudaStream_t stream) {
  DenseLauncher l{stream};
  kern::dispatch_p5_dense(l, packed_dev, levels_dev, rows, cols, row_begin, row_end, out, out_dev,
                          ld_out);
}

}  // namespace qmoe::cuda
