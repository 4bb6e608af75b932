// The encoder (qmoe/encoder): ternarize_rtn, encode, transcode, and the qmoe-v2 / qmoe-v3
// dictionaries it builds.
#include <pybind11/stl.h>

#include <cstring>
#include <optional>

#include "common.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"

namespace qmoe::python {
namespace {

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

// The options of encode() and transcode(). fitted_p0 may come by its deprecated spelling v2_p0
// (with a DeprecationWarning); not both.
qmoe::EncodeOptions encode_options(const std::string& codec, const std::string& target, int threads,
                                   int v2_max_width, std::optional<double> fitted_p0,
                                   std::optional<double> v2_p0) {
  qmoe::EncodeOptions opt;
  opt.codec = parse_codec(codec, true);
  opt.target = parse_target(target);
  opt.threads = threads;
  opt.v2_max_width = v2_max_width;
  opt.fitted_p0 = fitted_p0;
  if (v2_p0) {
    if (fitted_p0) bad_arg("fitted_p0 and v2_p0 (its deprecated spelling) given together");
    if (PyErr_WarnEx(PyExc_DeprecationWarning, "v2_p0 is deprecated: use fitted_p0", 2) != 0)
      throw py::error_already_set();
    opt.fitted_p0 = v2_p0;
  }
  return opt;
}

PyCompressed encode(const py::handle& symbols, const py::handle& levels, const std::string& codec,
                    const std::string& original_dtype, int threads, int v2_max_width,
                    std::optional<double> fitted_p0, const std::string& target,
                    std::optional<double> v2_p0) {
  const qmoe::EncodeOptions opt =
      encode_options(codec, target, threads, v2_max_width, fitted_p0, v2_p0);
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
                              int v2_max_width, std::optional<double> fitted_p0,
                              const std::string& target, std::optional<double> v2_p0) {
  const qmoe::EncodeOptions opt =
      encode_options(codec, target, threads, v2_max_width, fitted_p0, v2_p0);
  qmoe::CompressedMatrix out;
  {
    py::gil_scoped_release nogil;
    out = qmoe::transcode(m.view, opt);
  }
  return PyCompressed::owning(std::move(out), m.original_dtype);
}

}  // namespace

void bind_encoder(py::module_& m) {
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
        py::arg("v2_max_width") = 63, py::arg("fitted_p0") = py::none(), py::arg("target") = "any",
        py::arg("v2_p0") = py::none(), R"doc(
Encodes a ternary matrix. symbols: uint8 (rows, cols), each 0, 1 or 2; levels: (rows, 2)
bfloat16 bit patterns (uint16 or ml_dtypes.bfloat16), as returned by ternarize_rtn() or gptq().
codec: "qmoe-v1" (QMoE's dictionary codes), "qmoe-v2" (a dictionary fitted to the matrix, ~10%
smaller at 88.5% zeros, much smaller at higher sparsity; the CPU and CUDA kernels read it as is),
"qmoe-v3" (qmoe-v2 with rows coded in pairs: ~3% larger than qmoe-v2 at 88.5% zeros),
"qmoe-g4" (gap tokens over groups of 4 rows: the smallest at 88.5% zeros and the fastest at one
token on x86 CPUs; qmoe-v3 and qmoe-g4 are CPU codecs, converted to qmoe-v2 when uploaded to
a GPU), "qmoe-p5" (base-3 packing) or "auto": the codec of `target` ("any": qmoe-v1, "cpu":
qmoe-g4, "gpu": qmoe-v2), or qmoe-p5 where that is smaller.
v2_max_width: qmoe-v2's longest dictionary entry (1..63 symbols; qmoe-v3's entries are always up
to 63 columns wide). fitted_p0: the zero fraction a qmoe-v2 or qmoe-v3 dictionary is fitted to
(None: the matrix's own, rounded to a multiple of 1/64). v2_p0: the deprecated name of fitted_p0.
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
        py::arg("threads") = 0, py::arg("v2_max_width") = 63, py::arg("fitted_p0") = py::none(),
        py::arg("target") = "any", py::arg("v2_p0") = py::none(),
        R"doc(
The same matrix (symbols and levels) encoded in another codec: e.g. a qmoe-v1 matrix of an
existing container as qmoe-v2, or back; a qmoe-v3 or qmoe-g4 matrix as qmoe-v2 for the GPU.
codec (default "auto": the codec of target), threads, v2_max_width, fitted_p0 and target as for
encode(); the original dtype is kept.
Raises ValueError for an unknown codec or target.
)doc");
}

}  // namespace qmoe::python
