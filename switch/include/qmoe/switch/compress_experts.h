// Compression of every expert of a Switch model from calibration tokens, QMoE-style: GPTQ with a
// ternary grid on Hessians gathered by the sequential runner (calibration.h), or round-to-nearest.
// The building block for `qmoe compress --calib-tokens` and for accuracy experiments; the caller
// decides where compressed matrices go (e.g. a ContainerWriter) through the sink.
#pragma once

#include <cstdint>
#include <functional>

#include "qmoe/gptq/gptq.h"
#include "qmoe/switch/calibration.h"

namespace qmoe::sw {

struct ExpertCompressOptions {
  CalibrationOptions calibration;  // which tokens count; capacity (0 = none, QMoE)
  // true (QMoE): each block's output is recomputed with its compressed experts before the next
  // block is calibrated. false: every Hessian comes from the original model.
  bool sequential = true;
  bool rtn = false;  // round-to-nearest ternary; calibration tokens are not used
  GptqOptions gptq;  // grid must be ternary (kTernary or kTernarySymmetric); its ternary options
                     // apply to round to nearest too
  RateControl rate;  // a size per expert matrix (off by default)
  EncodeOptions encode;
  // Tokens per expert kept for its Hessians: floor(m * tokens of the stack / experts) (QMoE's
  // cap, hessian.h expert_token_cap()); 0 = all tokens.
  double token_cap_multiplier = 4.0;
  int threads = 0;  // OpenMP threads for GPTQ (0 = default)
};

struct CompressedExpertResult {
  Stack stack = Stack::kEncoder;
  int64_t block = 0;
  int64_t expert = 0;
  qmoe::CompressResult wi;  // gptq.h: encoded matrix + GPTQ status and losses
  qmoe::CompressResult wo;
  int64_t tokens = 0;  // calibration tokens in its Hessians (after the cap)
};

// Compresses every expert of every sparse block, in stack order (encoder blocks, then decoder),
// replacing each in `model` by a sw::CompressedExpert that owns the matrices, and hands each
// result to `sink` (optional; called in order, from the calling thread). The model's experts must
// be dense (InvalidArgument otherwise). Deterministic for any thread count.
void compress_experts(SwitchModel& model, const TokenPairs& calib, const ExpertCompressOptions& opt,
                      const std::function<void(CompressedExpertResult&)>& sink = {});

}  // namespace qmoe::sw
