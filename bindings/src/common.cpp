// The numpy <-> C++ helpers of common.h and the translation of qmoe's exceptions into Python ones
// (InvalidArgument -> ValueError, FormatError -> qmoe.FormatError, any other qmoe::Error ->
// RuntimeError). Widening float16/bfloat16 to float32 uses the library's own conversions.
#include "common.h"

#include <exception>

#include "qmoe/format/error.h"

namespace qmoe::python {

[[noreturn]] void bad_arg(const std::string& msg) {
  throw py::value_error(msg);
}

std::string dtype_str(const py::dtype& dt) {
  return py::str(py::handle(dt)).cast<std::string>();
}

py::ssize_t itemsize_of(const py::dtype& dt) {
  return dt.attr("itemsize").cast<py::ssize_t>();
}
char kind_of(const py::dtype& dt) {
  return dt.attr("kind").cast<std::string>().at(0);
}
size_t nbytes_of(const py::array& a) {
  return static_cast<size_t>(a.size() * itemsize_of(a.dtype()));
}

bool is_ml_bfloat16(const py::dtype& dt) {
  return itemsize_of(dt) == 2 && dt.attr("name").cast<std::string>() == "bfloat16";
}

DType float_dtype(const py::array& a, const char* what, bool bf16) {
  const py::dtype dt = a.dtype();
  if (bf16) {
    if (dt.is(py::dtype::of<uint16_t>()) || is_ml_bfloat16(dt)) return DType::kBF16;
    bad_arg(std::string(what) + ": bf16=True expects uint16 bfloat16 bit patterns (got " +
            dtype_str(dt) + ")");
  }
  if (dt.is(py::dtype::of<float>())) return DType::kF32;
  if (dt.is(py::dtype("float16"))) return DType::kF16;
  if (is_ml_bfloat16(dt)) return DType::kBF16;
  bad_arg(std::string(what) +
          ": expected float32, float16 or bfloat16 (ml_dtypes.bfloat16, or uint16 with "
          "bf16=True), got " +
          dtype_str(dt));
}

py::array as_array(const py::handle& obj, const char* what) {
  if (obj.is_none()) bad_arg(std::string(what) + ": expected an array, got None");
  py::array a = py::array::ensure(obj);
  if (!a) bad_arg(std::string(what) + ": not convertible to a numpy array");
  return a;
}

void check_ndim(const py::array& a, const char* what, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    bad_arg(std::string(what) + ": expected " + std::to_string(ndim) + " dimensions, got " +
            std::to_string(a.ndim()));
  }
}

void check_c_contiguous(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style)) {
    bad_arg(std::string(what) + ": array must be C-contiguous (use numpy.ascontiguousarray)");
  }
}

py::array out_array(const py::handle& obj) {
  py::array o = as_array(obj, "out");
  if (!o.dtype().is(py::dtype::of<float>()))
    bad_arg("out: expected float32, got " + dtype_str(o.dtype()));
  check_ndim(o, "out", 2);
  check_c_contiguous(o, "out");
  if (!o.writeable()) bad_arg("out: the array is read-only");
  return o;
}

FloatArg float_arg(const py::handle& obj, const char* what, py::ssize_t ndim, bool bf16) {
  FloatArg f;
  f.array = as_array(obj, what);
  f.dtype = float_dtype(f.array, what, bf16);
  check_ndim(f.array, what, ndim);
  check_c_contiguous(f.array, what);
  return f;
}

Float32::Float32(const void* data, DType dtype, int64_t n) {
  if (dtype == DType::kF32) {
    ptr_ = static_cast<const float*>(data);
    return;
  }
  copy_.resize(static_cast<size_t>(n));
  qmoe::to_float(dtype,
                 {static_cast<const std::byte*>(data), static_cast<size_t>(n * dtype_size(dtype))},
                 copy_.data());
  ptr_ = copy_.data();
}

std::optional<qmoe::Codec> parse_codec(const std::string& name, bool allow_auto) {
  if (allow_auto && name == "auto") return std::nullopt;
  if (auto c = qmoe::codec_from_name(name)) return c;
  bad_arg("unknown codec '" + name + "' (expected '" + qmoe::codec_names("', '") + "'" +
          (allow_auto ? ", or 'auto')" : ")"));
}

qmoe::Target parse_target(const std::string& name) {
  if (auto t = qmoe::target_from_name(name)) return *t;
  bad_arg("unknown target '" + name + "' (expected 'any', 'cpu' or 'gpu')");
}

DType parse_dtype_name(const std::string& name) {
  if (auto d = qmoe::dtype_from_name(name)) return *d;
  bad_arg("unknown dtype name '" + name + "' (safetensors spelling: 'F32', 'F16', 'BF16', ...)");
}

void bind_errors(py::module_& m) {
  // FormatError derives from RuntimeError, as qmoe::FormatError derives from qmoe::Error. The
  // class object is deliberately never released: the translator may run until the interpreter
  // shuts down.
  static PyObject* format_error =
      PyErr_NewExceptionWithDoc("qmoe.FormatError",
                                "A file or encoded stream that is malformed, truncated or "
                                "inconsistent. The message names the "
                                "file and tensor.",
                                PyExc_RuntimeError, nullptr);
  if (format_error == nullptr) throw py::error_already_set();
  m.attr("FormatError") = py::handle(format_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qmoe::FormatError& e) {
      PyErr_SetString(format_error, e.what());
    } catch (const qmoe::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const qmoe::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
}

}  // namespace qmoe::python
