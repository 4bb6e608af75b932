// The ternary-rounding and rate-control flags that `qmoe compress` and `qmoe eval --quantize`
// share (gptq.h: TernaryOptions, RateControl).
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "qmoe/format/error.h"
#include "qmoe/gptq/gptq.h"

namespace qmoe::cli {

struct TernaryFlags {
  std::string recipe, levels = "minmax", knob, scope = "matrix";  // recipe "": the default
  double target_bits = 0, tolerance = RateControl{}.tolerance;
  double zero_threshold = 0.5, zero_penalty = 0;
  int refit = 0;
  CLI::Option* levels_opt = nullptr;
  CLI::Option* refit_opt = nullptr;
};

inline void add_ternary_flags(CLI::App& app, TernaryFlags& f) {
  app.add_option("--recipe", f.recipe,
                 "qmoe (QMoE's levels, rounding to the nearest level: the default without "
                 "--target-bits, and for round to nearest), refit (QMoE's, then one more round of "
                 "GPTQ after a closed-form refit of each row's levels: the default of GPTQ with "
                 "--target-bits, the lowest loss at a size measured, tools/switch_accuracy/"
                 "RESULTS.md; twice GPTQ's time) or rd (rate-distortion: fitted levels, 4 rounds "
                 "of GPTQ and level refit, act-order, and the zero penalty as the --target-bits "
                 "knob); the flags below override it");
  app.add_option("--target-bits", f.target_bits,
                 "aim every expert matrix at this many bits per weight, codes, row offsets and "
                 "levels counted (0 = off): its zero threshold or penalty is searched (qmoe "
                 "compress: a matrix none of whose roundings is that large stays at its largest, "
                 "and the run says how many did)");
  app.add_option("--rate-knob", f.knob,
                 "what --target-bits moves: threshold (default with --recipe qmoe) or penalty "
                 "(default with --recipe rd)");
  app.add_option("--rate-scope", f.scope,
                 "matrix (default: every expert matrix at --target-bits) or all (the mean over "
                 "all expert matrices: every matrix spends the same bits per weight on codes, "
                 "and what a matrix cannot spend goes to the blocks after it)");
  app.add_option("--rate-tolerance", f.tolerance,
                 "bits per weight a matrix may land from --target-bits (default 0.002)");
  app.add_option("--zero-threshold", f.zero_threshold,
                 "ternary rounding: w -> hi above t*hi, lo below t*lo (default 0.5: nearest)");
  app.add_option("--zero-penalty", f.zero_penalty,
                 "ternary rounding: each weight minimises d (w - q)^2 + mu S [q != 0] (default "
                 "0; gptq/README.md)");
  f.levels_opt = app.add_option("--levels", f.levels,
                                "initial ternary levels: minmax (QMoE) or fit (Lloyd, weighted "
                                "by the Hessian diagonal)");
  f.refit_opt = app.add_option(
      "--refit", f.refit,
      "rounds of GPTQ + closed-form refit of each row's levels (0 = none); the best is kept");
}

// The recipe when --recipe is not given: refit or QMoE's, as default_refit() (gptq.h) says.
inline std::string default_recipe(const TernaryFlags& f, bool gptq) {
  return default_refit(gptq, f.target_bits) > 0 ? "refit" : "qmoe";
}

// The options the flags ask for (gptq: the run quantizes with GPTQ, not round to nearest).
// --recipe rd switches `actorder` on.
inline void apply_ternary_flags(const TernaryFlags& f, bool gptq, TernaryOptions& t,
                                RateControl& rate, bool& actorder) {
  const std::string recipe = f.recipe.empty() ? default_recipe(f, gptq) : f.recipe;
  if (recipe != "qmoe" && recipe != "refit" && recipe != "rd")
    throw InvalidArgument("--recipe must be qmoe, refit or rd (not '" + recipe + "')");
  const bool rd = recipe == "rd";
  t.levels = rd ? TernaryLevels::kFit : TernaryLevels::kMinMax;
  t.refit = rd ? 4 : recipe == "refit" ? 1 : 0;
  if (rd) actorder = true;
  if (f.levels_opt && f.levels_opt->count() > 0) t.levels = ternary_levels_from_name(f.levels);
  if (f.refit_opt && f.refit_opt->count() > 0) t.refit = f.refit;
  t.zero_threshold = f.zero_threshold;
  t.zero_penalty = f.zero_penalty;
  rate.target_bits = f.target_bits;
  rate.tolerance = f.tolerance;
  rate.scope = rate_scope_from_name(f.scope);
  rate.knob = f.knob.empty() ? (rd ? RateKnob::kPenalty : RateKnob::kThreshold)
                             : rate_knob_from_name(f.knob);
  GptqOptions g;
  g.ternary = t;
  gptq_validate_options(g, rate);
}

}  // namespace qmoe::cli
