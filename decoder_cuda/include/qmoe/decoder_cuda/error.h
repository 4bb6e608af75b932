// Errors of the CUDA decoder. Host-only, no CUDA headers.
#pragma once

#include "qmoe/format/error.h"

namespace qmoe {

// A CUDA runtime or cuBLAS call failed. The message names the call, the error and the source
// location, e.g. "cudaMalloc(&p, bytes) failed: out of memory (cudaErrorMemoryAllocation) at
// host.cpp:42". Launch failures name the kernel.
class CudaError : public Error {
 public:
  using Error::Error;
};

}  // namespace qmoe
