// Switch Transformers models (qmoe/switch): compress_checkpoint (`qmoe compress`),
// CompressedExperts (one compressed MoE layer), switch_eval and calibration_hessians (the C++
// forward pass).
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>

#include "common.h"
#include "qmoe/format/error.h"
#include "qmoe/switch/calibration.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/experts.h"
#include "qmoe/switch/forward.h"

namespace qmoe::python {
namespace {

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
    py::array o = out_array(out_obj);
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
    double zero_threshold, double zero_penalty, std::optional<int> refit, double target_bits,
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
  // refit None: the default recipe's rounds, as `qmoe compress` without --recipe.
  const bool gptq = hessians.has_value() || calib_tokens.has_value();
  opt.ternary = TernaryArgs{levels, zero_threshold, zero_penalty,
                            refit.value_or(qmoe::default_refit(gptq, target_bits))}
                    .get();
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

void bind_switch(py::module_& m) {
  m.def("compress_checkpoint", &compress_checkpoint, py::arg("checkpoint"), py::arg("output"),
        py::kw_only(), py::arg("hessians") = py::none(), py::arg("calib_tokens") = py::none(),
        py::arg("sequential") = true, py::arg("threads") = 0, py::arg("max_memory") = 0,
        py::arg("shard_size") = 0, py::arg("resume") = false, py::arg("cast_bf16") = false,
        py::arg("codec") = "auto", py::arg("target") = "any", py::arg("percdamp") = 0.1,
        py::arg("blocksize") = 128, py::arg("actorder") = false, py::arg("check_disk") = true,
        py::arg("progress") = py::none(), py::arg("note") = py::none(),
        py::arg("levels") = "minmax", py::arg("zero_threshold") = 0.5,
        py::arg("zero_penalty") = 0.0, py::arg("refit") = py::none(), py::arg("target_bits") = 0.0,
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
options as for gptq() (round to nearest uses them too); refit None: 1 with GPTQ (hessians or
calib_tokens) and target_bits, else 0, the default recipe of `qmoe compress`. target_bits,
rate_knob, rate_tolerance:
rate control as for compress_matrix(), per expert matrix (rate_scope="matrix") or for the mean
over all expert matrices (rate_scope="all": every matrix spends the same bits per weight on
codes, and what a matrix cannot spend goes to the blocks after it). check_disk: refuse to start
without enough free disk space.
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
}

}  // namespace qmoe::python
