// The scalar kernels: kernels_impl.h no -m flags (the compiler's baseline ISA).
// Only called after the dispatcher has checked that the CPU runs them.
#include "kernels_impl.h"

namespace qmoe::cpu::detail {

RowsFn rows_fn_scalar() {
  return &rows;
}

}  // namespace qmoe::cpu::detail
