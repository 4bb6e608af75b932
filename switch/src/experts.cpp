#include "qmoe/switch/experts.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/format/error.h"

namespace qmoe::sw {

void compressed_experts_forward(std::span<const CompressedView> wi,
                                std::span<const CompressedView> wo, const float* x, int64_t n,
                                std::span<const int32_t> expert, std::span<const float> scale,
                                float* y, int threads) {
  const size_t E = wi.size();
  if (E == 0 || wo.size() != E)
    throw InvalidArgument("compressed_experts_forward: " + std::to_string(E) + " wi and " +
                          std::to_string(wo.size()) +
                          " wo matrices (at least one of each, as many wo as wi)");
  const int64_t d_ff = wi[0].rows, d = wi[0].cols;
  for (size_t e = 0; e < E; ++e) {
    if (wi[e].rows != d_ff || wi[e].cols != d || wo[e].rows != d || wo[e].cols != d_ff)
      throw InvalidArgument("compressed_experts_forward: expert " + std::to_string(e) +
                            " has wi [" + std::to_string(wi[e].rows) + ", " +
                            std::to_string(wi[e].cols) + "] and wo [" + std::to_string(wo[e].rows) +
                            ", " + std::to_string(wo[e].cols) + "], expert 0 wi [" +
                            std::to_string(d_ff) + ", " + std::to_string(d) + "]");
  }
  if (n < 0 || static_cast<int64_t>(expert.size()) != n ||
      (!scale.empty() && static_cast<int64_t>(scale.size()) != n))
    throw InvalidArgument("compressed_experts_forward: " + std::to_string(n) + " tokens, " +
                          std::to_string(expert.size()) + " expert indices and " +
                          std::to_string(scale.size()) + " scales");
  std::vector<std::vector<int32_t>> tokens(E), slots(E);
  for (int64_t t = 0; t < n; ++t) {
    const int32_t e = expert[static_cast<size_t>(t)];
    if (e >= static_cast<int64_t>(E))
      throw InvalidArgument("compressed_experts_forward: token " + std::to_string(t) +
                            " routed to expert " + std::to_string(e) + " of " + std::to_string(E));
  }
  // Token rows per expert in row order; dropped rows are zero.
  int64_t assignments = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t e = expert[static_cast<size_t>(t)];
    if (e < 0) {
      std::memset(y + t * d, 0, sizeof(float) * static_cast<size_t>(d));
      continue;
    }
    tokens[static_cast<size_t>(e)].push_back(static_cast<int32_t>(t));
    ++assignments;
  }
  if (assignments == 0) return;
  std::vector<std::vector<float>> factor(E);
  std::vector<cpu::ExpertBatch> up, down;
  int32_t next = 0;
  for (size_t e = 0; e < E; ++e) {
    if (tokens[e].empty()) continue;
    for (int32_t t : tokens[e]) {
      slots[e].push_back(next++);
      if (!scale.empty()) factor[e].push_back(scale[static_cast<size_t>(t)]);
    }
    up.push_back({wi[e], tokens[e], slots[e], {}});
    down.push_back({wo[e], slots[e], tokens[e], factor[e]});
  }
  std::vector<float> hidden(static_cast<size_t>(assignments * d_ff));
  cpu::MatmulOptions opt;
  opt.threads = threads;
  cpu::grouped_matmul(up, x, n, d, hidden.data(), assignments, d_ff, opt);
  for (float& h : hidden) h = std::max(h, 0.0f);  // ReLU, as CompressedExpert::forward
  cpu::grouped_matmul(down, hidden.data(), assignments, d_ff, y, n, d, opt);
}

}  // namespace qmoe::sw
