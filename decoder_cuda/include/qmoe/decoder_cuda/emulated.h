// The CUDA kernels of decoder_cuda run on the CPU through the emulation layer (emu/runtime.h):
// the same kernel source, launch configuration and argument checks as launch.h, with every
// pointer in host memory. For tests on machines without a GPU; slow (a fiber per GPU thread).
// Each call throws qmoe::emu::EmulationError (a std::runtime_error) on a synchronisation error
// in a kernel (divergent barrier, deadlock, mismatched warp collective) and InvalidArgument as
// the CUDA launch functions do.
#pragma once

#include "qmoe/decoder_cuda/launch.h"

namespace qmoe::cuda::emulated {

// Grid dimensions to force (0 = the launch functions' choice), to exercise grid-stride loops.
struct Grid {
  unsigned x = 0;
  unsigned z = 0;
};

// launch_v1_fused on host memory; tokens_per_pass 0 = automatic, else 1, 8 or 32.
void v1_fused(const V1MatrixDev& m, const int32_t* table, DType act, const void* x, int64_t ldx,
              void* y, int64_t ldy, int64_t n_tokens, bool accumulate, int tokens_per_pass = 0,
              Grid grid = {});
// launch_v1_grouped on host memory.
void v1_grouped(const GroupedArgs& g, const int32_t* table, DType act, Grid grid = {});
void v1_decode_dense(const V1MatrixDev& m, const int32_t* table, int64_t row_begin, int64_t row_end,
                     DType out, void* out_ptr, int64_t ld_out);
void p5_decode_dense(const uint8_t* packed, const uint16_t* levels, int64_t rows, int64_t cols,
                     int64_t row_begin, int64_t row_end, DType out, void* out_ptr, int64_t ld_out);

}  // namespace qmoe::cuda::emulated
