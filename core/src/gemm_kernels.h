// Interface between gemm.cpp (baseline ISA: argument checks, level choice, threads) and the
// per-level task functions: gemm_kernels_avx2.cpp and gemm_kernels_avx512.cpp compile
// gemm_kernels_impl.h with their own -m flags, gemm_kernels_portable.cpp with none. Only plain
// declarations live here: nothing with vague linkage (inline functions, templates) may be compiled
// with AVX flags, or the linker could hand an AVX-512 copy of it to code that runs on any CPU.
#pragma once

#include <cstdint>

namespace qmoe::core_detail {

// The whole product, as gemm() (qmoe/core/gemm.h) takes it. mode: 0 set, 1 add, -1 subtract.
struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const float* b = nullptr;
  int64_t b_rs = 0, b_cs = 0;
  float* c = nullptr;
  int64_t c_rs = 0, c_cs = 0;
  int mode = 0;
  bool relu = false;
};

// Work is cut into tasks of at most kTaskRows x kTaskCols entries of C; p runs in blocks of at
// most kDepth. These sizes only schedule the work: the bits do not depend on them.
inline constexpr int64_t kTaskRows = 384;
inline constexpr int64_t kTaskCols = 128;
inline constexpr int64_t kDepth = 512;
// Rows of the zero-padded copy of a short last register tile (at least every level's tile rows).
inline constexpr int64_t kTailRows = 8;
// Scratch one task needs: B panels (kDepth x kTaskCols, padded to whole panels), the short last
// tile's rows (kTailRows x kDepth), partial sums (kTaskRows x kTaskCols, padded likewise).
inline constexpr int64_t kTaskScratchFloats =
    kDepth * (kTaskCols + 64) + kTailRows * kDepth + (kTaskRows + 8) * (kTaskCols + 64);

struct GemmKernel {
  const char* name;  // "avx512", "avx2", "portable"
  // Entries [i0, i1) x [j0, j1) of C (at most kTaskRows x kTaskCols), all of p. scratch holds
  // kTaskScratchFloats floats, 64-byte aligned.
  void (*task)(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* scratch);
};

GemmKernel gemm_kernel_avx2();
GemmKernel gemm_kernel_avx512();
GemmKernel gemm_kernel_portable();

}  // namespace qmoe::core_detail
