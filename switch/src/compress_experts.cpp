#include "qmoe/switch/compress_experts.h"

#include "qmoe/format/error.h"
#include "qmoe/switch/block_loop.h"

namespace qmoe::sw {

namespace {

// Every expert matrix of the model's sparse blocks, in the block loop's order.
std::vector<ExpertMatrix> expert_matrices(const SwitchModel& model) {
  std::vector<ExpertMatrix> out;
  const auto& src = *model.source;
  for (Stack s : {Stack::kEncoder, Stack::kDecoder}) {
    const StackLayout& sl = s == Stack::kEncoder ? model.layout.encoder : model.layout.decoder;
    for (int64_t b = 0; b < sl.num_blocks; ++b) {
      if (!sl.sparse[static_cast<size_t>(b)]) continue;
      for (int64_t e = 0; e < model.layout.num_experts; ++e)
        for (const char* w : {"wi", "wo"}) {
          ExpertMatrix m;
          m.stack = stack_name(s);
          m.name = SwitchNames::expert(m.stack, b, e, w);
          m.block = b;
          m.expert = e;
          m.which = w;
          m.rows = m.which == "wi" ? model.config.d_ff : model.config.d_model;
          m.cols = m.which == "wi" ? model.config.d_model : model.config.d_ff;
          const SwitchSource::Stored st = src.stored(m.name);
          m.dtype = st.dtype;
          m.file = st.file;
          out.push_back(std::move(m));
        }
    }
  }
  return out;
}

}  // namespace

void compress_experts(SwitchModel& model, const TokenPairs& calib, const ExpertCompressOptions& opt,
                      const std::function<void(CompressedExpertResult&)>& sink) {
  if (!gptq_grid_is_ternary(opt.gptq.grid))
    throw InvalidArgument("compress_experts: the GPTQ grid must be ternary");
  const std::vector<ExpertMatrix> experts = expert_matrices(model);
  MemoryExpertStore store;
  LoopOptions lo;
  lo.calibration = opt.rtn ? nullptr : &calib;
  lo.calib = opt.calibration;
  lo.sequential = opt.sequential;
  lo.token_cap_multiplier = opt.token_cap_multiplier;
  lo.grid = opt.gptq.grid;
  lo.percdamp = opt.gptq.percdamp;
  lo.blocksize = opt.gptq.blocksize;
  lo.actorder = opt.gptq.actorder;
  lo.ternary = opt.gptq.ternary;
  lo.rate = opt.rate;
  lo.codec = opt.encode.codec;
  lo.target = opt.encode.target;
  lo.threads = opt.threads;
  run_block_loop(model.source, experts, lo, store);
  for (size_t i = 0; i + 1 < experts.size(); i += 2) {
    const ExpertMatrix& wi = experts[i];
    const ExpertMatrix& wo = experts[i + 1];
    CompressedExpertResult r;
    r.stack = wi.stack == "decoder" ? Stack::kDecoder : Stack::kEncoder;
    r.block = wi.block;
    r.expert = wi.expert;
    for (int k = 0; k < 2; ++k) {
      const auto& e = store.at(k == 0 ? wi.name : wo.name);
      qmoe::CompressResult& c = k == 0 ? r.wi : r.wo;
      c.matrix = *e.matrix;
      c.status = opt.rtn || e.stats.fallback ? GptqStatus::kFallbackRtn : GptqStatus::kOk;
      c.loss = e.stats.loss;
      c.output_loss = e.stats.output_loss;
      c.zero_fraction = e.stats.zero_fraction;
      if (k == 0) r.tokens = e.stats.tokens;
    }
    model.set_expert(r.stack, r.block, r.expert,
                     sw::CompressedExpert::owning(r.wi.matrix, r.wo.matrix));
    if (sink) sink(r);
  }
}

}  // namespace qmoe::sw
