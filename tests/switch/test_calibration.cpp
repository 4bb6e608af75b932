// The sequential calibration runner: same numbers as the plain forward pass, the right tokens per
// expert, and recomputation with replaced (compressed) experts.
#include <omp.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "qmoe/format/reference.h"

#include "qmoe/switch/calibration.h"
#include "test_util.h"

#include "qmoe/encoder/encode.h"

namespace qmoe::sw::test {
namespace {

std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

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

// The runner cuts a block's work into pieces of whole sequences (chunk_tokens): one sequence per
// piece, a few, or all at once give the forward pass's bits.
TEST(Calibration, RunnerWithOriginalExpertsEqualsForward) {
  const auto dir = fixture("every_other_f32");
  SwitchModel m = SwitchModel::load(dir);
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  ForwardTrace tr;
  const RowMatrix enc = encode(m, pairs, {}, &tr);
  decode(m, pairs, enc, {}, &tr);
  for (const int64_t chunk : {int64_t{1}, int64_t{12}, int64_t{16384}}) {
    SCOPED_TRACE("chunk_tokens " + std::to_string(chunk));
    CalibrationOptions opt;
    opt.chunk_tokens = chunk;
    int sparse_blocks = 0;
    const RowMatrix h = run_through(m, pairs, opt, [&](SequentialRunner& run) {
      ++sparse_blocks;
      int64_t counted = 0;
      for (int64_t e = 0; e < run.num_experts(); ++e)
        counted += static_cast<int64_t>(run.counted_tokens(e).size());
      EXPECT_EQ(counted, run.ff_input().rows());  // no capacity, nothing excluded: all count
    });
    EXPECT_EQ(sparse_blocks, 4);
    ASSERT_EQ(h.size(), tr.decoder_blocks.back().size());
    EXPECT_EQ(0, std::memcmp(h.data(), tr.decoder_blocks.back().data(),
                             sizeof(float) * static_cast<size_t>(h.size())));
  }
}

// With an expert capacity the runner drops the tokens the forward pass drops, and passes them on
// through the residual alone (FF output zero) as it does: same bits on the dropped-token fixture.
TEST(Calibration, RunnerDropsTokensAsTheForwardPass) {
  for (const char* name : {"dropped_f32", "all_sparse_bf16"}) {
    SCOPED_TRACE(name);
    const auto dir = fixture(name);
    SwitchModel m = SwitchModel::load(dir);
    const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
    CalibrationOptions opt;
    opt.forward.expert_capacity = 3;
    ForwardTrace tr;
    const RowMatrix enc = encode(m, pairs, opt.forward, &tr);
    decode(m, pairs, enc, opt.forward, &tr);
    int64_t dropped = 0;
    const RowMatrix h = run_through(m, pairs, opt, [&](SequentialRunner& run) {
      for (auto d : run.routing().dropped) dropped += d;
    });
    EXPECT_GT(dropped, 0);
    ASSERT_EQ(h.size(), tr.decoder_blocks.back().size());
    EXPECT_EQ(0, std::memcmp(h.data(), tr.decoder_blocks.back().data(),
                             sizeof(float) * static_cast<size_t>(h.size())));
  }
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
    const auto& ex =
        dynamic_cast<const DenseExpert&>(*m.encoder[1].ff.experts[static_cast<size_t>(e)]);
    for (int64_t i = 0; i < x.rows(); ++i) {
      EXPECT_EQ(x.row(i), run.ff_input().row(toks[static_cast<size_t>(i)]));
      for (int64_t f = 0; f < m.config.d_ff; ++f) {
        double s = 0;
        for (int64_t c = 0; c < m.config.d_model; ++c)
          s += double(ex.wi().t.data[f * m.config.d_model + c]) * x(i, c);
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
  for (int64_t e = 0; e < run.num_experts(); ++e)
    counted += static_cast<int64_t>(run.counted_tokens(e).size());
  EXPECT_EQ(counted, run.ff_input().rows() - expect_excluded);
  EXPECT_EQ(t5_sentinel_ids().front(), 32000);
  EXPECT_EQ(t5_sentinel_ids().back(), 32099);
}

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
        ref.set_expert(s, static_cast<int64_t>(b), static_cast<int64_t>(e),
                       rtn_expert(*ref.blocks(s)[b].ff.experts[e]));
  ForwardTrace tr;
  decode(ref, pairs, encode(ref, pairs, {}, &tr), {}, &tr);
  // Sequential: each block's experts replaced only when the runner reaches it.
  SwitchModel m = SwitchModel::load(dir);
  const RowMatrix h = run_through(m, pairs, {}, [&](SequentialRunner& run) {
    for (int64_t e = 0; e < run.num_experts(); ++e) {
      EXPECT_EQ(m.blocks(run.stack())[static_cast<size_t>(run.block())]
                    .ff.experts[static_cast<size_t>(e)]
                    ->kind(),
                "dense");
      m.set_expert(run.stack(), run.block(), e,
                   rtn_expert(*m.blocks(run.stack())[static_cast<size_t>(run.block())]
                                   .ff.experts[static_cast<size_t>(e)]));
    }
  });
  ASSERT_EQ(h.size(), tr.decoder_blocks.back().size());
  EXPECT_EQ(0, std::memcmp(h.data(), tr.decoder_blocks.back().data(),
                           sizeof(float) * static_cast<size_t>(h.size())));
  const SwitchModel fresh = SwitchModel::load(dir);
  EXPECT_THROW(m.set_expert(Stack::kEncoder, 0, 99, rtn_expert(*fresh.encoder[0].ff.experts[0])),
               InvalidArgument);
}

}  // namespace
}  // namespace qmoe::sw::test

#include "qmoe/format/container.h"
#include "qmoe/switch/compress_experts.h"

namespace qmoe::sw::test {
namespace {

std::vector<std::vector<uint16_t>> codes_of(const std::vector<CompressedExpertResult>& rs) {
  std::vector<std::vector<uint16_t>> c;
  for (const auto& r : rs) {
    c.push_back(r.wi.matrix.codes);
    c.push_back(r.wo.matrix.codes);
  }
  return c;
}

TEST(CompressExperts, SequentialGptqReplacesEveryExpertDeterministically) {
  const auto dir = fixture("every_other_f32");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  std::vector<std::vector<CompressedExpertResult>> runs;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    SwitchModel m = SwitchModel::load(dir);
    std::vector<CompressedExpertResult> got;
    ExpertCompressOptions opt;
    opt.encode.codec = Codec::kV1;
    compress_experts(m, pairs, opt, [&](CompressedExpertResult& r) { got.push_back(r); });
    ASSERT_EQ(got.size(), 16u);  // 4 sparse blocks x 4 experts, in stack order
    EXPECT_EQ(got.front().stack, Stack::kEncoder);
    EXPECT_EQ(got.front().block, 1);
    EXPECT_EQ(got.back().stack, Stack::kDecoder);
    EXPECT_EQ(got.back().block, 3);
    int64_t tokens = 0;
    for (const auto& r : got) {
      tokens += r.tokens;
      if (r.tokens > 0) {
        EXPECT_EQ(r.wi.status, GptqStatus::kOk) << r.wi.reason;
      }
      EXPECT_EQ(r.wi.matrix.rows, m.config.d_ff);
      EXPECT_EQ(r.wo.matrix.rows, m.config.d_model);
    }
    EXPECT_GT(tokens, 0);
    for (Stack s : {Stack::kEncoder, Stack::kDecoder})
      for (const auto& b : m.blocks(s))
        for (const auto& e : b.ff.experts) EXPECT_EQ(e->kind(), "compressed");
    runs.push_back(std::move(got));
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(codes_of(runs[0]), codes_of(runs[1]));
}

TEST(CompressExperts, CompressedModelBitIdenticalForAnyThreadCount) {
  const auto dir = fixture("all_sparse_bf16");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  SwitchModel m = SwitchModel::load(dir);
  ExpertCompressOptions opt;
  opt.rtn = true;
  compress_experts(m, pairs, opt);
  const int saved = omp_get_max_threads();
  std::vector<RowMatrix> outs;
  for (int t : {1, 2, 5}) {
    omp_set_num_threads(t);
    outs.push_back(logits(m, decode(m, pairs, encode(m, pairs))));
  }
  omp_set_num_threads(saved);
  for (size_t i = 1; i < outs.size(); ++i)
    EXPECT_EQ(0, std::memcmp(outs[i].data(), outs[0].data(),
                             sizeof(float) * static_cast<size_t>(outs[0].size())));
}

TEST(CompressExperts, RtnEqualsTernarizeRtn) {
  const auto dir = fixture("every_other_f32");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  const SwitchModel orig = SwitchModel::load(dir);
  SwitchModel m = SwitchModel::load(dir);
  ExpertCompressOptions opt;
  opt.rtn = true;
  compress_experts(m, pairs, opt, [&](CompressedExpertResult& r) {
    const auto& d =
        dynamic_cast<const DenseExpert&>(*orig.blocks(r.stack)[static_cast<size_t>(r.block)]
                                              .ff.experts[static_cast<size_t>(r.expert)]);
    const TernaryMatrix t = ternarize_rtn(d.wi().t.data, d.wi().out, d.wi().in);
    std::vector<uint8_t> sym(static_cast<size_t>(t.rows * t.cols));
    decode_symbols_ref(r.wi.matrix.view(), sym.data());
    EXPECT_EQ(sym, t.symbols);
    EXPECT_EQ(r.wi.matrix.levels, t.levels);
  });
}

TEST(CompressExperts, ContainerRunsCompressedExpertsLikeTheInMemoryModel) {
  const auto dir = fixture("all_sparse_bf16");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  SwitchModel m = SwitchModel::load(dir);
  const std::filesystem::path out = temp_dir("container") / "model.safetensors";
  {
    ContainerWriter w(out);
    w.set_metadata("config.json", read_text(dir / "config.json"));
    std::set<std::string> expert_names;
    compress_experts(m, pairs, {}, [&](CompressedExpertResult& r) {
      const auto wi = SwitchNames::expert(stack_name(r.stack), r.block, r.expert, "wi");
      const auto wo = SwitchNames::expert(stack_name(r.stack), r.block, r.expert, "wo");
      w.add_compressed(wi, r.wi.matrix.view(), DType::kBF16);
      w.add_compressed(wo, r.wo.matrix.view(), DType::kBF16);
      expert_names.insert(wi);
      expert_names.insert(wo);
    });
    const auto src = SwitchSource::open(dir);
    for (const auto& name : src->names()) {
      if (expert_names.count(name)) continue;
      const FloatTensor t = src->dense(name);
      w.add_dense(name, DType::kF32, t.shape,
                  std::span<const std::byte>(reinterpret_cast<const std::byte*>(t.data),
                                             static_cast<size_t>(t.numel()) * 4));
    }
    w.finish();
  }
  const SwitchModel c = SwitchModel::load(out);
  EXPECT_TRUE(c.source->is_container());
  for (const auto& e : c.decoder[2].ff.experts) EXPECT_EQ(e->kind(), "compressed");
  ForwardOptions fo;
  const LossResult a = cross_entropy(m, pairs, fo), b = cross_entropy(c, pairs, fo);
  EXPECT_EQ(a.nll_sum, b.nll_sum);
  EXPECT_EQ(a.targets, b.targets);
  // Decoded once at load time instead: same model up to summation order.
  LoadOptions lo;
  lo.compressed_experts = false;
  const SwitchModel dd = SwitchModel::load(out, lo);
  EXPECT_EQ(dd.decoder[2].ff.experts[0]->kind(), "dense");
  EXPECT_NEAR(cross_entropy(dd, pairs, fo).mean(), a.mean(), 1e-4);
  std::filesystem::remove_all(out.parent_path());
}

}  // namespace
}  // namespace qmoe::sw::test

#include "qmoe/switch/compress.h"

namespace qmoe::sw::test {
namespace {

// `qmoe eval --quantize` (compress_experts, in memory) and `qmoe compress --calib-tokens` (the
// work directory and a container) run the same block loop: the same matrices, codec for codec and
// byte for byte, and the same loss of the compressed model.
TEST(CalibratedCompress, CheckpointEqualsInMemorySequentialGptq) {
  const auto dir = fixture("every_other_f32");
  const TokenPairs pairs = TokenPairs::load(dir / "tokens.safetensors");
  SwitchModel mem = SwitchModel::load(dir);
  std::map<std::string, CompressedMatrix> got;
  compress_experts(mem, pairs, {}, [&](CompressedExpertResult& r) {
    got[SwitchNames::expert(stack_name(r.stack), r.block, r.expert, "wi")] = r.wi.matrix;
    got[SwitchNames::expert(stack_name(r.stack), r.block, r.expert, "wo")] = r.wo.matrix;
  });
  EXPECT_EQ(got.size(), 32u);  // 4 sparse blocks x 4 experts x 2
  const auto tmp = temp_dir("calib_compress");
  const auto out = tmp / "out.safetensors";
  CompressOptions co;
  co.calib_tokens = dir / "tokens.safetensors";
  co.check_disk = false;
  const CompressSummary s = compress_checkpoint(dir, out, co);
  EXPECT_EQ(s.quantizer, "gptq");
  EXPECT_EQ(s.calibration_pairs, pairs.num_pairs());
  const SwitchModel c = SwitchModel::load(out);
  ASSERT_TRUE(c.source->is_container());
  for (const auto& [name, m] : got) {
    const CompressedView* v = c.source->compressed(name);
    ASSERT_NE(v, nullptr) << name;
    ASSERT_EQ(v->codec, m.codec) << name;
    EXPECT_TRUE(std::equal(m.codes.begin(), m.codes.end(), v->codes.begin(), v->codes.end()))
        << name;
    EXPECT_TRUE(std::equal(m.packed.begin(), m.packed.end(), v->packed.begin(), v->packed.end()))
        << name;
    EXPECT_TRUE(std::equal(m.levels.begin(), m.levels.end(), v->levels.begin(), v->levels.end()))
        << name;
  }
  const LossResult a = cross_entropy(mem, pairs), b = cross_entropy(c, pairs);
  EXPECT_EQ(a.nll_sum, b.nll_sum);
  std::filesystem::remove_all(tmp);
}

TEST(CalibratedCompress, BadTokenFilesFailBeforeAnyWork) {
  const auto dir = fixture("every_other_f32");
  const auto tmp = temp_dir("calib_errors");
  CompressOptions co;
  co.check_disk = false;
  co.calib_tokens = dir / "no_tokens.safetensors";
  EXPECT_THROW(compress_checkpoint(dir, tmp / "a.safetensors", co), FormatError);
  // Token ids outside the vocabulary of the model.
  co.calib_tokens = fixture("all_sparse_bf16") / "expected.safetensors";
  EXPECT_THROW(compress_checkpoint(dir, tmp / "b.safetensors", co), FormatError);
  EXPECT_FALSE(std::filesystem::exists(tmp / "a.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "b.safetensors"));
  std::filesystem::remove_all(tmp);
}

}  // namespace
}  // namespace qmoe::sw::test
