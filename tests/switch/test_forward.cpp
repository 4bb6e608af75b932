// Golden tests of the forward pass against transformers 5.25.0 (fixtures/ made by
// tools/make_switch_fixtures.py), and its determinism.
#include <omp.h>

#include <cstring>

#include <gtest/gtest.h>

#include "qmoe/format/reference.h"
#include "qmoe/switch/experts.h"
#include "qmoe/switch/forward.h"
#include "test_util.h"

#include "qmoe/encoder/encode.h"

namespace qmoe::sw::test {
namespace {

struct GoldenCase {
  const char* name;
};

class Golden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(Golden, MatchesTransformers) {
  const auto dir = fixture(GetParam().name);
  const SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors", m.config.vocab_size);
  const auto ref = SafetensorsFile::open(dir / "expected.safetensors");
  ForwardOptions opt;
  opt.expert_capacity = std::stoll(ref.metadata().at("expert_capacity"));
  ASSERT_EQ(ref.metadata().at("transformers"), "5.25.0");

  ForwardTrace tr;
  const RowMatrix enc = encode(m, pairs, opt, &tr);
  const RowMatrix dec = decode(m, pairs, enc, opt, &tr);
  const RowMatrix lg = logits(m, dec);
  ASSERT_EQ(tr.encoder_blocks.size(), m.encoder.size());
  ASSERT_EQ(tr.decoder_blocks.size(), m.decoder.size());
  double worst = 0;
  auto check = [&](const std::string& name, const RowMatrix& ours) {
    const double err = normalised_error(ref, name, ours);
    worst = std::max(worst, err);
    EXPECT_LE(err, kGoldenTol) << name;
  };
  for (size_t b = 0; b < tr.encoder_blocks.size(); ++b)
    check("encoder.block." + std::to_string(b), tr.encoder_blocks[b]);
  check("encoder.final", tr.encoder_final);
  for (size_t b = 0; b < tr.decoder_blocks.size(); ++b)
    check("decoder.block." + std::to_string(b), tr.decoder_blocks[b]);
  check("logits", lg);
  std::printf("%s: worst normalised error %.3g (tolerance %.0e)\n", GetParam().name, worst,
              kGoldenTol);

  const LossResult loss = cross_entropy(m, pairs, opt);
  const float ref_loss = ref.as<float>(*ref.find("loss"), DType::kF32)[0];
  EXPECT_EQ(loss.targets, static_cast<int64_t>(pairs.decoder_targets.size()));
  // The loss as `qmoe eval` reports it: within 2e-5 of transformers', relative.
  EXPECT_NEAR(loss.mean(), ref_loss, 2e-5 * ref_loss);
  std::printf("%s: loss %.7f, transformers %.7f, relative difference %.2g\n", GetParam().name,
              loss.mean(), static_cast<double>(ref_loss),
              std::abs(loss.mean() - ref_loss) / ref_loss);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Golden,
                         ::testing::Values(GoldenCase{"every_other_f32"}, GoldenCase{"dropped_f32"},
                                           GoldenCase{"untied_f32"}, GoldenCase{"all_sparse_bf16"}),
                         [](const auto& p) { return std::string(p.param.name); });

class Dropping : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(Dropping, CapacityDropsTokensInFixture) {
  // The capacity of these fixtures must actually drop tokens, else the golden test would not
  // cover the dropped-token path.
  const auto dir = fixture(GetParam().name);
  const SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  const auto ref = SafetensorsFile::open(dir / "expected.safetensors");
  ForwardOptions opt;
  opt.expert_capacity = std::stoll(ref.metadata().at("expert_capacity"));
  const SeqOffsets seqs = encoder_seqs(pairs);
  const int64_t b = m.encoder[0].ff.sparse ? 0 : 1;
  RowMatrix h = embed(m, Stack::kEncoder, pairs.encoder_ids), x;
  for (int64_t i = 0; i < b; ++i) {
    self_attention_layer(m, Stack::kEncoder, i, seqs, h);
    feed_forward_layer(m, Stack::kEncoder, i, seqs, h, opt);
  }
  self_attention_layer(m, Stack::kEncoder, b, seqs, h);
  rms_norm(h, m.encoder[static_cast<size_t>(b)].ff.layer_norm, m.config.layer_norm_epsilon, x);
  const Routing r = route(m.encoder[static_cast<size_t>(b)].ff, x, seqs, opt);
  int64_t dropped = 0, kept = 0;
  for (auto d : r.dropped) dropped += d;
  for (const auto& t : r.tokens_of) kept += static_cast<int64_t>(t.size());
  EXPECT_GT(dropped, 0);
  EXPECT_EQ(dropped + kept, x.rows());
  // A dropped token's FF output is zero: the layer leaves its row of h as it was (the residual
  // alone), bit for bit; every kept token's row changes.
  RowMatrix out = h;
  feed_forward_apply(m.encoder[static_cast<size_t>(b)].ff, x, &r, out);
  for (int64_t t = 0; t < x.rows(); ++t) {
    if (r.dropped[static_cast<size_t>(t)])
      EXPECT_EQ(0, std::memcmp(out.row(t).data(), h.row(t).data(), sizeof(float) * h.cols()))
          << "dropped token " << t;
    else
      EXPECT_NE(0, std::memcmp(out.row(t).data(), h.row(t).data(), sizeof(float) * h.cols()))
          << "kept token " << t;
  }
  // Without a limit nothing is dropped and the loss changes.
  const double with_cap = cross_entropy(m, pairs, opt).mean();
  const double no_cap = cross_entropy(m, pairs, ForwardOptions{}).mean();
  EXPECT_NE(with_cap, no_cap);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Dropping,
                         ::testing::Values(GoldenCase{"dropped_f32"},
                                           GoldenCase{"all_sparse_bf16"}),
                         [](const auto& p) { return std::string(p.param.name); });

TEST(Golden, UntiedStacksEmbedWithTheirOwnMatrices) {
  // transformers 5 saves untied checkpoints with encoder.embed_tokens.weight and
  // decoder.embed_tokens.weight apart from shared.weight; each stack embeds with its own.
  for (const char* name : {"untied_f32", "all_sparse_bf16"}) {
    const SwitchModel m = SwitchModel::load(fixture(name));
    ASSERT_FALSE(m.config.tie_word_embeddings) << name;
    ASSERT_NE(m.encoder_embed.data, nullptr) << name;
    ASSERT_NE(m.decoder_embed.data, nullptr) << name;
    const int64_t n = m.config.vocab_size * m.config.d_model;
    EXPECT_EQ(m.embedding(Stack::kEncoder).data, m.encoder_embed.data);
    EXPECT_EQ(m.embedding(Stack::kDecoder).data, m.decoder_embed.data);
    EXPECT_NE(0, std::memcmp(m.encoder_embed.data, m.shared.data, sizeof(float) * n)) << name;
    EXPECT_NE(0, std::memcmp(m.decoder_embed.data, m.shared.data, sizeof(float) * n)) << name;
    const std::vector<int32_t> ids{5};
    EXPECT_NE(embed(m, Stack::kEncoder, ids), embed(m, Stack::kDecoder, ids)) << name;
  }
  // Tied: one matrix for both stacks.
  const SwitchModel t = SwitchModel::load(fixture("every_other_f32"));
  EXPECT_EQ(t.encoder_embed.data, nullptr);
  EXPECT_EQ(t.embedding(Stack::kEncoder).data, t.shared.data);
  EXPECT_EQ(t.embedding(Stack::kDecoder).data, t.shared.data);
}

TEST(Forward, BitIdenticalForAnyThreadCount) {
  const auto dir = fixture("every_other_f32");
  const SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  const int saved = omp_get_max_threads();
  std::vector<RowMatrix> outs;
  for (int t : {1, 2, 3, 8}) {
    omp_set_num_threads(t);
    const RowMatrix enc = encode(m, pairs);
    outs.push_back(logits(m, decode(m, pairs, enc)));
  }
  omp_set_num_threads(saved);
  for (size_t i = 1; i < outs.size(); ++i) {
    ASSERT_EQ(outs[i].size(), outs[0].size());
    EXPECT_EQ(0, std::memcmp(outs[i].data(), outs[0].data(),
                             sizeof(float) * static_cast<size_t>(outs[0].size())))
        << "thread count variant " << i;
  }
}

TEST(Forward, RaggedBatchMatchesOnePairAtATime) {
  const auto dir = fixture("every_other_f32");
  const SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  const LossResult all = cross_entropy(m, pairs);
  LossResult sum;
  for (int64_t p = 0; p < pairs.num_pairs(); ++p) {
    const LossResult one = cross_entropy(m, pairs.slice(p, p + 1));
    sum.nll_sum += one.nll_sum;
    sum.targets += one.targets;
  }
  EXPECT_EQ(all.targets, sum.targets);
  EXPECT_NEAR(all.nll_sum, sum.nll_sum, 1e-4 * all.nll_sum);
  const EvalResult ev = evaluate(m, pairs, 2);
  EXPECT_NEAR(ev.loss.mean(), all.mean(), 1e-4);
  EXPECT_EQ(ev.encoder_tokens, static_cast<int64_t>(pairs.encoder_ids.size()));
}

TEST(Forward, IgnoredTargetsAreNotCounted) {
  const auto dir = fixture("every_other_f32");
  const SwitchModel m = SwitchModel::load(dir);
  TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  pairs.decoder_targets[2] = -100;
  const LossResult l = cross_entropy(m, pairs);
  EXPECT_EQ(l.targets, static_cast<int64_t>(pairs.decoder_targets.size()) - 1);
  const auto shifted = shift_right(m, pairs.decoder(0));
  EXPECT_EQ(shifted[0], m.config.decoder_start_token_id);
  EXPECT_EQ(shifted[3], m.config.pad_token_id);  // the -100 at 2 feeds position 3 as pad
}

TEST(Forward, RelativePositionBuckets) {
  // Values of T5's bucketing (32 buckets, max distance 128), worked by hand from its definition.
  EXPECT_EQ(relative_position_bucket(0, true, 32, 128), 0);
  EXPECT_EQ(relative_position_bucket(3, true, 32, 128), 19);
  EXPECT_EQ(relative_position_bucket(-3, true, 32, 128), 3);
  EXPECT_EQ(relative_position_bucket(-8, true, 32, 128), 8);  // 8 + floor(log(1)/log(16)*8) = 8
  EXPECT_EQ(relative_position_bucket(-1000, true, 32, 128), 15);
  EXPECT_EQ(relative_position_bucket(1000, true, 32, 128), 31);
  EXPECT_EQ(relative_position_bucket(5, false, 32, 128), 0);  // future: bucket 0 in the decoder
  EXPECT_EQ(relative_position_bucket(-5, false, 32, 128), 5);
  EXPECT_EQ(relative_position_bucket(-16, false, 32, 128), 16);  // 16 + floor(log(1)) = 16
  EXPECT_EQ(relative_position_bucket(-500, false, 32, 128), 31);
}

TEST(Experts, CompressedExpertEqualsDenseExpertOnDecodedWeights) {
  const auto dir = fixture("every_other_f32");
  const SwitchModel m = SwitchModel::load(dir);
  const auto& dense = dynamic_cast<const DenseExpert&>(*m.encoder[1].ff.experts[2]);
  for (Codec codec : {Codec::kV1, Codec::kV2, Codec::kP5}) {
    EncodeOptions eo;
    eo.codec = codec;
    CompressedMatrix wi =
        encode(ternarize_rtn(dense.wi().t.data, dense.wi().out, dense.wi().in), eo);
    CompressedMatrix wo =
        encode(ternarize_rtn(dense.wo().t.data, dense.wo().out, dense.wo().in), eo);
    Linear li, lo;
    li.out = wi.rows, li.in = wi.cols, li.t.owned.resize(static_cast<size_t>(wi.rows * wi.cols));
    lo.out = wo.rows, lo.in = wo.cols, lo.t.owned.resize(static_cast<size_t>(wo.rows * wo.cols));
    decode_ref(wi.view(), li.t.owned.data());
    decode_ref(wo.view(), lo.t.owned.data());
    li.t.data = li.t.owned.data();
    lo.t.data = lo.t.owned.data();
    const DenseExpert ref(std::move(li), std::move(lo));
    const auto comp = CompressedExpert::owning(std::move(wi), std::move(wo));
    for (int64_t n : {0, 1, 7, 33}) {
      RowMatrix x = RowMatrix::Random(std::max<int64_t>(n, 1), m.config.d_model);
      RowMatrix y1(std::max<int64_t>(n, 1), m.config.d_model), y2 = y1;
      RowMatrix h1(std::max<int64_t>(n, 1), m.config.d_ff), h2 = h1;
      ref.forward(x.data(), n, h1.data(), y1.data());
      comp->forward(x.data(), n, h2.data(), y2.data());
      if (n == 0) continue;
      // The fused kernels sum in another order than Eigen: normalised error bound as for them.
      EXPECT_LE((y1 - y2).cwiseAbs().maxCoeff(), 1e-5 * std::max(1.0f, y1.cwiseAbs().maxCoeff()))
          << "n=" << n << " codec " << static_cast<int>(codec);
      EXPECT_LE((h1 - h2).cwiseAbs().maxCoeff(), 1e-5 * std::max(1.0f, h1.cwiseAbs().maxCoeff()));
      // The _ref path is the same arithmetic as the dense expert: bit-identical.
      RowMatrix y3(n, m.config.d_model);
      compressed_linear_forward_ref(comp->wo(), h1.data(), n, y3.data());
      RowMatrix y4(n, m.config.d_model);
      linear_forward(ref.wo().map(), h1.data(), n, y4.data());
      EXPECT_EQ(0,
                std::memcmp(y3.data(), y4.data(), sizeof(float) * static_cast<size_t>(y3.size())));
    }
  }
}

// compressed_experts_forward (the layer call of the Python bindings): each routed token's row is
// scale * CompressedExpert::forward of its expert, bit for bit; dropped tokens (-1) get zeros.
TEST(Experts, CompressedExpertsForwardEqualsPerExpertCalls) {
  const SwitchModel m = SwitchModel::load(fixture("every_other_f32"));
  const FeedForward& ff = m.encoder[1].ff;
  std::vector<std::shared_ptr<CompressedExpert>> comp;
  std::vector<CompressedView> wi, wo;
  for (const auto& e : ff.experts) {
    const auto& d = dynamic_cast<const DenseExpert&>(*e);
    comp.push_back(
        CompressedExpert::owning(encode(ternarize_rtn(d.wi().t.data, d.wi().out, d.wi().in)),
                                 encode(ternarize_rtn(d.wo().t.data, d.wo().out, d.wo().in))));
    wi.push_back(comp.back()->wi());
    wo.push_back(comp.back()->wo());
  }
  const int64_t n = 37, d = m.config.d_model;
  const RowMatrix x = RowMatrix::Random(n, d);
  std::vector<int32_t> expert(static_cast<size_t>(n));
  std::vector<float> scale(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    expert[static_cast<size_t>(t)] = t % 7 == 3 ? -1 : static_cast<int32_t>((t * 5) % 3);
    scale[static_cast<size_t>(t)] = 0.25f + 0.01f * static_cast<float>(t);
  }
  for (int threads : {1, 2}) {
    RowMatrix y = RowMatrix::Constant(n, d, 7.0f);
    compressed_experts_forward(wi, wo, x.data(), n, expert, scale, y.data(), threads);
    // Reference: each expert's forward on all of its tokens at once, in row order.
    RowMatrix want = RowMatrix::Zero(n, d);
    for (size_t e = 0; e < comp.size(); ++e) {
      std::vector<int64_t> rows;
      for (int64_t t = 0; t < n; ++t)
        if (expert[static_cast<size_t>(t)] == static_cast<int32_t>(e)) rows.push_back(t);
      const auto k = static_cast<int64_t>(rows.size());
      if (k == 0) continue;
      RowMatrix xin(k, d), out(k, d);
      for (int64_t i = 0; i < k; ++i) xin.row(i) = x.row(rows[static_cast<size_t>(i)]);
      comp[e]->forward(xin.data(), k, nullptr, out.data());
      for (int64_t i = 0; i < k; ++i) {
        const int64_t t = rows[static_cast<size_t>(i)];
        want.row(t) = scale[static_cast<size_t>(t)] * out.row(i);
      }
    }
    for (int64_t t = 0; t < n; ++t)
      EXPECT_EQ(0, std::memcmp(y.row(t).data(), want.row(t).data(), sizeof(float) * d))
          << "token " << t;
  }
  RowMatrix y(n, d);
  expert[0] = 4;  // only experts 0..3 exist
  EXPECT_THROW(compressed_experts_forward(wi, wo, x.data(), n, expert, scale, y.data()),
               InvalidArgument);
  expert[0] = 0;
  EXPECT_THROW(compressed_experts_forward(wi, std::span<const CompressedView>(wo).first(2),
                                          x.data(), n, expert, scale, y.data()),
               InvalidArgument);
}

// A sparse layer whose experts are all compressed runs as two grouped calls (up, then down
// projections); the result is bit-identical to running each expert on its own tokens. With one
// dense expert among them the layer falls back to per-expert calls.
TEST(Experts, GroupedLayerEqualsPerExpertCalls) {
  const auto dir = fixture("every_other_f32");
  const SwitchModel m = SwitchModel::load(dir);
  const FeedForward& ff = m.encoder[1].ff;
  ASSERT_TRUE(ff.sparse);
  std::vector<std::shared_ptr<const ExpertMlp>> comp;
  for (const auto& e : ff.experts) {
    const auto& d = dynamic_cast<const DenseExpert&>(*e);
    comp.push_back(
        CompressedExpert::owning(encode(ternarize_rtn(d.wi().t.data, d.wi().out, d.wi().in)),
                                 encode(ternarize_rtn(d.wo().t.data, d.wo().out, d.wo().in))));
  }
  const int64_t n = 45;
  const RowMatrix x = RowMatrix::Random(n, m.config.d_model);
  SeqOffsets seqs;
  seqs.offsets = {0, 20, n};
  for (int64_t capacity : {0, 4}) {
    ForwardOptions opt;
    opt.expert_capacity = capacity;
    const Routing r = route(ff, x, seqs, opt);
    int active = 0;
    for (const auto& t : r.tokens_of) active += t.empty() ? 0 : 1;
    ASSERT_GE(active, 2);
    // Per-expert reference, the arithmetic of feed_forward_apply's loop.
    RowMatrix y = RowMatrix::Zero(n, m.config.d_model);  // dropped tokens: FF output zero
    for (size_t e = 0; e < comp.size(); ++e) {
      const auto& toks = r.tokens_of[e];
      if (toks.empty()) continue;
      const auto k = static_cast<int64_t>(toks.size());
      RowMatrix xin(k, m.config.d_model), yout(k, m.config.d_model);
      for (int64_t i = 0; i < k; ++i) xin.row(i) = x.row(toks[static_cast<size_t>(i)]);
      comp[e]->forward(xin.data(), k, nullptr, yout.data());
      for (int64_t i = 0; i < k; ++i) y.row(toks[static_cast<size_t>(i)]) = yout.row(i);
    }
    const RowMatrix h0 = RowMatrix::Random(n, m.config.d_model);
    RowMatrix want = h0;
    for (int64_t t = 0; t < n; ++t) want.row(t) += r.prob[static_cast<size_t>(t)] * y.row(t);

    RowMatrix got = h0;
    feed_forward_apply(ff, x, &r, got, comp);
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(),
                             sizeof(float) * static_cast<size_t>(n) *
                                 static_cast<size_t>(m.config.d_model)))
        << "capacity " << capacity;

    // One dense expert: the per-expert loop; the other experts' rows are unchanged.
    std::vector<std::shared_ptr<const ExpertMlp>> mixed = comp;
    size_t dense_e = 0;
    while (r.tokens_of[dense_e].empty()) ++dense_e;
    mixed[dense_e] = ff.experts[dense_e];
    RowMatrix got_mixed = h0;
    feed_forward_apply(ff, x, &r, got_mixed, mixed);
    for (int64_t t = 0; t < n; ++t) {
      if (r.dropped[static_cast<size_t>(t)] ||
          r.expert[static_cast<size_t>(t)] == static_cast<int32_t>(dense_e))
        continue;
      EXPECT_EQ(0, std::memcmp(got_mixed.row(t).data(), want.row(t).data(),
                               sizeof(float) * static_cast<size_t>(m.config.d_model)))
          << "token " << t;
    }
  }
}

}  // namespace
}  // namespace qmoe::sw::test
