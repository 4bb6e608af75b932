// One sparse feed-forward layer of a Switch Transformer, computed with two grouped calls and no
// expert ever expanded: tokens are routed top-1, every expert's up projection runs on its tokens
// (rows of H), ReLU, then every down projection writes into its tokens' output rows, scaled by the
// router probability. Checked against one reference matvec per token.
//
//   moe_layer CONTAINER PREFIX   experts PREFIX.expert_<e>.wi.weight / .wo.weight of a container,
//                                e.g. encoder.block.1.layer.1.mlp.experts (from `qmoe compress`)
//   moe_layer                    8 random experts, d_model 256, d_ff 1024, ternarized and encoded
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"
#include "qmoe/format/reference.h"

namespace {

struct Expert {
  qmoe::CompressedView wi;  // d_ff x d_model
  qmoe::CompressedView wo;  // d_model x d_ff
};

qmoe::CompressedMatrix random_expert_matrix(int64_t rows, int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (float& v : w) v = normal(rng);
  return qmoe::encode(qmoe::ternarize_rtn(w.data(), rows, cols));
}

}  // namespace

int main(int argc, char** argv) try {
  std::vector<Expert> experts;
  std::vector<qmoe::CompressedMatrix> owned;  // the synthetic experts' storage
  std::optional<qmoe::Container> container;
  if (argc > 2) {
    container = qmoe::Container::open(argv[1]);
    for (int e = 0;; ++e) {
      const std::string base = std::string(argv[2]) + ".expert_" + std::to_string(e);
      const auto* wi = container->find_compressed(base + ".wi.weight");
      const auto* wo = container->find_compressed(base + ".wo.weight");
      if (wi == nullptr || wo == nullptr) break;
      experts.push_back({wi->view, wo->view});
    }
    if (experts.empty()) {
      std::fprintf(stderr, "%s: no compressed experts %s.expert_<e>.wi/wo.weight\n", argv[1],
                   argv[2]);
      return 1;
    }
  } else {
    std::mt19937_64 rng(11);
    for (int e = 0; e < 8; ++e) {
      owned.push_back(random_expert_matrix(1024, 256, rng));
      owned.push_back(random_expert_matrix(256, 1024, rng));
    }
    for (size_t e = 0; e < owned.size(); e += 2)
      experts.push_back({owned[e].view(), owned[e + 1].view()});
  }
  const int64_t d_model = experts[0].wi.cols, d_ff = experts[0].wi.rows;
  for (const Expert& ex : experts) {
    if (ex.wi.cols != d_model || ex.wi.rows != d_ff || ex.wo.rows != d_model ||
        ex.wo.cols != d_ff) {
      std::fprintf(stderr, "experts of different shapes\n");
      return 1;
    }
  }

  // Tokens and a stand-in router: token t goes to expert route[t] with probability prob[t].
  const int64_t tokens = 64;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.2f, 1.0f);
  std::vector<float> x(static_cast<size_t>(tokens * d_model));
  for (float& v : x) v = normal(rng);
  std::vector<int32_t> route(static_cast<size_t>(tokens));
  std::vector<float> prob(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    route[t] = static_cast<int32_t>(rng() % experts.size());
    prob[t] = uniform(rng);
  }

  // Per expert: its tokens (rows of X and of the output), their slots in H and their scales.
  const size_t ne = experts.size();
  std::vector<std::vector<int32_t>> tok(ne), slot(ne);
  std::vector<std::vector<float>> scale(ne);
  int32_t next_slot = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const size_t e = static_cast<size_t>(route[t]);
    tok[e].push_back(static_cast<int32_t>(t));
    slot[e].push_back(next_slot++);
    scale[e].push_back(prob[t]);
  }
  std::vector<qmoe::cpu::ExpertBatch> up, down;
  for (size_t e = 0; e < ne; ++e) {
    up.push_back({experts[e].wi, tok[e], slot[e], {}});          // H[slot] = Wi X[token]
    down.push_back({experts[e].wo, slot[e], tok[e], scale[e]});  // Y[token] = p Wo relu(H[slot])
  }
  std::vector<float> h(static_cast<size_t>(tokens * d_ff)),
      y(static_cast<size_t>(tokens * d_model));
  qmoe::cpu::grouped_matmul(up, x.data(), tokens, d_model, h.data(), tokens, d_ff);
  for (float& v : h) v = std::max(v, 0.0f);
  qmoe::cpu::grouped_matmul(down, h.data(), tokens, d_ff, y.data(), tokens, d_model);

  // Reference: token by token, with the specification's decoder.
  double err = 0.0, norm = 0.0;
  std::vector<float> hr(static_cast<size_t>(d_ff)), yr(static_cast<size_t>(d_model));
  for (int64_t t = 0; t < tokens; ++t) {
    const Expert& ex = experts[static_cast<size_t>(route[t])];
    qmoe::matvec_ref(ex.wi, x.data() + t * d_model, hr.data());
    for (float& v : hr) v = std::max(v, 0.0f);
    qmoe::matvec_ref(ex.wo, hr.data(), yr.data());
    for (int64_t c = 0; c < d_model; ++c) {
      const double want = static_cast<double>(prob[t]) * yr[c];
      err = std::max(err, std::fabs(y[t * d_model + c] - want));
      norm = std::max(norm, std::fabs(want));
    }
  }
  std::printf(
      "%zu experts, d_model %lld, d_ff %lld, %lld tokens top-1: max |y - reference| = %.3g "
      "(max |y| = %.3g)\n",
      ne, static_cast<long long>(d_model), static_cast<long long>(d_ff),
      static_cast<long long>(tokens), err, norm);
  return err <= 1e-4 * (norm + 1.0) ? 0 : 1;
} catch (const std::exception& ex) {
  std::fprintf(stderr, "moe_layer: %s\n", ex.what());
  return 1;
}
