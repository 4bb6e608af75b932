// Host side of the CUDA decoder: device dictionary cache, cuBLAS GEMM, DeviceMatrix.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "qmoe/decoder_cuda/decoder.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/reference.h"

namespace qmoe::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver/device" status
    return 0;
  }
  return n;
}

namespace {

// Entry-word tables on the devices, uploaded on first use and kept until the process exits
// (kernels may still be reading them). Keyed by device and XXH3-64 of the words; a table also
// keeps its host copy, and a lookup compares the words, so two tables with the same id are never
// confused.
struct DeviceTables {
  struct Table {
    std::vector<uint32_t> words;
    uint32_t* dev = nullptr;
  };
  std::mutex mu;
  std::map<std::pair<int, uint64_t>, std::vector<Table>> tables;

  // `id`: v2_dictionary_id(words), passed in by callers that already know it.
  const uint32_t* get(std::span<const uint32_t> words, uint64_t id, int device) {
    if (words.size() != static_cast<size_t>(v2::kEntries)) {
      throw InvalidArgument("entry-word table: " + std::to_string(words.size()) +
                            " words, expected 65536");
    }
    if (device < 0) QMOE_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(mu);
    std::vector<Table>& same_id = tables[{device, id}];
    for (const Table& t : same_id) {
      if (std::memcmp(t.words.data(), words.data(), v2::kTableBytes) == 0) return t.dev;
    }
    int current = 0;
    QMOE_CUDA_CHECK(cudaGetDevice(&current));
    QMOE_CUDA_CHECK(cudaSetDevice(device));
    uint32_t* p = nullptr;
    try {
      QMOE_CUDA_CHECK(cudaMalloc(&p, v2::kTableBytes));
      QMOE_CUDA_CHECK(cudaMemcpy(p, words.data(), v2::kTableBytes, cudaMemcpyHostToDevice));
    } catch (...) {
      if (p) (void)cudaFree(p);
      (void)cudaSetDevice(current);
      throw;
    }
    QMOE_CUDA_CHECK(cudaSetDevice(current));
    same_id.push_back({std::vector<uint32_t>(words.begin(), words.end()), p});
    return p;
  }
};

DeviceTables& device_tables() {
  static DeviceTables t;
  return t;
}

}  // namespace

const uint32_t* v1_entries_dev(int device) {
  static const std::span<const uint32_t> words(v1_entry_words(), v1::kEntries);
  static const uint64_t id = v2_dictionary_id(words);
  return device_tables().get(words, id, device);
}

const uint32_t* v2_dictionary_dev(std::span<const uint32_t> entries, int device) {
  const uint64_t id =
      entries.size() == static_cast<size_t>(v2::kEntries) ? v2_dictionary_id(entries) : 0;
  return device_tables().get(entries, id, device);
}

void gemm_dense(cublasHandle_t handle, DType act, const void* w_dev, int64_t ldw, int64_t rows,
                int64_t cols, const void* x_dev, int64_t ldx, void* y_dev, int64_t ldy,
                int64_t n_tokens, bool accumulate, cudaStream_t stream) {
  if (act != DType::kBF16 && act != DType::kF16 && act != DType::kF32) {
    throw InvalidArgument("gemm_dense: activation type must be BF16, F16 or F32");
  }
  if (rows < 0 || cols < 0 || n_tokens < 0 || ldw < cols || (n_tokens > 1 && ldx < cols) ||
      (n_tokens > 1 && ldy < rows)) {
    throw InvalidArgument("gemm_dense: bad shape or leading dimension");
  }
  if (rows == 0 || n_tokens == 0) return;
  const int64_t lim = INT32_MAX;
  if (rows > lim || cols > lim || n_tokens > lim || ldw > lim || ldx > lim || ldy > lim) {
    throw InvalidArgument("gemm_dense: dimension exceeds cuBLAS's int range");
  }
  const cudaDataType_t t =
      act == DType::kBF16 ? CUDA_R_16BF : (act == DType::kF16 ? CUDA_R_16F : CUDA_R_32F);
  // Y^T (rows x n, column-major, ld ldy) = W (row-major rows x cols = column-major W^T) ^T * X^T.
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  QMOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  QMOE_CUBLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows), static_cast<int>(n_tokens),
      static_cast<int>(cols), &alpha, w_dev, t, static_cast<int>(ldw), x_dev, t,
      static_cast<int>(std::max<int64_t>(ldx, cols)), &beta, y_dev, t,
      static_cast<int>(std::max<int64_t>(ldy, rows)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct DeviceMatrix::Impl {
  Codec codec = Codec::kV1;
  Codec source_codec = Codec::kV1;
  int64_t rows = 0;
  int64_t cols = 0;
  int device = 0;
  ForwardOptions opt;
  uint16_t* codes = nullptr;
  int32_t* offsets = nullptr;
  uint16_t* levels = nullptr;
  uint8_t* packed = nullptr;
  int64_t bytes = 0;
  const uint32_t* entries = nullptr;  // v1_entries_dev() or the qmoe-v2 dictionary (shared)
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  cublasHandle_t cublas = nullptr;

  ~Impl() {
    // Destructors must not throw; a failing free here means the context is already gone.
    if (codes) (void)cudaFree(codes);
    if (offsets) (void)cudaFree(offsets);
    if (levels) (void)cudaFree(levels);
    if (packed) (void)cudaFree(packed);
    if (workspace) (void)cudaFree(workspace);
    if (cublas) (void)cublasDestroy(cublas);
  }

  template <class T>
  T* upload(const T* src, size_t n, cudaStream_t stream) {
    if (n == 0) return nullptr;
    T* p = nullptr;
    QMOE_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
    bytes += static_cast<int64_t>(n * sizeof(T));
    QMOE_CUDA_CHECK(cudaMemcpyAsync(p, src, n * sizeof(T), cudaMemcpyHostToDevice, stream));
    return p;
  }

  MatrixDev matrix_dev() const {
    return MatrixDev{
        codes, offsets, levels, entries, static_cast<int32_t>(rows), static_cast<int32_t>(cols)};
  }

  void decode(DType out, void* out_dev, int64_t ld, int64_t r0, int64_t r1,
              cudaStream_t stream) const {
    if (codec != Codec::kP5) {
      launch_decode_dense(matrix_dev(), r0, r1, out, out_dev, ld, stream);
    } else {
      launch_p5_decode_dense(packed, levels, rows, cols, r0, r1, out, out_dev, ld, stream);
    }
  }

  void forward_dense(DType act, const void* x, int64_t ldx, void* y, int64_t ldy, int64_t n,
                     bool accumulate, cudaStream_t stream) {
    const int64_t elem = dtype_size(act);
    const int64_t row_bytes = std::max<int64_t>(1, cols) * elem;
    const int64_t tile_rows = std::clamp<int64_t>(opt.dense_workspace_bytes / row_bytes, 1, rows);
    const int64_t need = tile_rows * row_bytes;
    if (workspace_bytes < need) {
      if (workspace) QMOE_CUDA_CHECK(cudaFree(workspace));
      workspace = nullptr;
      workspace_bytes = 0;
      QMOE_CUDA_CHECK(cudaMalloc(&workspace, need));
      workspace_bytes = need;
    }
    if (!cublas) QMOE_CUBLAS_CHECK(cublasCreate(&cublas));
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const int64_t r1 = std::min(rows, r0 + tile_rows);
      decode(act, workspace, cols, r0, r1, stream);
      // Rows r0..r1 of y: column offset r0 within each token's output row.
      void* y_tile = static_cast<char*>(y) + r0 * elem;
      gemm_dense(cublas, act, workspace, std::max<int64_t>(cols, 1), r1 - r0, cols, x, ldx, y_tile,
                 std::max<int64_t>(ldy, rows), n, accumulate, stream);
    }
  }
};

DeviceMatrix::DeviceMatrix(const CompressedView& given, ForwardOptions opt, cudaStream_t stream)
    : impl_(std::make_unique<Impl>()) {
  validate(given, "DeviceMatrix");
  if (given.rows > INT32_MAX || given.cols > INT32_MAX)
    throw InvalidArgument("DeviceMatrix: rows and cols must be < 2^31");
  // The CPU's codecs go to the device as qmoe-v2 (codecs.h).
  CompressedMatrix converted;
  if (!gpu_supports(given.codec)) converted = transcode(given, {.codec = Codec::kV2});
  const CompressedView m = gpu_supports(given.codec) ? given : converted.view();
  Impl& d = *impl_;
  d.source_codec = given.codec;
  d.codec = m.codec;
  d.rows = m.rows;
  d.cols = m.cols;
  d.opt = opt;
  QMOE_CUDA_CHECK(cudaGetDevice(&d.device));
  d.levels = d.upload(m.levels.data(), m.levels.size(), stream);
  if (m.has_codes()) {
    d.codes = d.upload(m.codes.data(), m.codes.size(), stream);
    d.offsets = d.upload(m.row_offsets.data(), m.row_offsets.size(), stream);
    // validate() has checked that dictionary_id is the dictionary's hash: no need to hash again.
    d.entries = m.codec == Codec::kV1
                    ? v1_entries_dev(d.device)
                    : device_tables().get(m.dictionary, m.dictionary_id, d.device);
  } else {
    d.packed = d.upload(m.packed.data(), m.packed.size(), stream);
  }
  QMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
}

DeviceMatrix::~DeviceMatrix() = default;
DeviceMatrix::DeviceMatrix(DeviceMatrix&&) noexcept = default;
DeviceMatrix& DeviceMatrix::operator=(DeviceMatrix&&) noexcept = default;

Codec DeviceMatrix::codec() const {
  return impl_->codec;
}
Codec DeviceMatrix::source_codec() const {
  return impl_->source_codec;
}
int64_t DeviceMatrix::rows() const {
  return impl_->rows;
}
int64_t DeviceMatrix::cols() const {
  return impl_->cols;
}
int DeviceMatrix::device() const {
  return impl_->device;
}
int64_t DeviceMatrix::device_bytes() const {
  return impl_->bytes;
}
const ForwardOptions& DeviceMatrix::options() const {
  return impl_->opt;
}
void DeviceMatrix::set_options(const ForwardOptions& opt) {
  impl_->opt = opt;
}

MatrixDev DeviceMatrix::matrix_dev() const {
  if (impl_->codec == Codec::kP5) {
    throw InvalidArgument("DeviceMatrix::matrix_dev: a qmoe-p5 matrix has no codes");
  }
  return impl_->matrix_dev();
}

void DeviceMatrix::forward(DType act, const void* x_dev, int64_t ldx, void* y_dev, int64_t ldy,
                           int64_t n_tokens, bool accumulate, cudaStream_t stream) {
  Impl& d = *impl_;
  if (n_tokens < 0) throw InvalidArgument("DeviceMatrix::forward: negative n_tokens");
  if (n_tokens == 0 || d.rows == 0) return;
  if (d.codec != Codec::kP5 && n_tokens < d.opt.dense_min_tokens) {
    launch_fused(d.matrix_dev(), act, x_dev, ldx, y_dev, ldy, n_tokens, accumulate, stream);
  } else {
    d.forward_dense(act, x_dev, ldx, y_dev, ldy, n_tokens, accumulate, stream);
  }
}

void DeviceMatrix::decode_dense(DType out, void* out_dev, int64_t ld_out, int64_t row_begin,
                                int64_t row_end, cudaStream_t stream) const {
  impl_->decode(out, out_dev, ld_out, row_begin, row_end, stream);
}

}  // namespace qmoe::cuda
