// The sequential calibration runner: same numbers as the plain forward pass, the right tokens per
// expert, and recomputation with replaced (compressed) experts.
#include <gtest/gtest.h>

#include "qmoe/switch/calibration.h"
#include "test_util.h"

#ifdef QMOE_SWITCH_HAVE_ENCODER
#include "qmoe/encoder/encode.h"
#endif

namespace qmoe::sw::test {
namespace {

RowMatrix run_through(SwitchModel& m, const TokenPairs& pairs, const CalibrationOptions& opt,
                      const std::function<void(SequentialRunner&)>& at_sparse = {}) {
  SequentialRunner run(m, pairs, opt);
  while (!run.done()) {
    run.begin_block();
    if (run.sparse() && at_sparse) at_sparse(run);
    run.end_block();
  }
  return run.hidden();
}

TEST(Calibration, RunnerWithOriginalExpertsEqualsForward) {
  const auto dir = fixture("every_other_f32");
  SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  ForwardTrace tr;
  const RowMatrix enc = encode(m, pairs, {}, &tr);
  decode(m, pairs, enc, {}, &tr);
  int sparse_blocks = 0;
  const RowMatrix h = run_through(m, pairs, {}, [&](SequentialRunner& run) {
    ++sparse_blocks;
    int64_t counted = 0;
    for (int64_t e = 0; e < run.num_experts(); ++e) counted += static_cast<int64_t>(run.counted_tokens(e).size());
    EXPECT_EQ(counted, run.ff_input().rows());  // no capacity, nothing excluded: every token counts
  });
  EXPECT_EQ(sparse_blocks, 4);
  ASSERT_EQ(h.size(), tr.decoder_blocks.back().size());
  EXPECT_EQ(0, std::memcmp(h.data(), tr.decoder_blocks.back().data(), sizeof(float) * static_cast<size_t>(h.size())));
}

TEST(Calibration, ExpertInputs) {
  const auto dir = fixture("every_other_f32");
  SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  SequentialRunner run(m, pairs);
  run.begin_block();
  EXPECT_FALSE(run.sparse());
  EXPECT_THROW(run.wi_inputs(0), InvalidArgument);
  EXPECT_THROW(run.begin_block(), InvalidArgument);
  run.end_block();
  run.begin_block();
  ASSERT_TRUE(run.sparse());
  for (int64_t e = 0; e < run.num_experts(); ++e) {
    const RowMatrix x = run.wi_inputs(e);
    const RowMatrix a = run.wo_inputs(e);
    const auto toks = run.counted_tokens(e);
    ASSERT_EQ(x.rows(), static_cast<int64_t>(toks.size()));
    ASSERT_EQ(a.cols(), m.config.d_ff);
    const auto& ex = dynamic_cast<const DenseExpert&>(*m.encoder[1].ff.experts[static_cast<size_t>(e)]);
    for (int64_t i = 0; i < x.rows(); ++i) {
      EXPECT_EQ(x.row(i), run.ff_input().row(toks[static_cast<size_t>(i)]));
      for (int64_t f = 0; f < m.config.d_ff; ++f) {
        double s = 0;
        for (int64_t c = 0; c < m.config.d_model; ++c) s += double(ex.wi().t.data[f * m.config.d_model + c]) * x(i, c);
        EXPECT_NEAR(a(i, f), std::max(s, 0.0), 1e-4);
      }
    }
  }
  EXPECT_THROW(run.counted_tokens(run.num_experts()), InvalidArgument);
}

TEST(Calibration, ExcludedIdsAreNotCounted) {
  const auto dir = fixture("every_other_f32");
  SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  CalibrationOptions opt;
  opt.excluded_ids = {pairs.encoder_ids[0], pairs.encoder_ids[5]};
  int64_t expect_excluded = 0;
  for (int32_t id : pairs.encoder_ids)
    expect_excluded += (id == opt.excluded_ids[0] || id == opt.excluded_ids[1]) ? 1 : 0;
  SequentialRunner run(m, pairs, opt);
  run.begin_block();
  run.end_block();
  run.begin_block();
  int64_t counted = 0;
  for (int64_t e = 0; e < run.num_experts(); ++e) counted += static_cast<int64_t>(run.counted_tokens(e).size());
  EXPECT_EQ(counted, run.ff_input().rows() - expect_excluded);
  EXPECT_EQ(t5_sentinel_ids().front(), 32000);
  EXPECT_EQ(t5_sentinel_ids().back(), 32099);
}

#ifdef QMOE_SWITCH_HAVE_ENCODER
std::shared_ptr<const ExpertMlp> rtn_expert(const ExpertMlp& e) {
  const auto& d = dynamic_cast<const DenseExpert&>(e);
  return CompressedExpert::owning(encode(ternarize_rtn(d.wi().t.data, d.wi().out, d.wi().in)),
                                  encode(ternarize_rtn(d.wo().t.data, d.wo().out, d.wo().in)));
}

TEST(Calibration, BlocksAreRecomputedWithReplacedExperts) {
  const auto dir = fixture("all_sparse_bf16");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  // Reference: every expert replaced up front, then a plain forward pass.
  SwitchModel ref = SwitchModel::load(dir);
  for (Stack s : {Stack::kEncoder, Stack::kDecoder})
    for (size_t b = 0; b < ref.blocks(s).size(); ++b)
      for (size_t e = 0; e < ref.blocks(s)[b].ff.experts.size(); ++e)
        ref.set_expert(s, static_cast<int64_t>(b), static_cast<int64_t>(e), rtn_expert(*ref.blocks(s)[b].ff.experts[e]));
  ForwardTrace tr;
  decode(ref, pairs, encode(ref, pairs, {}, &tr), {}, &tr);
  // Sequential: each block's experts replaced only when the runner reaches it.
  SwitchModel m = SwitchModel::load(dir);
  const RowMatrix h = run_through(m, pairs, {}, [&](SequentialRunner& run) {
    for (int64_t e = 0; e < run.num_experts(); ++e) {
      EXPECT_EQ(m.blocks(run.stack())[static_cast<size_t>(run.block())].ff.experts[static_cast<size_t>(e)]->kind(),
                "dense");
      m.set_expert(run.stack(), run.block(), e,
                   rtn_expert(*m.blocks(run.stack())[static_cast<size_t>(run.block())].ff.experts[static_cast<size_t>(e)]));
    }
  });
  ASSERT_EQ(h.size(), tr.decoder_blocks.back().size());
  EXPECT_EQ(0, std::memcmp(h.data(), tr.decoder_blocks.back().data(), sizeof(float) * static_cast<size_t>(h.size())));
  const SwitchModel fresh = SwitchModel::load(dir);
  EXPECT_THROW(m.set_expert(Stack::kEncoder, 0, 99, rtn_expert(*fresh.encoder[0].ff.experts[0])), InvalidArgument);
}
#endif

}  // namespace
}  // namespace qmoe::sw::test
