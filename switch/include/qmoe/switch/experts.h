// One top-1 MoE layer's compressed experts in two calls of decoder_cpu's grouped kernel: the
// building block that runs a compressed Switch layer from frameworks which do the routing
// themselves (the Python bindings, qmoe.torch).
#pragma once

#include <cstdint>
#include <span>

#include "qmoe/format/matrix.h"

namespace qmoe::sw {

// For every token t (row of x, n rows of d_model floats) with e = expert[t] >= 0:
//   y[t] = scale[t] * wo_e · ReLU(wi_e · x[t])       (scale empty: factor 1)
// and y[t] = 0 for expert[t] < 0 (a token dropped over the expert capacity: its feed-forward
// output is zero, as in transformers 5). wi[e] is [d_ff, d_model], wo[e] [d_model, d_ff], the
// same shapes for every e. The up projections run as one grouped call over every active expert,
// the down projections as a second one scattered back to the tokens' rows; an expert's tokens are
// taken in row order, so each expert computes exactly what CompressedExpert::forward computes on
// its tokens, and the result is bit-identical for any thread count (`threads`: 0 = OpenMP's
// default). InvalidArgument for mismatched shapes or sizes, an expert index >= wi.size(), or when
// this build has no CPU kernels (decoder_cpu).
void compressed_experts_forward(std::span<const CompressedView> wi,
                                std::span<const CompressedView> wo, const float* x, int64_t n,
                                std::span<const int32_t> expert, std::span<const float> scale,
                                float* y, int threads = 0);

}  // namespace qmoe::sw
