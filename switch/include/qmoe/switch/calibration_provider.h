// Hessians for `qmoe compress` from calibration tokens run through the C++ forward pass: the
// HessianProvider (compress.h) of QMoE's sequential calibration.
//
// At begin_block(stack, b) the runner (calibration.h) advances the calibration batch through every
// block before b, then through b's attention and FF layer norm and routing. hessian(m) gathers the
// inputs of matrix m from the tokens routed to its expert — wi: the layer-normed FF inputs; wo:
// ReLU(wi · x) computed with the original wi — and returns (2/n) XᵀX over the first n of them
// (QMoE's per-expert token cap). At end_block(stack, b, result), when sequential, every expert of
// the block is replaced by its compressed matrices result(m) (run through the CPU kernels), and
// the block's output — the next block's input — is computed with them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>

#include "qmoe/switch/calibration.h"
#include "qmoe/switch/compress.h"

namespace qmoe::sw {

struct CalibrationProviderOptions {
  CalibrationOptions calibration;  // tokens that count (excluded ids), capacity (0 = none)
  bool sequential = true;          // recompute each block with its compressed experts (QMoE)
  double token_cap_multiplier =
      4.0;  // keep at most floor(m * tokens / experts) per expert; 0 = all
};

// Loads `checkpoint` (dense experts, as the forward pass needs them) and the token file
// (format/SPEC.md section 13; ids checked against the vocabulary). FormatError naming the file for
// a bad checkpoint or token file. The provider must be used for one compress_checkpoint() run of
// the same checkpoint, whose calls come in the order compress.h documents; hessian() is
// thread-safe. Memory: the model (as stored) plus, per block, tokens x (d_model + d_ff) floats.
// Throws Error when this build has no GPTQ.
std::unique_ptr<HessianProvider> open_calibration(const std::filesystem::path& checkpoint,
                                                  const std::filesystem::path& tokens,
                                                  const CalibrationProviderOptions& opt = {});

}  // namespace qmoe::sw
