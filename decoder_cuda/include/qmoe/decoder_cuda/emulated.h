// The CUDA kernels of decoder_cuda run on the CPU through the emulation layer (emu/runtime.h):
// the same kernel source, launch configuration and argument checks as launch.h, with every
// pointer in host memory. For tests on machines without a GPU; slow (a fiber per GPU thread).
// Each call throws qmoe::emu::EmulationError (a std::runtime_error) on a synchronisation error
// in a kernel (divergent barrier, deadlock, mismatched warp collective) and InvalidArgument as
// the CUDA launch functions do.
#pragma once

#include "qmoe/decoder_cuda/codecs.h"
#include "qmoe/decoder_cuda/launch.h"
#include "qmoe/format/matrix.h"

namespace qmoe::cuda::emulated {

// The host pointers of a qmoe-v1 or qmoe-v2 matrix for the functions below: its codes, row
// offsets, levels and the entry words its codes index (v1_entry_words() or its dictionary); `m`'s
// memory must outlive the result's use. Checks sizes and offsets (validate_layout, FormatError)
// but not the codes (validate() does). InvalidArgument for qmoe-p5 (no codes: p5_decode_dense
// reads it) and for qmoe-v3 (CPU only, require_gpu_codec()), and for more than 2^31-1 rows or
// columns.
MatrixDev host_matrix(const CompressedView& m);

// Grid dimensions to force (0 = the launch functions' choice), to exercise grid-stride loops.
struct Grid {
  unsigned x = 0;
  unsigned z = 0;
};

// launch_fused on host memory (m.entries_dev: host entry words, e.g. v1_entry_words() or a
// CompressedView's qmoe-v2 dictionary); tokens_per_pass 0 = automatic, else 1, 8 or 32.
void fused(const MatrixDev& m, DType act, const void* x, int64_t ldx, void* y, int64_t ldy,
           int64_t n_tokens, bool accumulate, int tokens_per_pass = 0, Grid grid = {});
// launch_grouped on host memory.
void grouped(const GroupedArgs& g, DType act, Grid grid = {});
// launch_decode_dense on host memory.
void decode_dense(const MatrixDev& m, int64_t row_begin, int64_t row_end, DType out, void* out_ptr,
                  int64_t ld_out);
void p5_decode_dense(const uint8_t* packed, const uint16_t* levels, int64_t rows, int64_t cols,
                     int64_t row_begin, int64_t row_end, DType out, void* out_ptr, int64_t ld_out);

}  // namespace qmoe::cuda::emulated
