// GPTQ (qmoe/gptq): HessianAccumulator and Hessian files, expert_token_cap, gptq and its
// GptqResult, compress_matrix (GPTQ then encode, one matrix).
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <filesystem>
#include <map>

#include "common.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"

namespace qmoe::python {
namespace {

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

}  // namespace

qmoe::RateControl rate_control(double target_bits, const std::string& knob, double tolerance,
                               const std::string& scope) {
  qmoe::RateControl r;
  r.target_bits = target_bits;
  r.knob = qmoe::rate_knob_from_name(knob);
  r.tolerance = tolerance;
  r.scope = qmoe::rate_scope_from_name(scope);
  return r;
}

void bind_gptq(py::module_& m) {
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
}

}  // namespace qmoe::python
