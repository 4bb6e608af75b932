// Dense fp32 baseline of bench_decoder_cpu: Y = W X with Eigen on the same (decoded) matrices.
// Built with -mavx2 -mfma (see decoder_cpu.cmake) so Eigen uses its AVX2/FMA kernels; the benchmark
// checks the CPU before calling it. Rows are split into one contiguous slice per OpenMP thread,
// each slice a GEMV (1 token) or GEMM (several) by Eigen on one thread, so "all threads" means the
// same thing for the baseline as for the compressed path.
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

namespace qmoe::bench {

// w: rows x cols row-major; x: n tokens of cols floats (token-major); y: n tokens of rows floats.
void dense_matmul(const float* w, int64_t rows, int64_t cols, const float* x, int64_t n, float* y,
                  int threads) {
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  Eigen::setNbThreads(1);
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (rows + nt - 1) / nt;
    const int64_t r0 = std::min<int64_t>(rows, id * per), r1 = std::min<int64_t>(rows, r0 + per);
    if (r1 > r0) {
      const Eigen::Map<const RowMajor> wm(w + r0 * cols, r1 - r0, cols);
      if (n == 1) {
        const Eigen::Map<const Eigen::VectorXf> xv(x, cols);
        Eigen::Map<Eigen::VectorXf> yv(y + r0, r1 - r0);
        yv.noalias() = wm * xv;
      } else {
        // Token t's input is column t of a cols x n column-major matrix; its output row is a
        // strided column of the n x rows result.
        const Eigen::Map<const ColMajor> xm(x, cols, n);
        Eigen::Map<ColMajor, 0, Eigen::OuterStride<>> ym(y + r0, r1 - r0, n,
                                                         Eigen::OuterStride<>(rows));
        ym.noalias() = wm * xm;
      }
    }
  }
}

}  // namespace qmoe::bench
