// Turning CUDA and cuBLAS status codes into qmoe::CudaError naming the call. Internal.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "qmoe/decoder_cuda/error.h"

namespace qmoe::cuda::detail {

inline std::string where(const char* file, int line) {
  std::string f = file;
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  // Clear a non-sticky error, so that a later launch check does not report it a second time.
  (void)cudaGetLastError();
  throw CudaError(std::string(call) + " failed: " + cudaGetErrorString(e) + " (" +
                  cudaGetErrorName(e) + ") at " + where(file, line));
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw CudaError(std::string(call) + " failed: " + cublasGetStatusString(s) + " (cuBLAS status " +
                  std::to_string(static_cast<int>(s)) + ") at " + where(file, line));
}

}  // namespace qmoe::cuda::detail

#define QMOE_CUDA_CHECK(call) ::qmoe::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)
#define QMOE_CUBLAS_CHECK(call) \
  ::qmoe::cuda::detail::check_cublas((call), #call, __FILE__, __LINE__)
// After a <<<>>> launch: configuration errors surface through cudaGetLastError.
#define QMOE_CUDA_CHECK_LAUNCH(name) \
  ::qmoe::cuda::detail::check_cuda(cudaGetLastError(), name, __FILE__, __LINE__)
