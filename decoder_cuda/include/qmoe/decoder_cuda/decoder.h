// Host API of the qmoe CUDA decoder: a compressed matrix living on a GPU, with a stream-aware
// forward that picks the fused decode x activation kernels for few tokens and decode-to-dense +
// cuBLAS for many. Host-only header (no CUDA headers); device pointers carry a _dev suffix and
// cudaStream_t comes last. Every CUDA or cuBLAS failure throws qmoe::CudaError naming the call;
// bad arguments throw qmoe::InvalidArgument.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "qmoe/decoder_cuda/codecs.h"
#include "qmoe/decoder_cuda/error.h"
#include "qmoe/decoder_cuda/launch.h"
#include "qmoe/format/matrix.h"

namespace qmoe::cuda {

// Entry-word tables (MatrixDev::entries_dev) on device `device` (-1: the current device), 256 KiB
// each, uploaded on first use and kept until the process exits; matrices with the same
// dictionary share one copy. Thread-safe.
//   v1_entries_dev: the qmoe-v1 dictionary (v1_entry_words()).
//   v2_dictionary_dev: a qmoe-v2 dictionary (CompressedView::dictionary, 65536 words; found again
//     by its XXH3-64 and contents, so each distinct dictionary is uploaded once per device).
const uint32_t* v1_entries_dev(int device = -1);
const uint32_t* v2_dictionary_dev(std::span<const uint32_t> entries, int device = -1);

// Number of CUDA devices; 0 (never an exception) when there is no driver or no device.
int device_count();

struct ForwardOptions {
  // Token count from which forward() decodes to dense and calls cuBLAS instead of running the
  // fused kernels (qmoe-v1 and qmoe-v2; qmoe-p5 always takes the dense path). The fused kernels do
  // ~0.115*n FMAs and shared-memory reads per weight for n tokens, the dense path ~4 bytes of
  // DRAM traffic per weight plus the GEMM; the two meet near n = 32 on A100/H100-class GPUs by
  // the estimate in decoder_cuda/README.md. Measure with bench_decoder_cuda and adjust.
  int64_t dense_min_tokens = 33;
  // Largest dense workspace (bytes) the dense path allocates; the matrix is decoded and
  // multiplied in tiles of rows that fit.
  int64_t dense_workspace_bytes = int64_t{64} << 20;
};

// A compressed matrix copied to one GPU (qmoe-v1, qmoe-v2 or qmoe-p5 as they are; a qmoe-v2
// dictionary goes to the device once and is shared, v2_dictionary_dev()). A matrix of the CPU's
// codecs, qmoe-v3 or qmoe-g4 (codecs.h), is converted to qmoe-v2 on the host first (transcode() of
// the encoder: the same weights; about as long as encoding it), so that a container written for the
// CPU runs on the GPU as it is; codec() then says qmoe-v2. Owns its device buffers, a dense
// workspace (allocated on the first dense-path call) and a cuBLAS handle (created on first use).
// Movable, not copyable. Calls on one object must not overlap (they share the workspace); use one
// object per concurrently used stream or serialise.
class DeviceMatrix {
 public:
  // Validates `m` (qmoe::validate, FormatError on a malformed matrix), converts a qmoe-v3 or
  // qmoe-g4 matrix to qmoe-v2, and copies it to the current device; synchronises `stream` before
  // returning so `m` may be freed afterwards.
  explicit DeviceMatrix(const CompressedView& m, ForwardOptions opt = {},
                        cudaStream_t stream = nullptr);
  ~DeviceMatrix();
  DeviceMatrix(DeviceMatrix&&) noexcept;
  DeviceMatrix& operator=(DeviceMatrix&&) noexcept;
  DeviceMatrix(const DeviceMatrix&) = delete;
  DeviceMatrix& operator=(const DeviceMatrix&) = delete;

  Codec codec() const;         // the codec on the device: qmoe-v2 for a converted qmoe-v3 / qmoe-g4
  Codec source_codec() const;  // the codec of the matrix given to the constructor
  int64_t rows() const;
  int64_t cols() const;
  int device() const;
  // Bytes of device memory holding the compressed matrix (codes, offsets, levels or packed; not
  // the shared entry-word table).
  int64_t device_bytes() const;
  // Device pointers of a qmoe-v1 or qmoe-v2 matrix for the raw launch functions (InvalidArgument
  // for qmoe-p5; a DeviceMatrix never holds qmoe-v3 or qmoe-g4, its constructor converts them).
  MatrixDev matrix_dev() const;
  const ForwardOptions& options() const;
  void set_options(const ForwardOptions& opt);

  // y = W x (accumulate = false) or y += W x for n_tokens tokens: x_dev is n_tokens x cols with
  // row stride ldx, y_dev n_tokens x rows with row stride ldy, both of type act (kBF16, kF16,
  // kF32); fp32 accumulation. Asynchronous on `stream`.
  void forward(DType act, const void* x_dev, int64_t ldx, void* y_dev, int64_t ldy,
               int64_t n_tokens, bool accumulate, cudaStream_t stream = nullptr);

  // Decodes rows [row_begin, row_end) to out_dev (type `out`, row stride ld_out >= cols),
  // bit-exact with decode_ref(). Asynchronous on `stream`.
  void decode_dense(DType out, void* out_dev, int64_t ld_out, int64_t row_begin, int64_t row_end,
                    cudaStream_t stream = nullptr) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qmoe::cuda
