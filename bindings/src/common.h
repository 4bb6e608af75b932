// Shared by the sources of the Python module `qmoe._qmoe`: the numpy <-> C++ helpers (argument
// checks that raise ValueError, float16/bfloat16 widening, numpy arrays over C++ memory), the
// Python-side types that more than one source uses, and the bind_* function of each source, which
// module.cpp calls.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qmoe/core/dtype.h"
#include "qmoe/format/matrix.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"

namespace py = pybind11;

namespace qmoe::python {

// ---- numpy <-> C++ (common.cpp) ---------------------------------------------------------------

// Raises ValueError.
[[noreturn]] void bad_arg(const std::string& msg);

std::string dtype_str(const py::dtype& dt);

// Element size and kind through the Python attributes: pybind11 before 2.12 reads them from the
// descriptor struct with NumPy 1's layout, which NumPy 2 changed (Debian 12's pybind11 is 2.10).
py::ssize_t itemsize_of(const py::dtype& dt);
char kind_of(const py::dtype& dt);
size_t nbytes_of(const py::array& a);

bool is_ml_bfloat16(const py::dtype& dt);

// The element type of a float array: float32, float16, ml_dtypes.bfloat16, or uint16 holding
// bfloat16 bit patterns when `bf16` is set. ValueError for anything else.
DType float_dtype(const py::array& a, const char* what, bool bf16);

// Converts anything numpy accepts (arrays, tensors with __array__, lists) to an array.
py::array as_array(const py::handle& obj, const char* what);

void check_ndim(const py::array& a, const char* what, py::ssize_t ndim);
void check_c_contiguous(const py::array& a, const char* what);
// An `out` argument: a writable, C-contiguous 2-D float32 array (its shape is the caller's to
// check); ValueError naming "out" otherwise.
py::array out_array(const py::handle& obj);

// A validated float input: shape checked, C-contiguous, one of the three float types.
struct FloatArg {
  py::array array;
  DType dtype = DType::kF32;
  const void* data() const { return array.data(); }
  int64_t dim(int i) const { return static_cast<int64_t>(array.shape(i)); }
};

FloatArg float_arg(const py::handle& obj, const char* what, py::ssize_t ndim, bool bf16 = false);

// float32 view of a float input: the data itself for float32, a widened copy otherwise. Call
// without the GIL.
class Float32 {
 public:
  Float32(const void* data, DType dtype, int64_t n);
  const float* get() const { return ptr_; }

 private:
  const float* ptr_ = nullptr;
  std::vector<float> copy_;
};

// A numpy array owning a moved std::vector (no copy).
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), owned->data(), free_when_done);
}

// Codec, target and dtype names; ValueError for an unknown one.
std::optional<qmoe::Codec> parse_codec(const std::string& name, bool allow_auto);
qmoe::Target parse_target(const std::string& name);
DType parse_dtype_name(const std::string& name);

// ---- used by more than one source -------------------------------------------------------------

// An encoded matrix seen from Python: a view plus whatever owns its memory (an in-memory
// qmoe::CompressedMatrix, or an open container's mapping).
struct PyCompressed {
  std::shared_ptr<const void> owner;
  qmoe::CompressedView view;
  DType original_dtype = DType::kF32;

  static PyCompressed owning(qmoe::CompressedMatrix&& m, DType original) {
    auto held = std::make_shared<const qmoe::CompressedMatrix>(std::move(m));
    PyCompressed p;
    p.view = held->view();
    p.owner = std::move(held);
    p.original_dtype = original;
    return p;
  }
};

// An accumulator plus a lock: add() runs without the GIL, and two Python threads must not update
// one accumulator at once.
struct PyHessian {
  qmoe::HessianAccumulator acc;
  mutable std::mutex mu;
  explicit PyHessian(qmoe::HessianAccumulator a) : acc(std::move(a)) {}
};

// The ternary options of gptq(), compress_matrix() and compress_checkpoint() (gptq.h).
struct TernaryArgs {
  std::string levels = "minmax";
  double zero_threshold = 0.5;
  double zero_penalty = 0.0;
  int refit = 0;

  qmoe::TernaryOptions get() const {
    qmoe::TernaryOptions t;
    t.levels = qmoe::ternary_levels_from_name(levels);
    t.zero_threshold = zero_threshold;
    t.zero_penalty = zero_penalty;
    t.refit = refit;
    return t;
  }
};

// Rate control of compress_matrix() and compress_checkpoint() (gptq.cpp).
qmoe::RateControl rate_control(double target_bits, const std::string& knob, double tolerance,
                               const std::string& scope = "matrix");

// ---- for build_info() (module.cpp) ------------------------------------------------------------

std::string cpu_simd_level();                // decoder_cpu.cpp
std::vector<std::string> cpu_simd_levels();  // decoder_cpu.cpp
int cuda_device_count();                     // decoder_cuda.cpp

// ---- the bindings, in the order module.cpp calls them -----------------------------------------

// qmoe.FormatError and the translation of qmoe's exceptions (common.cpp).
void bind_errors(py::module_& m);
// CompressedMatrix (returned, for the kernels' methods), save, load, load_metadata.
py::class_<PyCompressed> bind_format(py::module_& m);
// CompressedMatrix.matvec / .matmul, grouped_matmul, the SIMD level functions.
void bind_decoder_cpu(py::module_& m, py::class_<PyCompressed>& matrix);
// CompressedMatrix.to_cuda, CudaMatrix, cuda_device_count, built_with_cuda.
void bind_decoder_cuda(py::module_& m, py::class_<PyCompressed>& matrix);
// ternarize_rtn, encode, the dictionaries, transcode.
void bind_encoder(py::module_& m);
// HessianAccumulator, save_hessians / load_hessians, expert_token_cap, GptqResult, gptq,
// compress_matrix.
void bind_gptq(py::module_& m);
// compress_checkpoint, CompressedExperts, switch_eval, calibration_hessians.
void bind_switch(py::module_& m);

}  // namespace qmoe::python
