// The qmoe-g4 kernels for CPUs with AVX-512 VBMI, VBMI2, VNNI and GFNI: kernels_impl.h built with
// -mavx512vbmi -mavx512vbmi2 -mavx512vnni -mgfni on top of the avx512 flags. The dispatcher runs
// this copy for qmoe-g4 matrices only, and only after checking that the CPU runs it (matmul.cpp).
#include "kernels_impl.h"

namespace qmoe::cpu::detail {

RowsFn rows_fn_g4_vnni() {
  return &rows;
}

}  // namespace qmoe::cpu::detail
