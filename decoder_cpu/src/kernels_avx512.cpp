// The avx512 kernels: kernels_impl.h built with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq and the AVX2 flags.
// Only called after the dispatcher has checked that the CPU runs them.
#include "kernels_impl.h"

namespace qmoe::cpu::detail {

RowsFn rows_fn_avx512() {
  return &rows;
}

}  // namespace qmoe::cpu::detail
