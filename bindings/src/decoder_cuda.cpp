// The CUDA kernels (qmoe/decoder_cuda): CompressedMatrix.to_cuda and CudaMatrix, a matrix copied
// to a GPU (qmoe::cuda::DeviceMatrix) and used from host numpy arrays (inputs are uploaded, outputs
// downloaded) or device pointers. Present in every build; without the CUDA kernels (no
// QMOE_PY_CUDA: no nvcc at build time) or without a device, to_cuda() raises RuntimeError.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "qmoe/format/error.h"

#ifdef QMOE_PY_CUDA
#include <cuda_runtime.h>

#include "qmoe/decoder_cuda/codecs.h"
#include "qmoe/decoder_cuda/decoder.h"
#include "qmoe/decoder_cuda/error.h"
#endif

// This file's unnamed namespace, outside qmoe::python: CompressedMatrix.to_cuda is bound before
// CudaMatrix is registered, so its signature names the C++ type, and that name, "(anonymous
// namespace)::PyCudaMatrix", is part of the module's docstrings.
namespace {

using qmoe::DType;
using qmoe::python::bad_arg;
using qmoe::python::Float32;
using qmoe::python::float_arg;
using qmoe::python::FloatArg;
using qmoe::python::parse_dtype_name;
using qmoe::python::PyCompressed;
using qmoe::python::to_numpy;

#ifdef QMOE_PY_CUDA
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw qmoe::CudaError(std::string(what) + " failed: " + cudaGetErrorString(e));
}

// Device memory freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    if (bytes > 0) cuda_check(cudaMalloc(&p_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};
#endif

struct PyCudaMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  qmoe::Codec codec = qmoe::Codec::kV1;
  int device = 0;
  mutable std::mutex mu;  // DeviceMatrix calls must not overlap (shared workspace)
#ifdef QMOE_PY_CUDA
  std::unique_ptr<qmoe::cuda::DeviceMatrix> dm;
#endif
};

std::unique_ptr<PyCudaMatrix> to_cuda(const PyCompressed& m, int device) {
#ifdef QMOE_PY_CUDA
  const int n = qmoe::cuda::device_count();
  if (n == 0) throw qmoe::Error("to_cuda: no CUDA device is available");
  if (device < 0 || device >= n) {
    bad_arg("to_cuda: device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
            " device(s))");
  }
  auto out = std::make_unique<PyCudaMatrix>();
  out->rows = m.view.rows;
  out->cols = m.view.cols;
  out->codec = m.view.codec;
  out->device = device;
  py::gil_scoped_release nogil;
  cuda_check(cudaSetDevice(device), "cudaSetDevice");
  out->dm = std::make_unique<qmoe::cuda::DeviceMatrix>(m.view);
  return out;
#else
  (void)m;
  (void)device;
  throw qmoe::Error(
      "to_cuda: this qmoe was built without the CUDA kernels (no nvcc when it was installed)");
#endif
}

// Y (n, rows) = X W^T on the GPU for X (n, cols) on the host; fp32 accumulation.
py::array_t<float> cuda_matmul(const PyCudaMatrix& m, const py::handle& x_obj, bool bf16,
                               bool vector) {
  FloatArg x = float_arg(x_obj, vector ? "x" : "X", vector ? 1 : 2, bf16);
  const int64_t n = vector ? 1 : x.dim(0);
  const int64_t cols = x.dim(vector ? 0 : 1);
  if (cols != m.cols) {
    bad_arg(std::string(vector ? "x" : "X") + ": expected " + std::to_string(m.cols) +
            " columns, got " + std::to_string(cols));
  }
  std::vector<float> y(static_cast<size_t>(n * m.rows));
#ifdef QMOE_PY_CUDA
  {
    py::gil_scoped_release nogil;
    Float32 xf(x.data(), x.dtype, n * cols);
    std::lock_guard lock(m.mu);
    cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
    DeviceBuffer xd(static_cast<size_t>(n * cols) * sizeof(float));
    DeviceBuffer yd(y.size() * sizeof(float));
    if (n > 0) {
      cuda_check(cudaMemcpy(xd.get(), xf.get(), static_cast<size_t>(n * cols) * sizeof(float),
                            cudaMemcpyHostToDevice),
                 "cudaMemcpy (input)");
      m.dm->forward(DType::kF32, xd.get(), cols, yd.get(), m.rows, n, false, nullptr);
      cuda_check(cudaMemcpy(y.data(), yd.get(), y.size() * sizeof(float), cudaMemcpyDeviceToHost),
                 "cudaMemcpy (output)");
    }
  }
#endif
  if (vector) return to_numpy(std::move(y), {static_cast<py::ssize_t>(m.rows)});
  return to_numpy(std::move(y), {static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(m.rows)});
}

// Y = X W^T with X and Y in device memory (e.g. CUDA tensors' data pointers), enqueued on
// `stream` (0: the legacy default stream); nothing is copied and nothing is synchronised.
void cuda_forward_device(const PyCudaMatrix& m, uintptr_t x_ptr, uintptr_t y_ptr, int64_t n,
                         const std::string& dtype, int64_t ldx, int64_t ldy, uintptr_t stream) {
  const DType act = parse_dtype_name(dtype);
  if (act != DType::kF32 && act != DType::kBF16 && act != DType::kF16)
    bad_arg("dtype: expected 'F32', 'BF16' or 'F16', got '" + dtype + "'");
  if (n < 0) bad_arg("n must be >= 0");
  if (ldx == 0) ldx = m.cols;
  if (ldy == 0) ldy = m.rows;
  if (ldx < m.cols || ldy < m.rows)
    bad_arg("ldx must be >= " + std::to_string(m.cols) + " and ldy >= " + std::to_string(m.rows));
  if (n > 0 && (x_ptr == 0 || y_ptr == 0)) bad_arg("x_ptr and y_ptr must not be null");
#ifdef QMOE_PY_CUDA
  if (n == 0) return;
  py::gil_scoped_release nogil;
  std::lock_guard lock(m.mu);
  cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
  m.dm->forward(act, reinterpret_cast<const void*>(x_ptr), ldx, reinterpret_cast<void*>(y_ptr), ldy,
                n, false, reinterpret_cast<cudaStream_t>(stream));
#else
  (void)x_ptr, (void)y_ptr, (void)stream;
  throw qmoe::Error("forward_device: this qmoe was built without the CUDA kernels");
#endif
}

py::array_t<float> cuda_decode(const PyCudaMatrix& m) {
  std::vector<float> out(static_cast<size_t>(m.rows * m.cols));
#ifdef QMOE_PY_CUDA
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(m.mu);
    cuda_check(cudaSetDevice(m.device), "cudaSetDevice");
    DeviceBuffer d(out.size() * sizeof(float));
    if (!out.empty()) {
      m.dm->decode_dense(DType::kF32, d.get(), m.cols, 0, m.rows, nullptr);
      cuda_check(
          cudaMemcpy(out.data(), d.get(), out.size() * sizeof(float), cudaMemcpyDeviceToHost),
          "cudaMemcpy");
    }
  }
#endif
  return to_numpy(std::move(out),
                  {static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
}

}  // namespace

namespace qmoe::python {

int cuda_device_count() {
#ifdef QMOE_PY_CUDA
  return qmoe::cuda::device_count();
#else
  return 0;
#endif
}

void bind_decoder_cuda(py::module_& m, py::class_<PyCompressed>& matrix) {
  // Before CudaMatrix is registered (see the unnamed namespace above).
  matrix.def("to_cuda", &to_cuda, py::arg("device") = 0, R"doc(
Copies the matrix to GPU `device` and returns a CudaMatrix. Raises RuntimeError when qmoe was
built without the CUDA kernels or no CUDA device is available (see cuda_device_count()),
ValueError for a device that does not exist or a qmoe-v3 matrix (CPU only: transcode() it to
qmoe-v2 first).
)doc");

  m.def("cuda_device_count", &cuda_device_count, R"doc(
Number of CUDA devices qmoe can use: 0 when it was built without the CUDA kernels (no nvcc when
it was installed), when there is no driver, or no device. Never raises.
)doc");
  m.attr("built_with_cuda") =
#ifdef QMOE_PY_CUDA
      true;
#else
      false;
#endif

  py::class_<PyCudaMatrix>(m, "CudaMatrix", R"doc(
A compressed matrix on a GPU (CompressedMatrix.to_cuda()), multiplied by the CUDA kernels: fused
decode x activations for few tokens, decode-to-dense + cuBLAS for many. Its methods take and
return host numpy arrays (inputs are uploaded, outputs downloaded); calls on one object are
serialised.
)doc")
      .def_property_readonly(
          "shape", [](const PyCudaMatrix& c) { return py::make_tuple(c.rows, c.cols); },
          "(rows, cols) of the matrix.")
      .def_property_readonly(
          "codec", [](const PyCudaMatrix& c) { return std::string(qmoe::codec_name(c.codec)); },
          "Codec name: 'qmoe-v1', 'qmoe-v2' or 'qmoe-p5'.")
      .def_property_readonly(
          "device", [](const PyCudaMatrix& c) { return c.device; }, "CUDA device index.")
      .def(
          "matvec",
          [](const PyCudaMatrix& c, const py::handle& x, bool bf16) {
            return cuda_matmul(c, x, bf16, true);
          },
          py::arg("x"), py::kw_only(), py::arg("bf16") = false, R"doc(
y = W x on the GPU. x: 1-D float32, float16 or bfloat16 of cols elements (host memory).
Returns float32 of rows elements. Raises ValueError for a wrong dtype, shape or layout,
RuntimeError for a CUDA failure.
)doc")
      .def(
          "matmul",
          [](const PyCudaMatrix& c, const py::handle& x, bool bf16) {
            return cuda_matmul(c, x, bf16, false);
          },
          py::arg("X"), py::kw_only(), py::arg("bf16") = false, R"doc(
Y = X W^T on the GPU for X of shape (n, cols) (host memory; float32, float16 or bfloat16).
Returns float32 of shape (n, rows). Errors as matvec().
)doc")
      .def("forward_device", &cuda_forward_device, py::arg("x_ptr"), py::arg("y_ptr"), py::arg("n"),
           py::kw_only(), py::arg("dtype") = "F32", py::arg("ldx") = 0, py::arg("ldy") = 0,
           py::arg("stream") = 0, R"doc(
Y = X W^T with X (n, cols) and Y (n, rows) already in this matrix's device memory, given as raw
device pointers (a CUDA tensor's data_ptr()), of type dtype ('F32', 'BF16' or 'F16'; fp32
accumulation), row strides ldx and ldy in elements (0: cols and rows). Enqueued on CUDA stream
`stream` (an integer handle, e.g. torch.cuda.current_stream().cuda_stream; 0 = the default
stream); nothing is copied or synchronised, so X and Y must stay alive until the stream reaches
the call. One matrix must not be used from two streams at once (its workspace is shared).
Raises ValueError for bad arguments, RuntimeError for a CUDA failure or a build without CUDA.
)doc")
      .def("decode", &cuda_decode, R"doc(
Decodes on the GPU to dense float32 (rows, cols), bit-exact with CompressedMatrix.decode().
)doc");
}

}  // namespace qmoe::python
