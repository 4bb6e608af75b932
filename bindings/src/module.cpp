// The Python module `qmoe._qmoe`: a thin layer over the C++ library. Every function checks the
// dtype, shape and contiguity of its numpy arguments, releases the GIL, calls the C++ API and
// turns qmoe's exceptions into Python ones (InvalidArgument -> ValueError, FormatError ->
// qmoe.FormatError, any other qmoe::Error -> RuntimeError). No format, packing or numeric logic
// lives here: the only data transformation is widening float16/bfloat16 inputs to float32 for
// C++ calls that take float32 (with the library's own conversions from qmoe/format/bf16.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <omp.h>

#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/bf16.h"
#include "qmoe/format/container.h"
#include "qmoe/format/dtype.h"
#include "qmoe/format/error.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/reference.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/calibration.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/experts.h"
#include "qmoe/switch/forward.h"

#ifdef QMOE_PY_CUDA
#include <cuda_runtime.h>

#include "qmoe/decoder_cuda/codecs.h"
#include "qmoe/decoder_cuda/decoder.h"
#include "qmoe/decoder_cuda/error.h"
#endif

namespace py = pybind11;

namespace {

using qmoe::DType;

// ---- numpy <-> C++ ---------------------------------------------------------------------------

[[noreturn]] void bad_arg(const std::string& msg) {
  throw py::value_error(msg);
}

std::string dtype_str(const py::dtype& dt) {
  return py::str(py::handle(dt)).cast<std::string>();
}

// Element size and kind through the Python attributes: pybind11 before 2.12 reads them from the
// descriptor struct with NumPy 1's layout, which NumPy 2 changed (Debian 12's pybind11 is 2.10).
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

// The element type of a float array: float32, float16, ml_dtypes.bfloat16, or uint16 holding
// bfloat16 bit patterns when `bf16` is set. ValueError for anything else.
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

// Converts anything numpy accepts (arrays, tensors with __array__, lists) to an array.
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

// A validated float input: shape checked, C-contiguous, one of the three float types.
struct FloatArg {
  py::array array;
  DType dtype = DType::kF32;
  const void* data() const { return array.data(); }
  int64_t dim(int i) const { return static_cast<int64_t>(array.shape(i)); }
};

FloatArg float_arg(const py::handle& obj, const char* what, py::ssize_t ndim, bool bf16 = false) {
  FloatArg f;
  f.array = as_array(obj, what);
  f.dtype = float_dtype(f.array, what, bf16);
  check_ndim(f.array, what, ndim);
  check_c_contiguous(f.array, what);
  return f;
}

// float32 view of a float input: the data itself for float32, a widened copy otherwise. Call
// without the GIL.
class Float32 {
 public:
  Float32(const void* data, DType dtype, int64_t n) {
    if (dtype == DType::kF32) {
      ptr_ = static_cast<const float*>(data);
      return;
    }
    copy_.resize(static_cast<size_t>(n));
    qmoe::to_float(
        dtype, {static_cast<const std::byte*>(data), static_cast<size_t>(n * dtype_size(dtype))},
        copy_.data());
    ptr_ = copy_.data();
  }
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

// A read-only numpy array over memory kept alive by `base`.
template <class T>
py::array readonly_view(const T* data, std::vector<py::ssize_t> shape, py::handle base) {
  py::array_t<T> a(std::move(shape), data, base);
  a.attr("setflags")(py::arg("write") = false);
  return a;
}

// A 1-D read-only view of a member of `self`'s matrix, or None when its codec has no such member.
template <class T>
py::object member_view(py::handle self, bool present, std::span<const T> member) {
  if (!present) return py::none();
  return readonly_view(member.data(), {static_cast<py::ssize_t>(member.size())}, self);
}

// ---- CompressedMatrix ------------------------------------------------------------------------

std::optional<qmoe::Codec> parse_codec(const std::string& name, bool allow_auto) {
  if (allow_auto && name == "auto") return std::nullopt;
  if (auto c = qmoe::codec_from_name(name)) return c;
  bad_arg("unknown codec '" + name +
          "' (expected 'qmoe-v1', 'qmoe-v2', 'qmoe-v3', 'qmoe-g4', 'qmoe-p5'" +
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

// x (cols) -> y (rows). x: float32/float16/bfloat16.
py::array_t<float> matvec(const PyCompressed& m, const py::handle& x_obj, bool bf16, int threads,
                          bool int8_activations) {
  FloatArg x = float_arg(x_obj, "x", 1, bf16);
  if (x.dim(0) != m.view.cols) {
    bad_arg("x: expected " + std::to_string(m.view.cols) +
            " elements (the matrix's columns), got " + std::to_string(x.dim(0)));
  }
  std::vector<float> y(static_cast<size_t>(m.view.rows));
  {
    py::gil_scoped_release nogil;
    Float32 xf(x.data(), x.dtype, m.view.cols);
    qmoe::cpu::MatmulOptions opt;
    opt.threads = threads;
    opt.int8_activations = int8_activations;
    qmoe::cpu::matvec(m.view, xf.get(), y.data(), opt);
  }
  return to_numpy(std::move(y), {static_cast<py::ssize_t>(m.view.rows)});
}

// X (n, cols) -> Y (n, rows) = X W^T, the way a linear layer applies W to a batch of tokens.
py::array_t<float> matmul(const PyCompressed& m, const py::handle& x_obj, bool bf16, int threads,
                          bool int8_activations) {
  FloatArg x = float_arg(x_obj, "X", 2, bf16);
  if (x.dim(1) != m.view.cols) {
    bad_arg("X: expected shape (n, " + std::to_string(m.view.cols) + "), got (" +
            std::to_string(x.dim(0)) + ", " + std::to_string(x.dim(1)) + ")");
  }
  const int64_t n = x.dim(0);
  std::vector<float> y(static_cast<size_t>(n * m.view.rows));
  {
    py::gil_scoped_release nogil;
    Float32 xf(x.data(), x.dtype, n * m.view.cols);
    qmoe::cpu::MatmulOptions opt;
    opt.threads = threads;
    opt.int8_activations = int8_activations;
    qmoe::cpu::matmul(m.view, n, xf.get(), m.view.cols, y.data(), m.view.rows, opt);
  }
  return to_numpy(std::move(y),
                  {static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(m.view.rows)});
}

// ---- one MoE layer ---------------------------------------------------------------------------

// Row indices from a 1-D integer array, each checked against [0, limit).
std::vector<int32_t> index_list(const py::handle& obj, const std::string& what, int64_t limit) {
  py::array a = as_array(obj, what.c_str());
  check_ndim(a, what.c_str(), 1);
  const char k = kind_of(a.dtype());
  if (k != 'i' && k != 'u' && a.size() > 0)
    bad_arg(what + ": expected integers, got " + dtype_str(a.dtype()));
  const auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  std::vector<int32_t> out(static_cast<size_t>(v.size()));
  for (py::ssize_t i = 0; i < v.size(); ++i) {
    const int64_t r = v.data()[i];
    if (r < 0 || r >= limit) {
      bad_arg(what + "[" + std::to_string(i) + "] = " + std::to_string(r) + " is outside 0.." +
              std::to_string(limit - 1));
    }
    out[static_cast<size_t>(i)] = static_cast<int32_t>(r);
  }
  return out;
}

// Y[out_rows[e][i]] (+)= scales[e][i] * W_e X[tokens[e][i]] for every expert e, in one call.
py::array grouped_matmul(const std::vector<PyCompressed>& weights, const py::handle& x_obj,
                         const py::sequence& tokens, const py::object& scales_obj,
                         const py::object& out_rows_obj, const py::object& out_obj, bool accumulate,
                         bool bf16, int threads, bool int8_activations) {
  FloatArg x = float_arg(x_obj, "X", 2, bf16);
  const int64_t n = x.dim(0), d_in = x.dim(1);
  const size_t E = weights.size();
  if (E == 0) bad_arg("weights: at least one matrix is needed");
  const int64_t d_out = weights[0].view.rows;
  for (size_t e = 0; e < E; ++e) {
    if (weights[e].view.rows != d_out || weights[e].view.cols != d_in) {
      bad_arg("weights[" + std::to_string(e) + "]: shape (" + std::to_string(weights[e].view.rows) +
              ", " + std::to_string(weights[e].view.cols) + ") differs from (" +
              std::to_string(d_out) + ", " + std::to_string(d_in) +
              "), the shape every expert must have (rows of weights[0], columns of X)");
    }
  }
  auto per_expert = [&](const py::object& obj, const char* what) {
    if (!py::isinstance<py::sequence>(obj) || py::len(obj) != E) {
      bad_arg(std::string(what) + ": expected a sequence with one entry per matrix (" +
              std::to_string(E) + ")");
    }
    return py::reinterpret_borrow<py::sequence>(obj);
  };
  per_expert(tokens, "tokens");
  // The output: `out` as given, or zeros with as many rows as X (or as the largest out_rows entry
  // needs).
  py::array_t<float> y;
  int64_t out_limit = std::numeric_limits<int32_t>::max();
  if (!out_obj.is_none()) {
    py::array o = as_array(out_obj, "out");
    if (!o.dtype().is(py::dtype::of<float>()))
      bad_arg("out: expected float32, got " + dtype_str(o.dtype()));
    check_ndim(o, "out", 2);
    check_c_contiguous(o, "out");
    if (!o.writeable()) bad_arg("out: the array is read-only");
    if (o.shape(1) != d_out) {
      bad_arg("out: expected " + std::to_string(d_out) +
              " columns (the rows of the matrices), got " + std::to_string(o.shape(1)));
    }
    y = py::reinterpret_borrow<py::array_t<float>>(o);
    out_limit = o.shape(0);
  }
  std::vector<std::vector<int32_t>> in_rows(E), out_rows(E);
  std::vector<std::vector<float>> scales(E);
  for (size_t e = 0; e < E; ++e)
    in_rows[e] = index_list(tokens[e], "tokens[" + std::to_string(e) + "]", n);
  int64_t y_rows = n;
  if (!out_rows_obj.is_none()) {
    py::sequence seq = per_expert(out_rows_obj, "out_rows");
    y_rows = 0;
    for (size_t e = 0; e < E; ++e) {
      const std::string what = "out_rows[" + std::to_string(e) + "]";
      out_rows[e] = index_list(seq[e], what, out_limit);
      if (out_rows[e].size() != in_rows[e].size())
        bad_arg(what + ": length differs from tokens[" + std::to_string(e) + "]");
      for (int32_t r : out_rows[e]) y_rows = std::max<int64_t>(y_rows, int64_t{r} + 1);
    }
  } else if (!out_obj.is_none() && out_limit < n) {
    bad_arg("out: " + std::to_string(out_limit) + " rows, fewer than X's " + std::to_string(n) +
            " (without out_rows, tokens index the rows of both)");
  }
  if (!scales_obj.is_none()) {
    py::sequence seq = per_expert(scales_obj, "scales");
    for (size_t e = 0; e < E; ++e) {
      const std::string what = "scales[" + std::to_string(e) + "]";
      py::array a = as_array(seq[e], what.c_str());
      check_ndim(a, what.c_str(), 1);
      const char k = kind_of(a.dtype());
      if (k != 'f' && k != 'i' && k != 'u' && !is_ml_bfloat16(a.dtype()) && a.size() > 0) {
        bad_arg(what + ": expected real numbers, got " + dtype_str(a.dtype()));
      }
      const auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
      if (!f) bad_arg(what + ": not convertible to float32");
      if (static_cast<size_t>(f.size()) != in_rows[e].size()) {
        bad_arg(what + ": length differs from tokens[" + std::to_string(e) + "]");
      }
      scales[e].assign(f.data(), f.data() + f.size());
    }
  }
  if (out_obj.is_none()) {
    y = py::array_t<float>({static_cast<py::ssize_t>(y_rows), static_cast<py::ssize_t>(d_out)});
    if (y.size() > 0)
      std::memset(y.mutable_data(), 0, static_cast<size_t>(y.size()) * sizeof(float));
  } else {
    y_rows = out_limit;
  }
  std::vector<qmoe::cpu::ExpertBatch> items(E);
  for (size_t e = 0; e < E; ++e) items[e] = {weights[e].view, in_rows[e], out_rows[e], scales[e]};
  {
    py::gil_scoped_release nogil;
    Float32 xf(x.data(), x.dtype, n * d_in);
    qmoe::cpu::MatmulOptions opt;
    opt.threads = threads;
    opt.accumulate = accumulate;
    opt.int8_activations = int8_activations;
    qmoe::cpu::grouped_matmul(items, xf.get(), n, d_in, y.mutable_data(), y_rows, d_out, opt);
  }
  return y;
}

// ---- free functions --------------------------------------------------------------------------

py::tuple ternarize_rtn(const py::handle& w_obj, bool bf16) {
  FloatArg w = float_arg(w_obj, "w", 2, bf16);
  qmoe::TernaryMatrix t;
  {
    py::gil_scoped_release nogil;
    t = qmoe::ternarize_rtn(w.data(), w.dtype, w.dim(0), w.dim(1));
  }
  const auto rows = static_cast<py::ssize_t>(t.rows);
  const auto cols = static_cast<py::ssize_t>(t.cols);
  return py::make_tuple(to_numpy(std::move(t.symbols), {rows, cols}),
                        to_numpy(std::move(t.levels), {rows, 2}));
}

// symbols (rows, cols) uint8 and levels (rows, 2) bf16 bits -> TernaryMatrix (copies).
qmoe::TernaryMatrix ternary_from(const py::handle& s_obj, const py::handle& l_obj) {
  py::array s = as_array(s_obj, "symbols");
  if (!s.dtype().is(py::dtype::of<uint8_t>()))
    bad_arg("symbols: expected uint8, got " + dtype_str(s.dtype()));
  check_ndim(s, "symbols", 2);
  check_c_contiguous(s, "symbols");
  py::array l = as_array(l_obj, "levels");
  if (!l.dtype().is(py::dtype::of<uint16_t>()) && !is_ml_bfloat16(l.dtype())) {
    bad_arg("levels: expected bfloat16 bit patterns as uint16 or ml_dtypes.bfloat16, got " +
            dtype_str(l.dtype()));
  }
  check_ndim(l, "levels", 2);
  check_c_contiguous(l, "levels");
  if (l.shape(0) != s.shape(0) || l.shape(1) != 2) {
    bad_arg("levels: expected shape (" + std::to_string(s.shape(0)) + ", 2), got (" +
            std::to_string(l.shape(0)) + ", " + std::to_string(l.shape(1)) + ")");
  }
  qmoe::TernaryMatrix t(static_cast<int64_t>(s.shape(0)), static_cast<int64_t>(s.shape(1)));
  if (!t.symbols.empty()) std::memcpy(t.symbols.data(), s.data(), t.symbols.size());
  if (!t.levels.empty()) std::memcpy(t.levels.data(), l.data(), t.levels.size() * sizeof(uint16_t));
  return t;
}

PyCompressed encode(const py::handle& symbols, const py::handle& levels, const std::string& codec,
                    const std::string& original_dtype, int threads, int v2_max_width,
                    std::optional<double> v2_p0, const std::string& target) {
  qmoe::EncodeOptions opt;
  opt.codec = parse_codec(codec, true);
  opt.target = parse_target(target);
  opt.threads = threads;
  opt.v2_max_width = v2_max_width;
  opt.v2_p0 = v2_p0;
  const DType orig = parse_dtype_name(original_dtype);
  qmoe::TernaryMatrix t = ternary_from(symbols, levels);
  qmoe::CompressedMatrix m;
  {
    py::gil_scoped_release nogil;
    m = qmoe::encode(t, opt);
  }
  return PyCompressed::owning(std::move(m), orig);
}

// The same matrix in another codec.
PyCompressed transcode_matrix(const PyCompressed& m, const std::string& codec, int threads,
                              int v2_max_width, std::optional<double> v2_p0,
                              const std::string& target) {
  qmoe::EncodeOptions opt;
  opt.codec = parse_codec(codec, true);
  opt.target = parse_target(target);
  opt.threads = threads;
  opt.v2_max_width = v2_max_width;
  opt.v2_p0 = v2_p0;
  qmoe::CompressedMatrix out;
  {
    py::gil_scoped_release nogil;
    out = qmoe::transcode(m.view, opt);
  }
  return PyCompressed::owning(std::move(out), m.original_dtype);
}

// Raw tensors -> a validated CompressedMatrix (copies them).
PyCompressed from_tensors(const std::string& codec_name, std::pair<int64_t, int64_t> shape,
                          const py::handle& levels_obj, const py::handle& codes_obj,
                          const py::handle& row_offsets_obj, const py::handle& packed_obj,
                          const py::handle& dictionary_obj, const py::handle& tokens_obj,
                          const py::handle& kinds_obj, const py::handle& group_offsets_obj,
                          const std::string& original_dtype) {
  qmoe::CompressedMatrix m;
  m.codec = *parse_codec(codec_name, false);
  m.rows = shape.first;
  m.cols = shape.second;
  if (m.rows < 0 || m.cols < 0) bad_arg("shape: negative dimension");
  const DType orig = parse_dtype_name(original_dtype);
  auto copy_1d = [](const py::handle& obj, const char* what, const py::dtype& want, auto& out) {
    py::array a = as_array(obj, what);
    if (!a.dtype().is(want))
      bad_arg(std::string(what) + ": expected " + dtype_str(want) + ", got " +
              dtype_str(a.dtype()));
    check_c_contiguous(a, what);
    out.resize(static_cast<size_t>(a.size()));
    if (a.size() > 0) std::memcpy(out.data(), a.data(), nbytes_of(a));
  };
  py::array lv = as_array(levels_obj, "levels");
  if (is_ml_bfloat16(lv.dtype())) lv = lv.attr("view")(py::dtype::of<uint16_t>());
  copy_1d(lv, "levels", py::dtype::of<uint16_t>(), m.levels);
  const bool g4 = m.codec == qmoe::Codec::kG4;
  if (!g4 && (!tokens_obj.is_none() || !kinds_obj.is_none() || !group_offsets_obj.is_none()))
    bad_arg("tokens, kinds, group_offsets: only for qmoe-g4");
  if (g4) {
    if (tokens_obj.is_none() || kinds_obj.is_none() || group_offsets_obj.is_none())
      bad_arg("qmoe-g4 needs tokens (uint8), kinds (uint8) and group_offsets (int32)");
    if (!codes_obj.is_none() || !row_offsets_obj.is_none() || !dictionary_obj.is_none() ||
        !packed_obj.is_none())
      bad_arg("codes, row_offsets, dictionary, packed: not for qmoe-g4");
    copy_1d(tokens_obj, "tokens", py::dtype::of<uint8_t>(), m.tokens);
    copy_1d(kinds_obj, "kinds", py::dtype::of<uint8_t>(), m.kinds);
    copy_1d(group_offsets_obj, "group_offsets", py::dtype::of<int32_t>(), m.group_offsets);
  } else if (m.has_codes()) {
    const std::string name(qmoe::codec_name(m.codec));
    if (codes_obj.is_none() || row_offsets_obj.is_none())
      bad_arg(name + " needs codes and row_offsets");
    if (!packed_obj.is_none()) bad_arg("packed: only for qmoe-p5");
    copy_1d(codes_obj, "codes", py::dtype::of<uint16_t>(), m.codes);
    copy_1d(row_offsets_obj, "row_offsets", py::dtype::of<int32_t>(), m.row_offsets);
    if (m.has_dictionary()) {
      if (dictionary_obj.is_none()) bad_arg(name + " needs dictionary (uint32, 65536 entries)");
      std::vector<uint32_t> words;
      copy_1d(dictionary_obj, "dictionary", py::dtype::of<uint32_t>(), words);
      py::gil_scoped_release nogil;
      m.dictionary =
          m.codec == qmoe::Codec::kV3
              ? qmoe::make_v3_dictionary(std::move(words), "CompressedMatrix.from_tensors")
              : qmoe::make_v2_dictionary(std::move(words), "CompressedMatrix.from_tensors");
    } else if (!dictionary_obj.is_none()) {
      bad_arg("dictionary: only for qmoe-v2 and qmoe-v3");
    }
  } else {
    if (packed_obj.is_none()) bad_arg("qmoe-p5 needs packed");
    if (!codes_obj.is_none() || !row_offsets_obj.is_none() || !dictionary_obj.is_none())
      bad_arg("codes, row_offsets, dictionary: only for qmoe-v1, qmoe-v2 and qmoe-v3");
    copy_1d(packed_obj, "packed", py::dtype::of<uint8_t>(), m.packed);
  }
  {
    py::gil_scoped_release nogil;
    qmoe::validate(m.view(), "CompressedMatrix.from_tensors");
  }
  return PyCompressed::owning(std::move(m), orig);
}

// ---- GPTQ ------------------------------------------------------------------------------------

// An accumulator plus a lock: add() runs without the GIL, and two Python threads must not update
// one accumulator at once.
struct PyHessian {
  qmoe::HessianAccumulator acc;
  mutable std::mutex mu;
  explicit PyHessian(qmoe::HessianAccumulator a) : acc(std::move(a)) {}
};

// x: (tokens, columns) float32 with contiguous rows and any row stride (a slice of a larger
// batch is read in place), or float16/bfloat16 (widened). More than 2 dimensions: all but the
// last are tokens, when C-contiguous (e.g. (batch, seq, columns) activations).
int64_t hessian_add(PyHessian& h, const py::handle& x_obj, bool bf16, int threads) {
  py::array x = as_array(x_obj, "x");
  const DType dt = float_dtype(x, "x", bf16);
  if (x.ndim() < 2)
    bad_arg("x: expected shape (tokens, columns), got " + std::to_string(x.ndim()) +
            " dimension(s)");
  const int64_t cols = static_cast<int64_t>(x.shape(x.ndim() - 1));
  if (cols != h.acc.dim()) {
    bad_arg("x: expected " + std::to_string(h.acc.dim()) + " columns (the accumulator's), got " +
            std::to_string(cols));
  }
  int64_t n = 1;
  for (py::ssize_t i = 0; i + 1 < x.ndim(); ++i) n *= static_cast<int64_t>(x.shape(i));
  int64_t ld = cols;
  const py::ssize_t item = itemsize_of(x.dtype());
  const bool rows_contiguous = cols <= 1 || x.strides(x.ndim() - 1) == item;
  if (x.ndim() == 2 && dt == DType::kF32 && rows_contiguous && n > 1 && x.strides(0) % item == 0 &&
      x.strides(0) / item >= cols) {
    ld = static_cast<int64_t>(x.strides(0) / item);
  } else if (n > 0 && !(x.flags() & py::array::c_style)) {
    bad_arg(
        "x: rows must be contiguous float32 with a positive row stride, or the array C-contiguous");
  }
  py::gil_scoped_release nogil;
  Float32 xf(x.data(), dt, dt == DType::kF32 ? 0 : n * cols);
  std::lock_guard lock(h.mu);
  return h.acc.add(xf.get(), n, ld, threads);
}

py::object hessian_matrix(const PyHessian& h) {
  std::vector<float> m;
  {
    py::gil_scoped_release nogil;
    std::lock_guard lock(h.mu);
    m = h.acc.hessian();
  }
  if (m.empty()) return py::none();
  const auto d = static_cast<py::ssize_t>(h.acc.dim());
  return to_numpy(std::move(m), {d, d});
}

qmoe::GptqGrid parse_grid(const std::string& name) {
  for (auto g : {qmoe::GptqGrid::kTernary, qmoe::GptqGrid::kTernarySymmetric,
                 qmoe::GptqGrid::kUniform2, qmoe::GptqGrid::kUniform3, qmoe::GptqGrid::kUniform4}) {
    if (qmoe::gptq_grid_name(g) == name) return g;
  }
  bad_arg("unknown grid '" + name +
          "' (expected 'ternary', 'ternary-sym', 'uniform2', 'uniform3' or 'uniform4')");
}

struct PyGptqResult {
  py::object symbols = py::none();
  py::object levels = py::none();
  py::object dequantized = py::none();
  std::string grid;
  std::string status;
  std::string reason;
  double loss = 0.0;
  double output_loss = 0.0;
  double lambda = 0.0;
  int64_t dead_inputs = 0;
};

const char* status_name(qmoe::GptqStatus s) {
  switch (s) {
    case qmoe::GptqStatus::kOk:
      return "ok";
    case qmoe::GptqStatus::kFallbackRtn:
      return "fallback-rtn";
    case qmoe::GptqStatus::kFailed:
      return "failed";
  }
  return "unknown";
}

// w (rows, cols) and optional h (cols, cols), both float inputs; returns them as float32 views.
struct GptqInputs {
  FloatArg w;
  std::optional<FloatArg> h;
};

GptqInputs gptq_inputs(const py::handle& w_obj, const py::handle& h_obj, bool bf16) {
  GptqInputs in{float_arg(w_obj, "w", 2, bf16), std::nullopt};
  if (!h_obj.is_none()) {
    in.h = float_arg(h_obj, "h", 2, bf16);
    const int64_t cols = in.w.dim(1);
    if (in.h->dim(0) != cols || in.h->dim(1) != cols) {
      bad_arg("h: expected shape (" + std::to_string(cols) + ", " + std::to_string(cols) +
              ") for w with " + std::to_string(cols) + " columns, got (" +
              std::to_string(in.h->dim(0)) + ", " + std::to_string(in.h->dim(1)) + ")");
    }
  }
  return in;
}

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

qmoe::RateControl rate_control(double target_bits, const std::string& knob, double tolerance,
                               const std::string& scope = "matrix") {
  qmoe::RateControl r;
  r.target_bits = target_bits;
  r.knob = qmoe::rate_knob_from_name(knob);
  r.tolerance = tolerance;
  r.scope = qmoe::rate_scope_from_name(scope);
  return r;
}

qmoe::GptqOptions gptq_options(const std::string& grid, double percdamp, int64_t blocksize,
                               bool actorder, bool double_precision, int threads,
                               const TernaryArgs& ternary) {
  qmoe::GptqOptions opt;
  opt.grid = parse_grid(grid);
  opt.percdamp = percdamp;
  opt.blocksize = blocksize;
  opt.actorder = actorder;
  opt.double_precision = double_precision;
  opt.threads = threads;
  opt.ternary = ternary.get();
  return opt;
}

PyGptqResult gptq(const py::handle& w_obj, const py::handle& h_obj, const std::string& grid,
                  double percdamp, int64_t blocksize, bool actorder, bool double_precision,
                  int threads, bool bf16, const std::string& levels, double zero_threshold,
                  double zero_penalty, int refit) {
  const qmoe::GptqOptions opt =
      gptq_options(grid, percdamp, blocksize, actorder, double_precision, threads,
                   TernaryArgs{levels, zero_threshold, zero_penalty, refit});
  GptqInputs in = gptq_inputs(w_obj, h_obj, bf16);
  const int64_t rows = in.w.dim(0), cols = in.w.dim(1);
  qmoe::GptqResult r;
  {
    py::gil_scoped_release nogil;
    Float32 w(in.w.data(), in.w.dtype, rows * cols);
    std::optional<Float32> h;
    if (in.h) h.emplace(in.h->data(), in.h->dtype, cols * cols);
    r = qmoe::gptq_quantize(w.get(), rows, cols, h ? h->get() : nullptr, opt);
  }
  PyGptqResult out;
  out.grid = std::string(qmoe::gptq_grid_name(opt.grid));
  out.status = status_name(r.status);
  out.reason = r.reason;
  out.loss = r.loss;
  out.output_loss = r.output_loss;
  out.lambda = r.lambda;
  out.dead_inputs = r.dead_inputs;
  const auto R = static_cast<py::ssize_t>(rows), C = static_cast<py::ssize_t>(cols);
  if (qmoe::gptq_grid_is_ternary(opt.grid)) {
    out.symbols = to_numpy(std::move(r.ternary.symbols), {R, C});
    out.levels = to_numpy(std::move(r.ternary.levels), {R, 2});
  } else {
    out.dequantized = to_numpy(std::move(r.dequantized), {R, C});
  }
  return out;
}

py::object compress_matrix(const py::handle& w_obj, const py::handle& h_obj,
                           const std::string& grid, double percdamp, int64_t blocksize,
                           bool actorder, const std::string& codec, int threads, bool bf16,
                           bool with_stats, const std::string& levels, double zero_threshold,
                           double zero_penalty, int refit, double target_bits,
                           const std::string& rate_knob, double rate_tolerance) {
  const qmoe::GptqOptions opt =
      gptq_options(grid, percdamp, blocksize, actorder, false, threads,
                   TernaryArgs{levels, zero_threshold, zero_penalty, refit});
  const qmoe::RateControl rate = rate_control(target_bits, rate_knob, rate_tolerance);
  qmoe::EncodeOptions enc;
  enc.codec = parse_codec(codec, true);
  enc.threads = threads;
  GptqInputs in = gptq_inputs(w_obj, h_obj, bf16);
  const int64_t rows = in.w.dim(0), cols = in.w.dim(1);
  qmoe::CompressResult e;
  {
    py::gil_scoped_release nogil;
    Float32 w(in.w.data(), in.w.dtype, rows * cols);
    std::optional<Float32> h;
    if (in.h) h.emplace(in.h->data(), in.h->dtype, cols * cols);
    e = qmoe::compress_matrix(w.get(), rows, cols, h ? h->get() : nullptr, opt, enc, rate);
  }
  py::object m = py::cast(PyCompressed::owning(std::move(e.matrix), in.w.dtype));
  if (!with_stats) return m;
  py::dict stats;
  stats["status"] = status_name(e.status);
  stats["reason"] = e.reason;
  stats["loss"] = e.loss;
  stats["output_loss"] = e.output_loss;
  stats["zero_fraction"] = e.zero_fraction;
  stats["bits_per_weight"] = e.bits_per_weight;
  stats["zero_threshold"] = e.zero_threshold;
  stats["zero_penalty"] = e.zero_penalty;
  stats["rate_steps"] = e.rate_steps;
  stats["trimmed"] = e.trimmed;
  return py::make_tuple(m, stats);
}

// ---- CUDA ------------------------------------------------------------------------------------
// A CompressedMatrix copied to a GPU (qmoe::cuda::DeviceMatrix), used from host numpy arrays:
// inputs are uploaded, outputs downloaded. Present in every build; without the CUDA kernels (no
// nvcc at build time) or without a device, creating one raises RuntimeError.

// ---- CPU kernels ------------------------------------------------------------------------------
std::string cpu_simd_level() {
  return std::string(qmoe::cpu::simd_level_name(qmoe::cpu::simd_level()));
}

void set_cpu_simd_level(const std::string& name) {
  const auto l = qmoe::cpu::simd_level_from_name(name);
  if (!l) throw qmoe::InvalidArgument("unknown SIMD level '" + name + "' (scalar, avx2 or avx512)");
  qmoe::cpu::set_simd_level(*l);
}

std::vector<std::string> cpu_simd_levels() {
  std::vector<std::string> out;
  for (auto l : qmoe::cpu::supported_simd_levels()) out.emplace_back(qmoe::cpu::simd_level_name(l));
  return out;
}

int cuda_device_count() {
#ifdef QMOE_PY_CUDA
  return qmoe::cuda::device_count();
#else
  return 0;
#endif
}

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

// ---- containers ------------------------------------------------------------------------------

// numpy dtype -> stored element type. Native byte order only.
DType dense_dtype(const py::dtype& dt, const std::string& name) {
  const char order = dt.attr("byteorder").cast<std::string>()[0];
  if (order == '>') bad_arg("tensor '" + name + "': big-endian arrays are not supported");
  if (is_ml_bfloat16(dt)) return DType::kBF16;
  const char kind = kind_of(dt);
  const auto size = itemsize_of(dt);
  if (kind == 'b' && size == 1) return DType::kBool;
  if (kind == 'u' || kind == 'i') {
    const bool u = kind == 'u';
    switch (size) {
      case 1:
        return u ? DType::kU8 : DType::kI8;
      case 2:
        return u ? DType::kU16 : DType::kI16;
      case 4:
        return u ? DType::kU32 : DType::kI32;
      case 8:
        return u ? DType::kU64 : DType::kI64;
      default:
        break;
    }
  }
  if (kind == 'f') {
    switch (size) {
      case 2:
        return DType::kF16;
      case 4:
        return DType::kF32;
      case 8:
        return DType::kF64;
      default:
        break;
    }
  }
  bad_arg("tensor '" + name + "': dtype " + dtype_str(dt) + " cannot be stored");
}

// Stored element type -> numpy dtype (BF16: ml_dtypes.bfloat16 unless raw_bf16 or ml_dtypes is
// missing, then uint16 bit patterns).
py::dtype numpy_dtype(DType t, bool raw_bf16) {
  switch (t) {
    case DType::kBool:
      return py::dtype("bool");
    case DType::kU8:
      return py::dtype("uint8");
    case DType::kI8:
      return py::dtype("int8");
    case DType::kU16:
      return py::dtype("uint16");
    case DType::kI16:
      return py::dtype("int16");
    case DType::kF16:
      return py::dtype("float16");
    case DType::kBF16:
      if (!raw_bf16) {
        try {
          return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
        } catch (const py::error_already_set& e) {
          if (!e.matches(PyExc_ImportError)) throw;
        }
      }
      return py::dtype("uint16");
    case DType::kU32:
      return py::dtype("uint32");
    case DType::kI32:
      return py::dtype("int32");
    case DType::kF32:
      return py::dtype("float32");
    case DType::kU64:
      return py::dtype("uint64");
    case DType::kI64:
      return py::dtype("int64");
    case DType::kF64:
      return py::dtype("float64");
  }
  throw std::logic_error("numpy_dtype: unknown DType");
}

std::vector<std::filesystem::path> save(
    const std::filesystem::path& path, const py::dict& tensors,
    const std::optional<std::map<std::string, std::string>>& metadata, int64_t shard_size) {
  // Collect and check everything with the GIL held; write without it. `keep` holds the arrays
  // (and matrices) whose memory the spans point into.
  struct Dense {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::span<const std::byte> bytes;
  };
  struct Compressed {
    std::string name;
    qmoe::CompressedView view;
    DType original;
  };
  std::vector<Dense> dense;
  std::vector<Compressed> compressed;
  std::vector<py::object> keep;
  for (auto [key, value] : tensors) {
    if (!py::isinstance<py::str>(key)) bad_arg("save: tensor names must be str");
    std::string name = key.cast<std::string>();
    if (py::isinstance<PyCompressed>(value)) {
      const auto& p = value.cast<const PyCompressed&>();
      compressed.push_back({std::move(name), p.view, p.original_dtype});
      keep.push_back(py::reinterpret_borrow<py::object>(value));
      continue;
    }
    py::array a = py::array::ensure(value);
    if (!a) bad_arg("tensor '" + name + "': expected a CompressedMatrix or an array");
    if (!(a.flags() & py::array::c_style)) {
      bad_arg("tensor '" + name + "': array must be C-contiguous (use numpy.ascontiguousarray)");
    }
    Dense d{name, dense_dtype(a.dtype(), name), {}, {}};
    for (py::ssize_t i = 0; i < a.ndim(); ++i) d.shape.push_back(static_cast<int64_t>(a.shape(i)));
    d.bytes = {static_cast<const std::byte*>(a.data()), nbytes_of(a)};
    dense.push_back(std::move(d));
    keep.push_back(std::move(a));
  }
  py::gil_scoped_release nogil;
  qmoe::ContainerWriteOptions opt;
  opt.shard_size = shard_size;
  qmoe::ContainerWriter w(path, opt);
  if (metadata) {
    for (const auto& [k, v] : *metadata) w.set_metadata(k, v);
  }
  for (auto& d : dense) w.add_dense(std::move(d.name), d.dtype, std::move(d.shape), d.bytes);
  for (auto& c : compressed) w.add_compressed(std::move(c.name), c.view, c.original);
  return w.finish();
}

std::shared_ptr<const qmoe::Container> open_container(const std::filesystem::path& path,
                                                      bool verify_checksums) {
  qmoe::ContainerOpenOptions opt;
  opt.verify_checksums = verify_checksums;
  py::gil_scoped_release nogil;
  return std::make_shared<const qmoe::Container>(qmoe::Container::open(path, opt));
}

py::dict load(const std::filesystem::path& path, bool verify_checksums, bool raw_bf16) {
  std::shared_ptr<const qmoe::Container> c = open_container(path, verify_checksums);
  // One capsule keeps the mapping alive for every dense array.
  auto* held = new std::shared_ptr<const qmoe::Container>(c);
  py::capsule base(held,
                   [](void* p) { delete static_cast<std::shared_ptr<const qmoe::Container>*>(p); });
  py::dict out;
  for (const std::string& name : c->names()) {
    if (const qmoe::CompressedEntry* e = c->find_compressed(name)) {
      PyCompressed p;
      p.owner = c;
      p.view = e->view;
      p.original_dtype = e->original_dtype;
      out[py::str(name)] = py::cast(std::move(p));
    } else if (const qmoe::DenseEntry* d = c->find_dense(name)) {
      std::vector<py::ssize_t> shape(d->shape.begin(), d->shape.end());
      // C-order strides computed here rather than by pybind11 (see itemsize_of()).
      std::vector<py::ssize_t> strides(shape.size());
      py::ssize_t stride = static_cast<py::ssize_t>(qmoe::dtype_size(d->dtype));
      for (size_t i = shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= shape[i];
      }
      py::array a(numpy_dtype(d->dtype, raw_bf16), std::move(shape), std::move(strides),
                  d->bytes.data(), base);
      a.attr("setflags")(py::arg("write") = false);
      out[py::str(name)] = std::move(a);
    }
  }
  return out;
}

std::map<std::string, std::string> load_metadata(const std::filesystem::path& path) {
  return open_container(path, false)->metadata();
}

// ---- a compressed MoE layer ------------------------------------------------------------------

// One top-1 MoE layer's compressed experts (wi [d_ff, d_model], wo [d_model, d_ff] per expert),
// checked once, run by qmoe::sw::compressed_experts_forward.
struct PyExperts {
  std::vector<PyCompressed> wi, wo;
  std::vector<qmoe::CompressedView> wi_views, wo_views;
};

std::unique_ptr<PyExperts> make_experts(std::vector<PyCompressed> wi,
                                        std::vector<PyCompressed> wo) {
  if (wi.empty() || wi.size() != wo.size())
    bad_arg("CompressedExperts: " + std::to_string(wi.size()) + " wi and " +
            std::to_string(wo.size()) + " wo matrices (one of each per expert, at least one)");
  auto p = std::make_unique<PyExperts>();
  const int64_t d_ff = wi[0].view.rows, d = wi[0].view.cols;
  for (size_t e = 0; e < wi.size(); ++e) {
    const auto& a = wi[e].view;
    const auto& b = wo[e].view;
    if (a.rows != d_ff || a.cols != d || b.rows != d || b.cols != d_ff)
      bad_arg("CompressedExperts: expert " + std::to_string(e) + " has wi (" +
              std::to_string(a.rows) + ", " + std::to_string(a.cols) + ") and wo (" +
              std::to_string(b.rows) + ", " + std::to_string(b.cols) + "); expected (" +
              std::to_string(d_ff) + ", " + std::to_string(d) + ") and (" + std::to_string(d) +
              ", " + std::to_string(d_ff) + ")");
    p->wi_views.push_back(a);
    p->wo_views.push_back(b);
  }
  p->wi = std::move(wi);
  p->wo = std::move(wo);
  return p;
}

// expert: (n,) integers (negative: no expert) or an (n, E) mask with at most one non-zero entry
// per row (transformers' one-hot dispatch mask; an all-zero row is a dropped token).
std::vector<int32_t> expert_of_tokens(const py::handle& obj, int64_t n, int64_t E) {
  py::array a = as_array(obj, "expert");
  const char k = kind_of(a.dtype());
  if (k != 'i' && k != 'u' && k != 'b')
    bad_arg("expert: expected integers or booleans, got " + dtype_str(a.dtype()));
  const auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  std::vector<int32_t> out(static_cast<size_t>(n), -1);
  if (a.ndim() == 1) {
    if (a.shape(0) != n)
      bad_arg("expert: " + std::to_string(a.shape(0)) + " entries for " + std::to_string(n) +
              " tokens");
    for (int64_t t = 0; t < n; ++t) {
      const int64_t e = v.data()[t];
      if (e >= E)
        bad_arg("expert[" + std::to_string(t) + "] = " + std::to_string(e) + ", but there are " +
                std::to_string(E) + " experts");
      out[static_cast<size_t>(t)] = e < 0 ? -1 : static_cast<int32_t>(e);
    }
    return out;
  }
  // A mask: (n, E), or (n, 1, E) as transformers' routers return it.
  if (a.ndim() < 2 || a.shape(0) != n || a.shape(a.ndim() - 1) != E || a.size() != n * E)
    bad_arg("expert: expected shape (" + std::to_string(n) + ",), (" + std::to_string(n) + ", " +
            std::to_string(E) + ") or (" + std::to_string(n) + ", 1, " + std::to_string(E) + ")");
  for (int64_t t = 0; t < n; ++t) {
    const int64_t* row = v.data() + t * E;
    for (int64_t e = 0; e < E; ++e) {
      if (row[e] == 0) continue;
      if (out[static_cast<size_t>(t)] >= 0)
        bad_arg("expert: row " + std::to_string(t) + " names more than one expert (top-1 only)");
      out[static_cast<size_t>(t)] = static_cast<int32_t>(e);
    }
  }
  return out;
}

py::array experts_forward(const PyExperts& ex, const py::handle& x_obj,
                          const py::handle& expert_obj, const py::object& scales_obj,
                          const py::object& out_obj, bool bf16, int threads) {
  FloatArg x = float_arg(x_obj, "X", 2, bf16);
  const int64_t n = x.dim(0), d = ex.wi_views[0].cols;
  const auto E = static_cast<int64_t>(ex.wi.size());
  if (x.dim(1) != d)
    bad_arg("X: expected shape (n, " + std::to_string(d) + "), got (" + std::to_string(n) + ", " +
            std::to_string(x.dim(1)) + ")");
  const std::vector<int32_t> expert = expert_of_tokens(expert_obj, n, E);
  std::vector<float> scales;
  if (!scales_obj.is_none()) {
    py::array a = as_array(scales_obj, "scales");
    if (a.size() != n)
      bad_arg("scales: " + std::to_string(a.size()) + " values for " + std::to_string(n) +
              " tokens");
    if (is_ml_bfloat16(a.dtype()) || kind_of(a.dtype()) != 'f')
      bad_arg("scales: expected float32, float16 or float64, got " + dtype_str(a.dtype()));
    const auto f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
    scales.assign(f.data(), f.data() + n);
  }
  py::array_t<float> y;
  if (out_obj.is_none()) {
    y = py::array_t<float>({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(d)});
  } else {
    py::array o = as_array(out_obj, "out");
    if (!o.dtype().is(py::dtype::of<float>()))
      bad_arg("out: expected float32, got " + dtype_str(o.dtype()));
    check_ndim(o, "out", 2);
    check_c_contiguous(o, "out");
    if (!o.writeable()) bad_arg("out: the array is read-only");
    if (o.shape(0) != n || o.shape(1) != d)
      bad_arg("out: expected shape (" + std::to_string(n) + ", " + std::to_string(d) + ")");
    y = py::reinterpret_borrow<py::array_t<float>>(o);
  }
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    Float32 xf(x.data(), x.dtype, n * d);
    qmoe::sw::compressed_experts_forward(ex.wi_views, ex.wo_views, xf.get(), n, expert, scales, yp,
                                         threads);
  }
  return y;
}

// ---- the C++ Switch forward pass and calibration ----------------------------------------------

py::dict switch_eval(const std::filesystem::path& model, const std::filesystem::path& tokens,
                     int64_t expert_capacity, int64_t batch_pairs, bool dense_experts,
                     bool with_logits) {
  namespace sw = qmoe::sw;
  if (expert_capacity < 0) bad_arg("expert_capacity must be >= 0");
  if (batch_pairs < 1) bad_arg("batch_pairs must be >= 1");
  sw::EvalResult r;
  std::vector<float> logits;
  int64_t rows = 0, vocab = 0;
  {
    py::gil_scoped_release nogil;
    sw::LoadOptions lo;
    lo.compressed_experts = !dense_experts;
    const sw::SwitchModel m = sw::SwitchModel::load(model, lo);
    const sw::TokenPairs pairs = sw::TokenPairs::load(tokens, m.config.vocab_size);
    sw::ForwardOptions fo;
    fo.expert_capacity = expert_capacity;
    r = sw::evaluate(m, pairs, batch_pairs, fo);
    if (with_logits) {
      vocab = m.lm_head.out;
      for (int64_t p = 0; p < pairs.num_pairs(); p += batch_pairs) {
        const sw::TokenPairs b = pairs.slice(p, std::min(pairs.num_pairs(), p + batch_pairs));
        const sw::RowMatrix lg = sw::logits(m, sw::decode(m, b, sw::encode(m, b, fo), fo));
        logits.insert(logits.end(), lg.data(), lg.data() + lg.size());
        rows += lg.rows();
      }
    }
  }
  py::dict d;
  d["loss"] = r.loss.mean();
  d["nll_sum"] = r.loss.nll_sum;
  d["targets"] = r.loss.targets;
  d["encoder_tokens"] = r.encoder_tokens;
  d["decoder_tokens"] = r.decoder_tokens;
  if (with_logits)
    d["logits"] = to_numpy(std::move(logits),
                           {static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(vocab)});
  return d;
}

py::dict calibration_hessians(const std::filesystem::path& checkpoint,
                              const std::filesystem::path& tokens,
                              const std::vector<int32_t>& excluded_ids, double token_cap_multiplier,
                              int64_t expert_capacity, bool exclude_ignored_targets) {
  namespace sw = qmoe::sw;
  if (token_cap_multiplier < 0) bad_arg("token_cap_multiplier must be >= 0");
  if (expert_capacity < 0) bad_arg("expert_capacity must be >= 0");
  std::map<std::string, qmoe::HessianAccumulator> accs;
  {
    py::gil_scoped_release nogil;
    sw::SwitchModel m = sw::SwitchModel::load(checkpoint);
    sw::CalibrationOptions opt;
    opt.excluded_ids = excluded_ids;
    opt.exclude_ignored_targets = exclude_ignored_targets;
    opt.forward.expert_capacity = expert_capacity;
    sw::SequentialRunner run(m, sw::TokenPairs::load(tokens, m.config.vocab_size), opt);
    while (!run.done()) {
      run.begin_block();
      if (run.sparse()) {
        const int64_t total = run.ff_input().rows();
        const int64_t cap =
            token_cap_multiplier > 0 && total > 0
                ? qmoe::expert_token_cap(total, run.num_experts(), token_cap_multiplier)
                : 0;
        const std::string stack = sw::stack_name(run.stack());
        for (int64_t e = 0; e < run.num_experts(); ++e) {
          for (const char* which : {"wi", "wo"}) {
            const sw::RowMatrix x =
                std::string(which) == "wi" ? run.wi_inputs(e) : run.wo_inputs(e);
            std::string name = sw::SwitchNames::expert(stack, run.block(), e, which);
            name.resize(name.size() - std::string(".weight").size());
            qmoe::HessianAccumulator acc(x.cols(), cap);
            acc.add(x.data(), x.rows(), 0, 1);
            accs.emplace(std::move(name), std::move(acc));
          }
        }
      }
      run.end_block();
    }
  }
  py::dict out;
  for (auto& [name, a] : accs)
    out[py::str(name)] = py::cast(std::make_unique<PyHessian>(std::move(a)));
  return out;
}

// ---- checkpoint pipeline -----------------------------------------------------------------------

py::dict compress_checkpoint(
    const std::filesystem::path& checkpoint, const std::filesystem::path& output,
    const std::optional<std::filesystem::path>& hessians,
    const std::optional<std::filesystem::path>& calib_tokens, bool sequential, int threads,
    int64_t max_memory, int64_t shard_size, bool resume, bool cast_bf16, const std::string& codec,
    const std::string& target, double percdamp, int64_t blocksize, bool actorder, bool check_disk,
    const py::object& progress, const py::object& note, const std::string& levels,
    double zero_threshold, double zero_penalty, int refit, double target_bits,
    const std::string& rate_knob, double rate_tolerance, const std::string& rate_scope) {
  namespace sw = qmoe::sw;
  sw::CompressOptions opt;
  opt.threads = threads;
  opt.max_memory = max_memory;
  opt.shard_size = shard_size;
  opt.resume = resume;
  opt.cast_bf16 = cast_bf16;
  opt.codec = parse_codec(codec, true);
  opt.target = parse_target(target);
  opt.percdamp = percdamp;
  opt.blocksize = blocksize;
  opt.actorder = actorder;
  opt.ternary = TernaryArgs{levels, zero_threshold, zero_penalty, refit}.get();
  opt.rate = rate_control(target_bits, rate_knob, rate_tolerance, rate_scope);
  opt.check_disk = check_disk;
  if (calib_tokens && hessians)
    throw qmoe::InvalidArgument(
        "compress_checkpoint: hessians and calib_tokens exclude each other");
  if (calib_tokens) opt.calib_tokens = *calib_tokens;
  opt.sequential = sequential;
  // The pipeline calls progress and note from the calling thread. A Python exception in either,
  // or a pending signal (Ctrl-C), stops the run at the next progress call: the C++ side gets
  // StopRun (no new matrix starts, finished ones stay in the work directory for resume=True) and
  // the Python exception is raised here. note itself never throws into the pipeline.
  struct StopRun {};
  std::optional<py::error_already_set> pending;
  opt.progress = [&progress, &pending](const sw::CompressProgress& p) {
    py::gil_scoped_acquire gil;
    if (pending) throw StopRun{};
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (progress.is_none()) return;
      py::dict d;
      d["done"] = p.done;
      d["total"] = p.total;
      d["resumed"] = p.resumed;
      d["seconds"] = p.seconds;
      d["current"] = p.current;
      d["phase"] = p.phase;
      d["step"] = p.step;
      d["tokens"] = p.tokens;
      d["total_tokens"] = p.total_tokens;
      progress(d);
    } catch (py::error_already_set& e) {
      pending.emplace(std::move(e));
      throw StopRun{};
    }
  };
  if (!note.is_none()) {
    opt.note = [&note, &pending](const std::string& text) {
      py::gil_scoped_acquire gil;
      if (pending) return;
      try {
        note(text);
      } catch (py::error_already_set& e) {
        pending.emplace(std::move(e));
      }
    };
  }
  sw::CompressSummary s;
  try {
    py::gil_scoped_release nogil;
    std::unique_ptr<sw::HessianProvider> provider;
    if (hessians) {
      provider = sw::open_hessian_file(*hessians);
      opt.hessians = provider.get();
    }
    s = sw::compress_checkpoint(checkpoint, output, opt);
  } catch (const StopRun&) {
    throw std::move(*pending);
  }
  if (pending) throw std::move(*pending);
  py::dict d;
  d["files"] = s.files;
  d["quantizer"] = s.quantizer;
  d["input_bytes"] = s.input_bytes;
  d["output_bytes"] = s.output_bytes;
  d["expert_matrices"] = s.expert_matrices;
  d["resumed_matrices"] = s.resumed_matrices;
  d["expert_weights"] = s.expert_weights;
  d["expert_input_bytes"] = s.expert_input_bytes;
  d["expert_compressed_bytes"] = s.expert_compressed_bytes;
  d["bits_per_expert_weight"] = s.bits_per_expert_weight();
  d["passthrough_tensors"] = s.passthrough_tensors;
  // "v1_matrices", "v2_matrices", ...: the expert matrices of each codec.
  for (const qmoe::CodecTraits& t : qmoe::kCodecs) {
    d[py::str(std::string(t.name.substr(5)) + "_matrices")] = s.matrices_of(t.codec);
  }
  d["fallback_matrices"] = s.fallback_matrices;
  d["below_target_matrices"] = s.below_target_matrices;
  d["mean_zero_fraction"] = s.mean_zero_fraction;
  d["compress_seconds"] = s.compress_seconds;
  d["assemble_seconds"] = s.assemble_seconds;
  {
    py::dict phases;
    auto phase = [&](const char* name, const sw::PhaseStats& p) {
      py::dict e;
      e["seconds"] = p.seconds;
      e["flops"] = p.flops;
      e["thread_seconds"] = p.thread_seconds;
      phases[name] = e;
    };
    phase("load", s.loop.load);
    phase("forward", s.loop.forward);
    phase("hessians", s.loop.hessians);
    phase("gptq", s.loop.gptq);
    phase("encode", s.loop.encode);
    phase("write", s.loop.write);
    phase("outputs", s.loop.outputs);
    d["phases"] = phases;
    d["calibration_pairs"] = s.calibration_pairs;
    d["calibration_tokens"] = s.calibration_tokens;
  }
  d["total_seconds"] = s.total_seconds;
  d["memory_budget"] = s.memory_budget;
  py::list blocks;
  for (const auto& b : s.blocks) {
    py::dict bd;
    bd["block"] = b.block;
    bd["matrices"] = b.matrices;
    bd["weights"] = b.weights;
    bd["compressed_bytes"] = b.compressed_bytes;
    bd["bits_per_weight"] = b.bits_per_weight();
    blocks.append(bd);
  }
  d["blocks"] = blocks;
  return d;
}

}  // namespace

PYBIND11_MODULE(_qmoe, m) {
  m.doc() = "qmoe: sub-1-bit compression of Mixture-of-Experts expert weights (C++ extension).";
  m.attr("__version__") = QMOE_VERSION;

  // ---- exceptions --------------------------------------------------------------------------
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

  // ---- CompressedMatrix --------------------------------------------------------------------
  py::class_<PyCompressed>(m, "CompressedMatrix", R"doc(
An encoded ternary matrix (rows x cols). Obtained from encode(), compress_matrix(), load() or
CompressedMatrix.from_tensors(); immutable. Matrices returned by load() are zero-copy views into
the memory-mapped file, which stays mapped while any of them (or their raw tensors) is alive.
)doc")
      .def_static("from_tensors", &from_tensors, py::arg("codec"), py::arg("shape"), py::kw_only(),
                  py::arg("levels"), py::arg("codes") = py::none(),
                  py::arg("row_offsets") = py::none(), py::arg("packed") = py::none(),
                  py::arg("dictionary") = py::none(), py::arg("tokens") = py::none(),
                  py::arg("kinds") = py::none(), py::arg("group_offsets") = py::none(),
                  py::arg("original_dtype") = "F32",
                  R"doc(
Builds a matrix from its raw tensors (copied), as stored in a container (format/SPEC.md).

codec: "qmoe-v1" (needs codes uint16 and row_offsets int32 of rows+1 entries), "qmoe-v2" or
"qmoe-v3" (the same plus dictionary, uint32 of 65536 entry words of that codec), "qmoe-g4"
(needs tokens uint8, kinds uint8 and group_offsets int32 of 2*(ceil(rows/4)+1) entries, SPEC
section 4.5) or "qmoe-p5" (needs packed uint8 of rows*ceil(cols/5) bytes). levels: 2*rows bfloat16 bit patterns (uint16 or
ml_dtypes.bfloat16, any shape), (lo, hi) per row. The whole stream is validated.
Raises ValueError for wrong dtypes or a missing tensor, qmoe.FormatError for a malformed stream.
)doc")
      .def_property_readonly(
          "shape", [](const PyCompressed& p) { return py::make_tuple(p.view.rows, p.view.cols); },
          "(rows, cols) of the matrix.")
      .def_property_readonly(
          "rows", [](const PyCompressed& p) { return p.view.rows; }, "Number of rows.")
      .def_property_readonly(
          "cols", [](const PyCompressed& p) { return p.view.cols; }, "Number of columns.")
      .def_property_readonly(
          "codec",
          [](const PyCompressed& p) { return std::string(qmoe::codec_name(p.view.codec)); },
          "Codec name: 'qmoe-v1', 'qmoe-v2', 'qmoe-v3', 'qmoe-g4' or 'qmoe-p5'.")
      .def_property_readonly(
          "original_dtype",
          [](const PyCompressed& p) { return std::string(qmoe::dtype_name(p.original_dtype)); },
          "dtype of the weights before compression, safetensors spelling ('F32', 'BF16', ...).")
      .def_property_readonly(
          "nbytes", [](const PyCompressed& p) { return p.view.compressed_bytes(); },
          "Bytes of codes (or packed data), row offsets and levels together (a qmoe-v2 / qmoe-v3 "
          "dictionary, "
          "shared by the matrices of a file, is not counted).")
      .def_property_readonly(
          "bits_per_weight", [](const PyCompressed& p) { return p.view.bits_per_weight(false); },
          "nbytes * 8 / (rows * cols); 0 for an empty matrix.")
      .def_property_readonly(
          "code_bits_per_weight",
          [](const PyCompressed& p) { return p.view.bits_per_weight(true); },
          "Bits per weight of the codes (or packed data) alone.")
      .def_property_readonly(
          "codes",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_codes(), v.codes);
          },
          "qmoe-v1 / qmoe-v2 / qmoe-v3 codewords, uint16 (read-only view); None for qmoe-p5.")
      .def_property_readonly(
          "row_offsets",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_codes(), v.row_offsets);
          },
          "qmoe-v1 / qmoe-v2 / qmoe-v3 row offsets into codes, int32, rows+1 entries (read-only "
          "view; qmoe-v3: a pair of rows' codes are its even row's range, odd rows' are empty); "
          "None for qmoe-p5.")
      .def_property_readonly(
          "dictionary",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.has_dictionary(), v.dictionary);
          },
          "qmoe-v2 / qmoe-v3 dictionary: 65536 entry words, uint32 (read-only view; layout in "
          "format/SPEC.md section 4.3.2 for qmoe-v2, 4.4.2 for qmoe-v3); None for the other "
          "codecs.")
      .def_property_readonly(
          "dictionary_id",
          [](const PyCompressed& p) -> py::object {
            if (!p.view.has_dictionary()) return py::none();
            return py::str(qmoe::hex64(p.view.dictionary_id));
          },
          "qmoe-v2 / qmoe-v3: the dictionary's id (XXH3-64 of its bytes, 16 hex digits); None "
          "otherwise.")
      .def_property_readonly(
          "packed",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kP5, v.packed);
          },
          "qmoe-p5 base-3 packed bytes, uint8, rows*ceil(cols/5) (read-only view); None for "
          "the other codecs.")
      .def_property_readonly(
          "tokens",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.tokens);
          },
          "qmoe-g4 gap tokens, two per byte, uint8 (read-only view, format/SPEC.md section 4.5); "
          "None for the other codecs.")
      .def_property_readonly(
          "kinds",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.kinds);
          },
          "qmoe-g4 kind bits (1 = high), eight per byte, uint8 (read-only view); None for the "
          "other codecs.")
      .def_property_readonly(
          "group_offsets",
          [](py::object self) {
            const qmoe::CompressedView& v = self.cast<const PyCompressed&>().view;
            return member_view(self, v.codec == qmoe::Codec::kG4, v.group_offsets);
          },
          "qmoe-g4 (first token, first kind bit) of each group of 4 rows and the ends, int32, "
          "2*(ceil(rows/4)+1) entries (read-only view); None for the other codecs.")
      .def_property_readonly(
          "levels",
          [](py::object self) {
            const auto& p = self.cast<const PyCompressed&>();
            return readonly_view(p.view.levels.data(), {static_cast<py::ssize_t>(p.view.rows), 2},
                                 self);
          },
          "Per-row (lo, hi) levels as bfloat16 bit patterns, uint16 of shape (rows, 2) (read-only "
          "view).")
      .def(
          "decode",
          [](const PyCompressed& p) {
            std::vector<float> out(static_cast<size_t>(p.view.rows * p.view.cols));
            {
              py::gil_scoped_release nogil;
              qmoe::decode_ref(p.view, out.data());
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(p.view.rows),
                                             static_cast<py::ssize_t>(p.view.cols)});
          },
          "Decodes to dense float32 of shape (rows, cols): each weight is its row's lo, 0 or hi.")
      .def(
          "decode_symbols",
          [](const PyCompressed& p) {
            std::vector<uint8_t> out(static_cast<size_t>(p.view.rows * p.view.cols));
            {
              py::gil_scoped_release nogil;
              qmoe::decode_symbols_ref(p.view, out.data());
            }
            return to_numpy(std::move(out), {static_cast<py::ssize_t>(p.view.rows),
                                             static_cast<py::ssize_t>(p.view.cols)});
          },
          "Decodes to ternary symbols, uint8 of shape (rows, cols): 0 = zero, 1 = lo, 2 = hi.")
      .def("matvec", &matvec, py::arg("x"), py::kw_only(), py::arg("bf16") = false,
           py::arg("threads") = 0, py::arg("int8_activations") = true, R"doc(
y = W x straight from the codes (the CPU kernels; fp32 sums). x: 1-D float32, float16 or bfloat16
(uint16 bit patterns with bf16=True) of cols elements, C-contiguous. threads: OpenMP threads
(0 = default); the result does not depend on it. int8_activations: for a qmoe-g4 matrix on a CPU
with AVX-512 VBMI/VNNI, x is rounded to int8 (scale 127 / max|x|) and summed in integers, about
twice as fast; each output is then within sum_c |W[r, c]| * max|x| / 254 of the float result.
Returns float32 of rows elements.
Raises ValueError for a wrong dtype, shape or layout.
)doc")
      .def("matmul", &matmul, py::arg("X"), py::kw_only(), py::arg("bf16") = false,
           py::arg("threads") = 0, py::arg("int8_activations") = true, R"doc(
Y = X W^T for a batch of n tokens (the way a linear layer applies W), straight from the codes:
each code is decoded once per pass of up to 32 tokens. X: float32, float16 or bfloat16 of shape
(n, cols), C-contiguous. threads and int8_activations (n = 1 only) as for matvec(). Returns
float32 of shape (n, rows).
Raises ValueError for a wrong dtype, shape or layout.
)doc")
      .def("to_cuda", &to_cuda, py::arg("device") = 0, R"doc(
Copies the matrix to GPU `device` and returns a CudaMatrix. Raises RuntimeError when qmoe was
built without the CUDA kernels or no CUDA device is available (see cuda_device_count()),
ValueError for a device that does not exist or a qmoe-v3 matrix (CPU only: transcode() it to
qmoe-v2 first).
)doc")
      .def("__repr__", [](const PyCompressed& p) {
        return "CompressedMatrix(shape=(" + std::to_string(p.view.rows) + ", " +
               std::to_string(p.view.cols) + "), codec='" +
               std::string(qmoe::codec_name(p.view.codec)) +
               "', bits_per_weight=" + std::to_string(p.view.bits_per_weight(false)) + ")";
      });

  // ---- functions ---------------------------------------------------------------------------
  m.def("grouped_matmul", &grouped_matmul, py::arg("weights"), py::arg("X"), py::arg("tokens"),
        py::kw_only(), py::arg("scales") = py::none(), py::arg("out_rows") = py::none(),
        py::arg("out") = py::none(), py::arg("accumulate") = false, py::arg("bf16") = false,
        py::arg("threads") = 0, py::arg("int8_activations") = true, R"doc(
One MoE layer's experts on the CPU in one call, straight from the codes: for every matrix e and
every i, Y[out_rows[e][i]] = scales[e][i] * (W_e @ X[tokens[e][i]]) (+= with accumulate=True,
e.g. summing a token's top-k down projections). Experts are applied in order, so the result is
fixed and bit-identical for any thread count.

weights: sequence of E CompressedMatrix of one shape (rows, cols). X: float32, float16 or bfloat16
of shape (n, cols), C-contiguous. tokens: E 1-D integer arrays of rows of X (an empty one skips
its matrix). scales: None or E 1-D float arrays, one factor per token (router probabilities).
out_rows: None (outputs go to the tokens' own rows) or E integer arrays of output rows, as long as
tokens. out: None (a new zero-filled float32 array of shape (n, rows), or (1 + the largest out_rows
entry, rows)), or a writable C-contiguous float32 array of shape (m, rows) to write into and return.
Raises ValueError for a wrong shape, dtype, length or an index out of range, before writing.
)doc");
  m.def("ternarize_rtn", &ternarize_rtn, py::arg("w"), py::kw_only(), py::arg("bf16") = false,
        R"doc(
Round-to-nearest ternarization, per row: lo = bf16(min(row, 0)), hi = bf16(max(row, 0)) (a zero
row gets (-1, +1)); a weight becomes hi if w > hi/2, lo if w < lo/2, else 0.

w: 2-D float32, float16 or bfloat16 (uint16 bit patterns with bf16=True), C-contiguous.
Returns (symbols, levels): symbols uint8 (rows, cols) with 0 = zero, 1 = lo, 2 = hi; levels
uint16 (rows, 2) holding the bfloat16 bit patterns of (lo, hi).
Raises ValueError for a wrong dtype, shape or layout, or a non-finite weight.
)doc");

  m.def("encode", &encode, py::arg("symbols"), py::arg("levels"), py::kw_only(),
        py::arg("codec") = "qmoe-v1", py::arg("original_dtype") = "F32", py::arg("threads") = 0,
        py::arg("v2_max_width") = 63, py::arg("v2_p0") = py::none(), py::arg("target") = "any",
        R"doc(
Encodes a ternary matrix. symbols: uint8 (rows, cols), each 0, 1 or 2; levels: (rows, 2)
bfloat16 bit patterns (uint16 or ml_dtypes.bfloat16), as returned by ternarize_rtn() or gptq().
codec: "qmoe-v1" (QMoE's dictionary codes), "qmoe-v2" (a dictionary fitted to the matrix, ~10%
smaller at 88.5% zeros, much smaller at higher sparsity; the CPU and CUDA kernels read it as is),
"qmoe-v3" (qmoe-v2 with rows coded in pairs: ~3% larger than qmoe-v2 at 88.5% zeros),
"qmoe-g4" (gap tokens over groups of 4 rows: the smallest at 88.5% zeros and the fastest on CPUs
with AVX-512 VBMI/VNNI; qmoe-v3 and qmoe-g4 are CPU codecs, converted to qmoe-v2 when uploaded to
a GPU), "qmoe-p5" (base-3 packing) or "auto": the codec of `target` ("any": qmoe-v1, "cpu":
qmoe-g4, "gpu": qmoe-v2), or qmoe-p5 where that is smaller.
v2_max_width, v2_p0: qmoe-v2's longest dictionary entry (1..63 symbols) and the zero fraction its
dictionary is fitted to (None: the matrix's own, rounded to a multiple of 1/64); qmoe-v3 uses
v2_p0 too (its entries are always up to 63 columns wide).
original_dtype: the dtype the weights had, recorded when the matrix is saved ('F32', 'BF16', ...).
threads: OpenMP threads (0 = default); the output is identical for any value.
Raises ValueError for wrong dtypes or shapes, a symbol outside 0..2, or an unknown codec.
)doc");

  m.def(
      "v2_dictionary",
      [](double p0, int max_width) {
        const auto d = qmoe::v2_dictionary(p0, max_width);
        std::vector<uint32_t> words = d->entries;
        return py::make_tuple(to_numpy(std::move(words), {static_cast<py::ssize_t>(65536)}),
                              qmoe::hex64(d->id));
      },
      py::arg("p0"), py::arg("max_width") = 63, R"doc(
The qmoe-v2 dictionary the encoder builds for zero fraction p0 (0 < p0 < 1) and entries of at
most max_width symbols (format/SPEC.md section 4.3.4), as (entries, id): 65536 uint32 entry words
(layout in section 4.3.2) and the 16-hex-digit XXH3-64 that names it in a container.
Raises ValueError for p0 outside (0, 1) or max_width outside 1..63.
)doc");

  m.def(
      "v3_dictionary",
      [](double p0) {
        const auto d = qmoe::v3_dictionary(p0);
        std::vector<uint32_t> words = d->entries;
        return py::make_tuple(to_numpy(std::move(words), {static_cast<py::ssize_t>(65536)}),
                              qmoe::hex64(d->id));
      },
      py::arg("p0"), R"doc(
The qmoe-v3 dictionary the encoder builds for zero fraction p0 (0 < p0 < 1) (format/SPEC.md
section 4.4.4: a Tunstall tree over the 9 values of a column of two rows), as (entries, id): 65536
uint32 entry words (layout in section 4.4.2) and the 16-hex-digit XXH3-64 that names it in a
container. Raises ValueError for p0 outside (0, 1).
)doc");

  m.def("transcode", &transcode_matrix, py::arg("matrix"), py::kw_only(), py::arg("codec") = "auto",
        py::arg("threads") = 0, py::arg("v2_max_width") = 63, py::arg("v2_p0") = py::none(),
        py::arg("target") = "any",
        R"doc(
The same matrix (symbols and levels) encoded in another codec: e.g. a qmoe-v1 matrix of an
existing container as qmoe-v2, or back; a qmoe-v3 or qmoe-g4 matrix as qmoe-v2 for the GPU.
codec (default "auto": the codec of target), threads, v2_max_width, v2_p0 and target as for
encode(); the original dtype is kept.
Raises ValueError for an unknown codec or target.
)doc");

  m.def("save", &save, py::arg("path"), py::arg("tensors"), py::kw_only(),
        py::arg("metadata") = py::none(), py::arg("shard_size") = 0, R"doc(
Writes a qmoe container (format/SPEC.md): a safetensors file any safetensors reader opens.

tensors: dict of name -> CompressedMatrix (stored as its tensor group, e.g. "<name>.qmoe_codes")
or array (stored unchanged; bool, int8..int64, uint8..uint64, float16/32/64 or
ml_dtypes.bfloat16, C-contiguous, native byte order). metadata: str -> str pairs for the
__metadata__ header (keys "format", "format_version" and "qmoe.*" are reserved).
shard_size: 0 writes one file at `path`; otherwise `path` is a directory that receives shards of
about shard_size bytes and model.safetensors.index.json. Files appear atomically.
Returns the paths written (pathlib.Path). Raises ValueError for bad names, dtypes or arguments, RuntimeError for
I/O failures.
)doc");

  m.def("load", &load, py::arg("path"), py::kw_only(), py::arg("verify_checksums") = false,
        py::arg("raw_bf16") = false, R"doc(
Opens a qmoe container (a .safetensors file, an index .json, or a directory holding either),
memory-mapped and fully validated. Returns a dict of logical name -> CompressedMatrix for
compressed matrices and read-only numpy arrays for dense tensors, sorted by name; both are
zero-copy views that keep the mapping alive. BF16 tensors come back as ml_dtypes.bfloat16 when
ml_dtypes is installed and raw_bf16 is False, as uint16 bit patterns otherwise.
verify_checksums: also hash every tensor against its stored xxh3 checksum.
Raises qmoe.FormatError for a missing, malformed or inconsistent file.
)doc");

  m.def("load_metadata", &load_metadata, py::arg("path"), R"doc(
The metadata of a qmoe container (of its index when sharded) as a dict of str -> str: what was
given to save(), plus "format" and "format_version" (the reserved "qmoe.*" bookkeeping entries
are left out). Raises qmoe.FormatError as load() does.
)doc");

  // ---- GPTQ --------------------------------------------------------------------------------
  py::class_<PyHessian>(m, "HessianAccumulator", R"doc(
Streaming sum of x x^T over calibration tokens (in float64) and the token count, for GPTQ's
Hessian H = (2 / tokens) * sum. Results are bit-identical for any thread count. Safe to use from
several Python threads (calls on one accumulator are serialised); add() releases the GIL.
)doc")
      .def(py::init([](int64_t columns, int64_t token_cap) {
             return std::make_unique<PyHessian>(qmoe::HessianAccumulator(columns, token_cap));
           }),
           py::arg("columns"), py::kw_only(), py::arg("token_cap") = 0, R"doc(
columns: input features of the layer (the Hessian is columns x columns). token_cap: accept at
most this many tokens in all (0 = unlimited); later ones are only counted in `dropped`.
Raises ValueError for negative arguments.
)doc")
      .def_property_readonly(
          "columns", [](const PyHessian& h) { return h.acc.dim(); },
          "Input features (the Hessian's size).")
      .def_property_readonly(
          "count",
          [](const PyHessian& h) {
            std::lock_guard l(h.mu);
            return h.acc.tokens();
          },
          "Tokens accumulated so far.")
      .def_property_readonly(
          "dropped",
          [](const PyHessian& h) {
            std::lock_guard l(h.mu);
            return h.acc.dropped();
          },
          "Tokens refused because of token_cap.")
      .def_property_readonly(
          "token_cap", [](const PyHessian& h) { return h.acc.token_cap(); }, "The cap (0 = none).")
      .def("add", &hessian_add, py::arg("x"), py::kw_only(), py::arg("bf16") = false,
           py::arg("threads") = 0, R"doc(
Adds tokens. x: (tokens, columns) float32 whose rows are contiguous (any row stride: a slice of a
larger batch is read in place, without a copy), or float16/bfloat16 (widened to float32); with
more than 2 dimensions (e.g. (batch, seq, columns)) all but the last count as tokens and x must
be C-contiguous. From a PyTorch hook: acc.add(inp.detach().float().cpu().numpy()).
Returns the number of tokens accepted (fewer than given once token_cap is reached).
Raises ValueError for a wrong dtype, shape or layout, or a non-finite value (nothing is added).
)doc")
      .def(
          "merge",
          [](PyHessian& self, const PyHessian& other) {
            if (&self == &other) {
              std::lock_guard l(self.mu);
              const qmoe::HessianAccumulator copy = self.acc;
              self.acc.merge(copy);
              return;
            }
            std::scoped_lock l(self.mu, other.mu);
            self.acc.merge(other.acc);
          },
          py::arg("other"), R"doc(
Adds the sums and token counts of another accumulator of the same size (the cap is not applied).
Raises ValueError when the sizes differ.
)doc")
      .def("hessian", &hessian_matrix, R"doc(
GPTQ's H = (2 / count) * sum(x x^T) as float32 (columns, columns), or None before any token
(which gptq() and compress_matrix() take as "no Hessian": round-to-nearest).
)doc")
      .def(
          "sum",
          [](const PyHessian& h) {
            std::vector<double> s;
            {
              std::lock_guard l(h.mu);
              s = h.acc.sum();
            }
            const auto d = static_cast<py::ssize_t>(h.acc.dim());
            return to_numpy(std::move(s), {d, d});
          },
          "The raw sum of x x^T, float64 (columns, columns) (a copy).")
      .def("__repr__", [](const PyHessian& h) {
        std::lock_guard l(h.mu);
        return "HessianAccumulator(columns=" + std::to_string(h.acc.dim()) +
               ", count=" + std::to_string(h.acc.tokens()) + ")";
      });

  m.def(
      "save_hessians",
      [](const std::filesystem::path& path, const std::map<std::string, PyHessian*>& accs) {
        std::map<std::string, qmoe::HessianAccumulator> copies;
        for (const auto& [name, h] : accs) {
          if (h == nullptr) bad_arg("save_hessians: accumulator '" + name + "' is None");
          std::lock_guard l(h->mu);
          copies.emplace(name, h->acc);
        }
        py::gil_scoped_release nogil;
        qmoe::write_hessians(path, copies);
      },
      py::arg("path"), py::arg("accumulators"), R"doc(
Writes a dict of name -> HessianAccumulator to a Hessian file (safetensors; format/HESSIANS.md),
atomically. Raises ValueError for bad names (empty, or ending in ".xtx", ".tokens" or
".dropped"), RuntimeError for I/O failures.
)doc");

  m.def(
      "load_hessians",
      [](const std::filesystem::path& path) {
        std::map<std::string, qmoe::HessianAccumulator> accs;
        {
          py::gil_scoped_release nogil;
          accs = qmoe::read_hessians(path);
        }
        py::dict out;
        for (auto& [name, a] : accs)
          out[py::str(name)] = py::cast(std::make_unique<PyHessian>(std::move(a)));
        return out;
      },
      py::arg("path"), R"doc(
Reads every accumulator of a Hessian file: dict of name -> HessianAccumulator.
Raises qmoe.FormatError for a file that is missing or not a valid Hessian file.
)doc");

  m.def("expert_token_cap", &qmoe::expert_token_cap, py::arg("total_tokens"),
        py::arg("num_experts"), py::arg("multiplier") = 4.0, R"doc(
QMoE's cap on the tokens used per expert: floor(multiplier * total_tokens / num_experts), at
least 1 (for HessianAccumulator(token_cap=...)). Raises ValueError for num_experts <= 0,
total_tokens < 0 or multiplier <= 0.
)doc");

  py::class_<PyGptqResult>(m, "GptqResult", R"doc(
The result of gptq(). Unpacks as (symbols, levels, loss).
)doc")
      .def_readonly(
          "symbols", &PyGptqResult::symbols,
          "Ternary grids: uint8 (rows, cols), 0 = zero, 1 = lo, 2 = hi. Uniform grids: None.")
      .def_readonly("levels", &PyGptqResult::levels,
                    "Ternary grids: uint16 (rows, 2), bfloat16 bit patterns of (lo, hi). Uniform "
                    "grids: None.")
      .def_readonly(
          "dequantized", &PyGptqResult::dequantized,
          "Uniform grids: the quantized weights as float32 (rows, cols). Ternary grids: None.")
      .def_readonly("grid", &PyGptqResult::grid, "The grid used.")
      .def_readonly(
          "status", &PyGptqResult::status,
          "'ok', or 'fallback-rtn' when round-to-nearest was used (no, empty or singular Hessian).")
      .def_readonly("reason", &PyGptqResult::reason, "Why the fallback was taken ('' for 'ok').")
      .def_property_readonly(
          "fallback", [](const PyGptqResult& r) { return r.status == "fallback-rtn"; },
          "True when round-to-nearest was used instead of GPTQ.")
      .def_readonly(
          "loss", &PyGptqResult::loss,
          "GPTQ's layer loss 0.5 * tr((W - Q) Hd (W - Q)^T), Hd the dampened Hessian used.")
      .def_readonly("output_loss", &PyGptqResult::output_loss,
                    "loss without the dampening term: ||(W - Q) X^T||^2 / n for H = (2/n) X^T X.")
      .def_readonly("lambda_", &PyGptqResult::lambda, "Dampening added to diag(H).")
      .def_readonly("dead_inputs", &PyGptqResult::dead_inputs,
                    "Inputs with H_ii = 0 (their weights were zeroed).")
      .def("__iter__",
           [](const PyGptqResult& r) {
             return py::iter(py::make_tuple(r.symbols, r.levels, r.loss));
           })
      .def("__repr__", [](const PyGptqResult& r) {
        return "GptqResult(grid='" + r.grid + "', status='" + r.status +
               "', loss=" + std::to_string(r.loss) + ")";
      });

  m.def("gptq", &gptq, py::arg("w"), py::arg("h") = py::none(), py::kw_only(),
        py::arg("grid") = "ternary", py::arg("percdamp") = 0.1, py::arg("blocksize") = 128,
        py::arg("actorder") = false, py::arg("double_precision") = false, py::arg("threads") = 0,
        py::arg("bf16") = false, py::arg("levels") = "minmax", py::arg("zero_threshold") = 0.5,
        py::arg("zero_penalty") = 0.0, py::arg("refit") = 0, R"doc(
GPTQ of one matrix (QMoE's ternary grid by default).

w: (rows, cols) float32, float16 or bfloat16 (uint16 bit patterns with bf16=True), C-contiguous,
a linear layer y = W x (cols = input features). h: (cols, cols) Hessian (symmetric; e.g.
HessianAccumulator.hessian()), or None for round-to-nearest. grid: "ternary", "ternary-sym",
"uniform2", "uniform3" or "uniform4". percdamp: dampening, lambda = percdamp * mean(diag H).
blocksize: columns per lazy-update block. actorder: columns by descending diag(H).
double_precision: float64 throughout. threads: OpenMP threads (0 = default); results are
bit-identical for any value.
Ternary grids (gptq/README.md, "Beyond QMoE's recipe"): levels: "minmax" (QMoE's) or "fit"
(Lloyd iterations weighted by diag(H)); zero_threshold t: w -> hi above t*hi, lo below t*lo
(0.5: nearest); zero_penalty mu: each symbol minimises d (w - q)^2 + mu S [q != 0] (entropy-
constrained rounding); refit: rounds of GPTQ and closed-form refit of each row's levels (the best
round is returned). The defaults are QMoE's recipe.
Returns a GptqResult (unpacks as symbols, levels, loss). A missing, all-zero, non-finite or
singular Hessian falls back to round-to-nearest (result.fallback, result.reason).
Raises ValueError for a wrong dtype, shape or layout, non-finite weights or invalid options.
)doc");

  m.def("compress_matrix", &compress_matrix, py::arg("w"), py::arg("h") = py::none(), py::kw_only(),
        py::arg("grid") = "ternary", py::arg("percdamp") = 0.1, py::arg("blocksize") = 128,
        py::arg("actorder") = false, py::arg("codec") = "auto", py::arg("threads") = 0,
        py::arg("bf16") = false, py::arg("with_stats") = false, py::arg("levels") = "minmax",
        py::arg("zero_threshold") = 0.5, py::arg("zero_penalty") = 0.0, py::arg("refit") = 0,
        py::arg("target_bits") = 0.0, py::arg("rate_knob") = "threshold",
        py::arg("rate_tolerance") = 0.002, R"doc(
GPTQ (ternary grid) then encode: (W, H) -> CompressedMatrix, in one call.

w, h, percdamp, blocksize, actorder, threads, bf16 as for gptq(); grid must be "ternary" or
"ternary-sym". codec: "auto" (the smaller of qmoe-v1 and qmoe-p5), "qmoe-v1", "qmoe-v2",
"qmoe-v3" or "qmoe-p5" (as for encode()).
levels, zero_threshold, zero_penalty, refit as for gptq(). target_bits > 0: rate control, the
encoded size aimed at in bits per weight (codes, row offsets and levels counted), within
rate_tolerance, by searching rate_knob ("threshold" or "penalty"); ValueError if it cannot be
reached.
The matrix records w's dtype as its original dtype. with_stats=True returns
(matrix, {"status", "reason", "loss", "output_loss", "zero_fraction", "bits_per_weight",
"zero_threshold", "zero_penalty", "rate_steps", "trimmed"}) instead.
Raises ValueError as gptq() and encode() do, and for a non-ternary grid.
)doc");

  m.def("compress_checkpoint", &compress_checkpoint, py::arg("checkpoint"), py::arg("output"),
        py::kw_only(), py::arg("hessians") = py::none(), py::arg("calib_tokens") = py::none(),
        py::arg("sequential") = true, py::arg("threads") = 0, py::arg("max_memory") = 0,
        py::arg("shard_size") = 0, py::arg("resume") = false, py::arg("cast_bf16") = false,
        py::arg("codec") = "auto", py::arg("target") = "any", py::arg("percdamp") = 0.1,
        py::arg("blocksize") = 128, py::arg("actorder") = false, py::arg("check_disk") = true,
        py::arg("progress") = py::none(), py::arg("note") = py::none(),
        py::arg("levels") = "minmax", py::arg("zero_threshold") = 0.5,
        py::arg("zero_penalty") = 0.0, py::arg("refit") = 0, py::arg("target_bits") = 0.0,
        py::arg("rate_knob") = "threshold", py::arg("rate_tolerance") = 0.002,
        py::arg("rate_scope") = "matrix", R"doc(
Compresses a Switch Transformers checkpoint into a qmoe container, as `qmoe compress` does: every
expert matrix ternarized (GPTQ with Hessians from the file `hessians`, e.g. written by
save_hessians() with one accumulator per expert matrix, named as its tensor without ".weight"
(format/HESSIANS.md), or from the token file `calib_tokens` (format/TOKENS.md) run
through the model block by block, each block after the compressed ones before it unless
sequential=False; round to nearest without either) and encoded, every other tensor copied
unchanged.

checkpoint: Hugging Face checkpoint directory (config.json + safetensors). output: the container
file, or a directory when shard_size > 0 (bytes per shard). threads: 0 = all; the output is the
same for any value. max_memory: cap on resident memory in bytes (0 = none). resume: continue an
interrupted run from "<output>.qmoe-work". cast_bf16: store non-expert F32/F16 tensors as BF16.
codec: "auto" (the codec of target or qmoe-p5, the smaller per matrix), "qmoe-v1", "qmoe-v2",
"qmoe-v3", "qmoe-g4" or "qmoe-p5" (as for encode(), one dictionary per fitted zero fraction).
target: "any" (default: qmoe-v1 under "auto", no key written), "cpu" (qmoe-g4) or "gpu"
(qmoe-v2), recorded as the container's "qmoe.target" metadata unless "any". percdamp, blocksize,
actorder: GPTQ settings as for gptq(). levels, zero_threshold, zero_penalty, refit: ternary
options as for gptq() (round to nearest uses them too). target_bits, rate_knob, rate_tolerance:
rate control as for compress_matrix(), per expert matrix (rate_scope="matrix") or for the mean
over all expert matrices (rate_scope="all": every matrix spends the same bits per weight on
codes). check_disk: refuse to start without enough free disk space.
progress: called with a dict (done, total, resumed, seconds, current, phase, step, tokens,
total_tokens) a few times a second. note: called with one-line notes (resumed work, cleaned-up leftovers). Ctrl-C, or an
exception raised in progress or note, stops the run within a fraction of a second plus the time of
the matrices in flight: nothing is written to `output`, the finished matrices stay in the work
directory for resume=True, and the exception is raised.
Returns a summary dict (files, quantizer, sizes, matrix counts, bits_per_expert_weight, timings,
per-block statistics under "blocks").
Raises qmoe.FormatError for a missing or malformed checkpoint or Hessian file, ValueError for bad
arguments, RuntimeError for I/O failures or too little disk space.
)doc");

  // ---- compressed MoE layers and the Switch forward pass ------------------------------------
  py::class_<PyExperts>(m, "CompressedExperts", R"doc(
One top-1 MoE layer's compressed experts, run on the CPU in two grouped kernel calls: for every
token t routed to expert e, Y[t] = scale[t] * wo[e] @ relu(wi[e] @ X[t]); a token routed to no
expert (dropped over the expert capacity) gets Y[t] = 0. Each expert's tokens are taken in row
order; the result is bit-identical for any thread count. Holds (and keeps alive) the matrices.
)doc")
      .def(py::init(&make_experts), py::arg("wi"), py::arg("wo"), R"doc(
wi: sequence of E CompressedMatrix of shape (d_ff, d_model); wo: E of shape (d_model, d_ff).
Raises ValueError when the counts or shapes differ.
)doc")
      .def_property_readonly(
          "num_experts", [](const PyExperts& e) { return e.wi.size(); }, "Number of experts E.")
      .def_property_readonly(
          "d_model", [](const PyExperts& e) { return e.wi_views[0].cols; },
          "Input and output features.")
      .def_property_readonly(
          "d_ff", [](const PyExperts& e) { return e.wi_views[0].rows; },
          "Hidden features of each expert.")
      .def("forward", &experts_forward, py::arg("X"), py::arg("expert"),
           py::arg("scales") = py::none(), py::kw_only(), py::arg("out") = py::none(),
           py::arg("bf16") = false, py::arg("threads") = 0, R"doc(
X: (n, d_model) float32, float16 or bfloat16 (uint16 bit patterns with bf16=True), C-contiguous
(read in place when float32). expert: (n,) integers, the expert of each token (negative: none),
or an (n, E) or (n, 1, E) mask with at most one non-zero per token (transformers' one-hot dispatch
mask; an all-zero row is a dropped token). scales: None or n float factors (router
probabilities), any shape with n elements.
out: None (a new float32 array) or a writable C-contiguous float32 (n, d_model) array to fill.
Returns Y, float32 (n, d_model). Raises ValueError for a wrong dtype, shape, or expert index.
)doc");

  m.def("switch_eval", &switch_eval, py::arg("model"), py::arg("tokens"), py::kw_only(),
        py::arg("expert_capacity") = 0, py::arg("batch_pairs") = 8,
        py::arg("dense_experts") = false, py::arg("logits") = false, R"doc(
The C++ forward pass of a Switch Transformers model (a checkpoint directory or a qmoe container,
compressed experts run from their codes unless dense_experts) on a token file (format/TOKENS.md),
as `qmoe eval` runs it: teacher-forced mean cross-entropy of the decoder targets.
expert_capacity: tokens per expert and sequence before tokens are dropped (0: none).
Returns {"loss", "nll_sum", "targets", "encoder_tokens", "decoder_tokens"} and, with logits=True,
"logits": float32 (decoder tokens, vocab), the pairs' logits concatenated in file order.
Raises qmoe.FormatError for a bad model or token file, ValueError for bad arguments.
)doc");

  m.def("calibration_hessians", &calibration_hessians, py::arg("checkpoint"), py::arg("tokens"),
        py::kw_only(), py::arg("excluded_ids") = std::vector<int32_t>{},
        py::arg("token_cap_multiplier") = 4.0, py::arg("expert_capacity") = 0,
        py::arg("exclude_ignored_targets") = true, R"doc(
Every expert matrix's Hessian accumulator from the C++ forward pass of a Switch checkpoint on a
token file, in one pass through the original model (`qmoe compress --calib-tokens FILE
--calib-independent` computes the same): wi's inputs are the layer-normed FF inputs of the tokens
routed to the expert, wo's are relu(wi @ x) of the same tokens; tokens whose input id is in
excluded_ids (e.g. T5's sentinels) and decoder positions whose target is -100
(exclude_ignored_targets) do not count; each accumulator keeps the first
floor(token_cap_multiplier * tokens / experts) tokens (QMoE's cap; 0: all), tokens being those of
the stack the block is in. Returns dict of name (the weight's name without ".weight") ->
HessianAccumulator, ready for save_hessians(). Raises qmoe.FormatError for a bad checkpoint or
token file, ValueError for bad arguments.
)doc");

  // ---- CUDA --------------------------------------------------------------------------------
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

  // ---- CPU kernels and the build ----------------------------------------------------------
  m.def("cpu_simd_level", &cpu_simd_level, R"doc(
The SIMD level the CPU kernels (matvec, matmul, grouped_matmul) use: 'avx512', 'avx2' or 'scalar'.
The best one this CPU runs unless the environment variable QMOE_CPU_SIMD (read on first use) or
set_cpu_simd_level() chose another. Raises ValueError if QMOE_CPU_SIMD names an unknown or
unsupported level.
)doc");
  m.def("set_cpu_simd_level", &set_cpu_simd_level, py::arg("level"), R"doc(
Sets the SIMD level of the CPU kernels for the whole process: 'scalar', 'avx2' or 'avx512'.
Raises ValueError for an unknown level or one this CPU (or build) does not run. Results differ
between levels by fp32 rounding only.
)doc");
  m.def("cpu_simd_levels", &cpu_simd_levels, R"doc(
The SIMD levels of the CPU kernels that this CPU and build run, lowest first.
)doc");
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["version"] = QMOE_VERSION;
#if defined(QMOE_NATIVE_BUILD)
        d["native"] = true;
#else
        d["native"] = false;
#endif
#ifdef QMOE_PY_CUDA
        d["cuda_kernels"] = true;
#else
        d["cuda_kernels"] = false;
#endif
        d["cuda_devices"] = cuda_device_count();
        d["cpu_simd_level"] = cpu_simd_level();
        d["cpu_simd_levels"] = cpu_simd_levels();
        d["gptq_kernel"] = std::string(qmoe::gptq_kernel());
        d["openmp_threads"] = omp_get_max_threads();
        return d;
      },
      R"doc(
What this installation is and runs, as a dict: version, native (built with QMOE_NATIVE, so it
runs only on CPUs like the one that built it), cuda_kernels (built with the CUDA kernels),
cuda_devices, cpu_simd_level, cpu_simd_levels, gptq_kernel (the float32 products of GPTQ and the
Hessian sums: 'avx512', 'avx2' or 'portable'), openmp_threads. Raises ValueError like
cpu_simd_level() when QMOE_CPU_SIMD is invalid.
)doc");

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
