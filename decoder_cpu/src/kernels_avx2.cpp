// The avx2 kernels: kernels_impl.h built with -mavx2 -mfma -mbmi -mbmi2.
// Only called after the dispatcher has checked that the CPU runs them.
#include "kernels_impl.h"

namespace qmoe::cpu::detail {

RowsFn rows_fn_avx2() {
  return &rows;
}

}  // namespace qmoe::cpu::detail
