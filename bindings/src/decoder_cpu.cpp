// The CPU kernels (qmoe/decoder_cpu): CompressedMatrix.matvec / .matmul, grouped_matmul (one MoE
// layer's experts in one call) and the SIMD level they run at.
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "common.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/format/error.h"

namespace qmoe::python {
namespace {

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
    py::array o = out_array(out_obj);
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

void set_cpu_simd_level(const std::string& name) {
  const auto l = qmoe::cpu::simd_level_from_name(name);
  if (!l) throw qmoe::InvalidArgument("unknown SIMD level '" + name + "' (scalar, avx2 or avx512)");
  qmoe::cpu::set_simd_level(*l);
}

}  // namespace

std::string cpu_simd_level() {
  return std::string(qmoe::cpu::simd_level_name(qmoe::cpu::simd_level()));
}

std::vector<std::string> cpu_simd_levels() {
  std::vector<std::string> out;
  for (auto l : qmoe::cpu::supported_simd_levels()) out.emplace_back(qmoe::cpu::simd_level_name(l));
  return out;
}

void bind_decoder_cpu(py::module_& m, py::class_<PyCompressed>& matrix) {
  matrix
      .def("matvec", &matvec, py::arg("x"), py::kw_only(), py::arg("bf16") = false,
           py::arg("threads") = 0, py::arg("int8_activations") = true, R"doc(
y = W x straight from the codes (the CPU kernels; fp32 sums). x: 1-D float32, float16 or bfloat16
(uint16 bit patterns with bf16=True) of cols elements, C-contiguous. threads: OpenMP threads
(0 = default); the result does not depend on it. int8_activations: for a qmoe-g4 matrix on an x86
CPU (the AVX2 and AVX-512 kernels), x is rounded to int8 (scale 127 / max|x|) and summed in
integers, 2-4 times as fast; each output is then within sum_c |W[r, c]| * max|x| / 254 of the
float result.
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
)doc");

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
}

}  // namespace qmoe::python
