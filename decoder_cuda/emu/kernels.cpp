// The decoder_cuda kernels compiled as host C++ under the CUDA emulation (emu/runtime.h).
#include "../kernels/dispatch.cuh"
#include "qmoe/decoder_cuda/emulated.h"
#include "qmoe/format/reference.h"

namespace qmoe::cuda::emulated {
namespace {

struct EmuLauncher {
  template <class E, int NB>
  void fused(dim3 grid, const kern::FusedParams<typename E::S>& p) {
    emu::launch(grid, dim3(kern::kThreads<NB>), [&] { kern::fused_kernel<E, NB>(p); });
  }
  template <class E>
  void dense(dim3 grid, const kern::DenseParams<typename E::S>& p) {
    emu::launch(grid, dim3(32 * kern::kDenseWarps), [&] { kern::decode_dense_kernel<E>(p); });
  }
  template <class E>
  void p5_dense(dim3 grid, const uint8_t* packed, const uint16_t* levels, int32_t cols,
                int32_t row_begin, int32_t row_end, typename E::S* out, int64_t ld) {
    emu::launch(grid, dim3(256), [&] {
      kern::p5_decode_dense_kernel<E>(packed, levels, cols, row_begin, row_end, out, ld);
    });
  }
};

}  // namespace

MatrixDev host_matrix(const CompressedView& m) {
  require_gpu_codec(m, "emulated::host_matrix");
  if (!m.has_codes())
    throw InvalidArgument("emulated::host_matrix: a qmoe-p5 matrix has no codes (p5_decode_dense)");
  if (m.rows > INT32_MAX || m.cols > INT32_MAX)
    throw InvalidArgument("emulated::host_matrix: rows and cols must be < 2^31");
  validate_layout(m, "emulated::host_matrix");
  return MatrixDev{m.codes.data(),
                   m.row_offsets.data(),
                   m.levels.data(),
                   m.codec == Codec::kV1 ? v1_entry_words() : m.dictionary.data(),
                   static_cast<int32_t>(m.rows),
                   static_cast<int32_t>(m.cols)};
}

void fused(const MatrixDev& m, DType act, const void* x, int64_t ldx, void* y, int64_t ldy,
           int64_t n_tokens, bool accumulate, int tokens_per_pass, Grid grid) {
  EmuLauncher l;
  kern::dispatch_single_fused(l, m, act, x, ldx, y, ldy, n_tokens, accumulate, tokens_per_pass,
                              kern::GridOverride{grid.x, grid.z});
}

void grouped(const GroupedArgs& g, DType act, Grid grid) {
  EmuLauncher l;
  kern::dispatch_grouped(l, g, act, kern::GridOverride{grid.x, grid.z});
}

void decode_dense(const MatrixDev& m, int64_t row_begin, int64_t row_end, DType out, void* out_ptr,
                  int64_t ld_out) {
  EmuLauncher l;
  kern::dispatch_dense(l, m, row_begin, row_end, out, out_ptr, ld_out);
}

void p5_decode_dense(const uint8_t* packed, const uint16_t* levels, int64_t rows, int64_t cols,
                     int64_t row_begin, int64_t row_end, DType out, void* out_ptr, int64_t ld_out) {
  EmuLauncher l;
  kern::dispatch_p5_dense(l, packed, levels, rows, cols, row_begin, row_end, out, out_ptr, ld_out);
}

}  // namespace qmoe::cuda::emulated
