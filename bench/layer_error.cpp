// Layer-level accuracy at equal size: the held-out output error of ternary expert matrices made by
// round to nearest, QMoE's recipe and qmoe's options beyond it, every one brought to the same bits
// per weight (codes, row offsets and levels counted) by rate control, on gptq/'s structured
// synthetic data (gptq/README.md). One command, a markdown table on stdout:
//
//   build/release/bench/bench_layer_error                  # the table of gptq/README.md
//   bench_layer_error --d-model 256 --d-ff 1024 --seeds 3 --targets own,0.85,0.8,0.7 --threads 2
//
// An expert pair per seed: wi (d_ff x d_model) on the generator's activations X, wo (d_model x
// d_ff) on relu(X wi^T); Hessians from --tokens calibration tokens, the error measured on as many
// held-out tokens of the same distribution: ||(W - Q) X_h^T||^2 / ||W X_h^T||^2, summed over wi
// and wo separately (each its own relative error), reported as the mean over seeds and as the
// ratio to QMoE's recipe at the same size (mean over seeds of the per-seed ratio, min and max).
// Target "own": QMoE's recipe at its own size (zero threshold 1/2), every other method at that.
// Codec: qmoe-v2 by default (qmoe-v1's runs of at most 28 symbols cost >= 0.57 bits per weight, so
// with the row offsets and levels a 256-wide row cannot go below 0.875 bits in qmoe-v1).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/reference.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/gptq/synthetic.h"

namespace qmoe {
namespace {

using RM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Args {
  int64_t d_model = 256, d_ff = 1024, tokens = 4096;
  int seeds = 3;
  std::vector<std::string> targets = {"own", "0.85", "0.8", "0.7"};
  int threads = 0;
  double percdamp = 0.1;
  std::vector<std::string> only;  // method names (empty: all)
  std::string codec = "qmoe-v2";  // auto: the smaller of qmoe-v1 and qmoe-p5
};

struct Method {
  const char* name;
  const char* what;
  bool hessian;
  RateKnob knob;
  bool actorder;
  TernaryLevels levels;
  int refit;
};

// The steps from QMoE's recipe to qmoe's rate-distortion recipe (--recipe rd), one at a time.
const Method kMethods[] = {
    {"rtn", "round to nearest, QMoE's levels (zero threshold raised)", false, RateKnob::kThreshold,
     false, TernaryLevels::kMinMax, 0},
    {"qmoe", "QMoE's recipe: GPTQ on (min, max) levels (zero threshold raised)", true,
     RateKnob::kThreshold, false, TernaryLevels::kMinMax, 0},
    {"actorder", "qmoe + act-order", true, RateKnob::kThreshold, true, TernaryLevels::kMinMax, 0},
    {"refit", "qmoe + 4 rounds of GPTQ and level refit", true, RateKnob::kThreshold, false,
     TernaryLevels::kMinMax, 4},
    {"penalty", "qmoe, zeros by the rate-distortion penalty", true, RateKnob::kPenalty, false,
     TernaryLevels::kMinMax, 0},
    {"penalty+refit", "penalty + 4 refit rounds", true, RateKnob::kPenalty, false,
     TernaryLevels::kMinMax, 4},
    {"penalty+refit+fit", "penalty + refit + fitted initial levels", true, RateKnob::kPenalty,
     false, TernaryLevels::kFit, 4},
    {"rd", "--recipe rd: penalty + refit + fit + act-order", true, RateKnob::kPenalty, true,
     TernaryLevels::kFit, 4},
};

struct Layer {
  int64_t rows = 0, cols = 0;
  std::vector<float> w, h, held;  // held: tokens x cols
  double held_norm = 0;
};

struct Pair {
  Layer wi, wo;
};

std::vector<float> relu_product(const std::vector<float>& x, const std::vector<float>& w, int64_t n,
                                int64_t d_in, int64_t d_out) {
  const Eigen::Map<const RM> xm(x.data(), n, d_in), wm(w.data(), d_out, d_in);
  RM y = (xm * wm.transpose()).cwiseMax(0.0f);
  return {y.data(), y.data() + y.size()};
}

double out_sq(const std::vector<float>& d, const std::vector<float>& x, int64_t rows, int64_t cols,
              int64_t n) {
  const Eigen::Map<const RM> dm(d.data(), rows, cols), xm(x.data(), n, cols);
  return (xm.cast<double>() * dm.cast<double>().transpose()).squaredNorm();
}

Pair make_pair(const Args& a, uint64_t seed) {
  const int64_t n = a.tokens;
  const uint64_t s = 1000 * seed;
  Pair p;
  std::vector<float> x = synthetic::activations(2 * n, a.d_model, s + 3);
  p.wi.rows = a.d_ff;
  p.wi.cols = a.d_model;
  p.wi.w = synthetic::weights(a.d_ff, a.d_model, s + 1);
  p.wo.rows = a.d_model;
  p.wo.cols = a.d_ff;
  p.wo.w = synthetic::weights(a.d_model, a.d_ff, s + 2);
  std::vector<float> hid = relu_product(x, p.wi.w, 2 * n, a.d_model, a.d_ff);
  for (auto [layer, in] : {std::pair{&p.wi, &x}, std::pair{&p.wo, &hid}}) {
    HessianAccumulator acc(layer->cols);
    acc.add(in->data(), n);
    layer->h = acc.hessian();
    layer->held.assign(in->begin() + n * layer->cols, in->end());
    layer->held_norm = out_sq(layer->w, layer->held, layer->rows, layer->cols, n);
  }
  return p;
}

double held_error(const Layer& l, const CompressResult& c, int64_t n) {
  std::vector<float> q(static_cast<size_t>(l.rows * l.cols));
  decode_ref(c.matrix.view(), q.data());
  for (size_t i = 0; i < q.size(); ++i) q[i] = l.w[i] - q[i];
  return out_sq(q, l.held, l.rows, l.cols, n) / l.held_norm;
}

GptqOptions options_of(const Method& m, const Args& a) {
  GptqOptions g;
  g.percdamp = a.percdamp;
  g.actorder = m.actorder;
  g.ternary.levels = m.levels;
  g.ternary.refit = m.refit;
  g.threads = a.threads;
  return g;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= s.size()) {
    const size_t j = std::min(s.find(',', i), s.size());
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

int usage(const char* prog) {
  std::fprintf(
      stderr,
      "usage: %s [--d-model N] [--d-ff N] [--tokens N] [--seeds N] [--targets "
      "own,0.85,...] [--percdamp X] [--methods a,b,...] [--codec auto|qmoe-v1|qmoe-v2|qmoe-v3] "
      "[--threads N]\n",
      prog);
  return 2;
}

struct Cell {
  std::vector<double> err, ratio, bits;
};

int run(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) return usage(argv[0]);
    const char* v = argv[++i];
    if (k == "--d-model")
      a.d_model = std::atoll(v);
    else if (k == "--d-ff")
      a.d_ff = std::atoll(v);
    else if (k == "--tokens")
      a.tokens = std::atoll(v);
    else if (k == "--seeds")
      a.seeds = std::atoi(v);
    else if (k == "--targets")
      a.targets = split(v);
    else if (k == "--percdamp")
      a.percdamp = std::atof(v);
    else if (k == "--methods")
      a.only = split(v);
    else if (k == "--threads")
      a.threads = std::atoi(v);
    else if (k == "--codec")
      a.codec = v;
    else
      return usage(argv[0]);
  }
  if (a.d_model < 1 || a.d_ff < 1 || a.tokens < 1 || a.seeds < 1 || a.targets.empty())
    return usage(argv[0]);
  EncodeOptions enc;
  enc.threads = a.threads;
  if (a.codec != "auto") {
    enc.codec = codec_from_name(a.codec);
    if (!enc.codec) return usage(argv[0]);
  }
  std::vector<const Method*> methods;
  for (const Method& m : kMethods)
    if (a.only.empty() || std::find(a.only.begin(), a.only.end(), m.name) != a.only.end() ||
        std::string(m.name) == "qmoe")
      methods.push_back(&m);
  const auto t0 = std::chrono::steady_clock::now();
  // cells[target][method]
  std::map<std::string, std::map<std::string, Cell>> cells;
  for (int seed = 0; seed < a.seeds; ++seed) {
    const Pair p = make_pair(a, static_cast<uint64_t>(seed));
    for (const std::string& target : a.targets) {
      // Per layer: the target size (own: QMoE's at threshold 1/2), then every method at it.
      std::map<std::string, double> err;
      std::map<std::string, double> bits;
      for (const Layer* l : {&p.wi, &p.wo}) {
        double b = 0;
        if (target == "own") {
          GptqOptions g = options_of(kMethods[1], a);
          b = compress_matrix(l->w.data(), l->rows, l->cols, l->h.data(), g, enc).bits_per_weight;
        } else {
          b = std::atof(target.c_str());
        }
        for (const Method* m : methods) {
          RateControl rate;
          rate.target_bits = b;
          rate.knob = m->knob;
          rate.tolerance = 0.002;
          const CompressResult c =
              compress_matrix(l->w.data(), l->rows, l->cols, m->hessian ? l->h.data() : nullptr,
                              options_of(*m, a), enc, rate);
          err[m->name] += 0.5 * held_error(*l, c, a.tokens);  // mean of wi's and wo's
          bits[m->name] += 0.5 * c.bits_per_weight;
        }
      }
      for (const Method* m : methods) {
        Cell& cell = cells[target][m->name];
        cell.err.push_back(err[m->name]);
        cell.ratio.push_back(err[m->name] / err["qmoe"]);
        cell.bits.push_back(bits[m->name]);
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto mean = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return s / static_cast<double>(v.size());
  };
  auto sd = [&](const std::vector<double>& v) {
    if (v.size() < 2) return 0.0;
    const double m = mean(v);
    double s = 0;
    for (double x : v) s += (x - m) * (x - m);
    return std::sqrt(s / static_cast<double>(v.size() - 1));
  };
  std::printf(
      "Expert pair wi %lldx%lld, wo %lldx%lld; %lld calibration and %lld held-out tokens; %d "
      "seeds; percdamp %g; codec %s; %.0f s.\n"
      "Held-out relative output error ||(W-Q)X^T||^2 / ||W X^T||^2 (mean of wi and wo), mean +- "
      "sd over seeds; ratio to qmoe at the same size, mean (min-max) over seeds.\n\n",
      static_cast<long long>(a.d_ff), static_cast<long long>(a.d_model),
      static_cast<long long>(a.d_model), static_cast<long long>(a.d_ff),
      static_cast<long long>(a.tokens), static_cast<long long>(a.tokens), a.seeds, a.percdamp,
      a.codec.c_str(), secs);
  std::printf("| bits / weight | method | bits (mean) | held-out error | ratio to qmoe |\n");
  std::printf("|---|---|---|---|---|\n");
  for (const std::string& target : a.targets) {
    for (const Method* m : methods) {
      const Cell& c = cells[target][m->name];
      std::printf("| %s | `%s` | %.4f | %.4f ± %.4f | %.3f (%.3f–%.3f) |\n", target.c_str(),
                  m->name, mean(c.bits), mean(c.err), sd(c.err), mean(c.ratio),
                  *std::min_element(c.ratio.begin(), c.ratio.end()),
                  *std::max_element(c.ratio.begin(), c.ratio.end()));
    }
  }
  std::printf("\n");
  for (const Method* m : methods) std::printf("- `%s`: %s\n", m->name, m->what);
  return 0;
}

}  // namespace
}  // namespace qmoe

int main(int argc, char** argv) {
  try {
    return qmoe::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_layer_error: %s\n", e.what());
    return 1;
  }
}
