#include "qmoe/switch/compress_experts.h"

#ifdef QMOE_SWITCH_HAVE_GPTQ

#include <vector>

#include "qmoe/format/error.h"
#include "qmoe/gptq/hessian.h"

namespace qmoe::sw {

namespace {

const DenseExpert& dense_of(const SwitchModel& m, Stack s, int64_t b, int64_t e) {
  const auto* d = dynamic_cast<const DenseExpert*>(
      m.blocks(s)[static_cast<size_t>(b)].ff.experts[static_cast<size_t>(e)].get());
  if (!d)
    throw InvalidArgument(std::string("compress_experts: ") + stack_name(s) + " block " +
                          std::to_string(b) + " expert " + std::to_string(e) + " is not dense");
  return *d;
}

}  // namespace

void compress_experts(SwitchModel& model, const TokenPairs& calib, const ExpertCompressOptions& opt,
                      const std::function<void(CompressedExpertResult&)>& sink) {
  if (!gptq_grid_is_ternary(opt.gptq.grid))
    throw InvalidArgument("compress_experts: the GPTQ grid must be ternary");
  SequentialRunner run(model, calib, opt.calibration);
  const int64_t E = model.layout.num_experts;
  std::vector<CompressedExpertResult> deferred;  // non-sequential: applied after the last block
  while (!run.done()) {
    run.begin_block();
    if (!run.sparse()) {
      run.end_block();
      continue;
    }
    const int64_t total = run.ff_input().rows();
    const int64_t cap = opt.token_cap_multiplier > 0 && total > 0
                            ? expert_token_cap(total, E, opt.token_cap_multiplier)
                            : 0;
    std::vector<std::vector<float>> h_wi(static_cast<size_t>(E)), h_wo(static_cast<size_t>(E));
    std::vector<int64_t> tokens(static_cast<size_t>(E), 0);
    if (!opt.rtn) {
      for (int64_t e = 0; e < E; ++e) {
        const RowMatrix x = run.wi_inputs(e);
        const RowMatrix a = run.wo_inputs(e);
        HessianAccumulator hi(x.cols(), cap), ho(a.cols(), cap);
        hi.add(x.data(), x.rows(), 0, opt.threads);
        ho.add(a.data(), a.rows(), 0, opt.threads);
        tokens[static_cast<size_t>(e)] = hi.tokens();
        h_wi[static_cast<size_t>(e)] = hi.hessian();  // empty when no tokens: RTN fallback
        h_wo[static_cast<size_t>(e)] = ho.hessian();
      }
    }
    std::vector<GptqProblem> problems;
    for (int64_t e = 0; e < E; ++e) {
      const DenseExpert& d = dense_of(model, run.stack(), run.block(), e);
      const auto& hw = h_wi[static_cast<size_t>(e)];
      const auto& ho = h_wo[static_cast<size_t>(e)];
      problems.push_back({d.wi().t.data, d.wi().out, d.wi().in, hw.empty() ? nullptr : hw.data()});
      problems.push_back({d.wo().t.data, d.wo().out, d.wo().in, ho.empty() ? nullptr : ho.data()});
    }
    GptqBatchOptions bo;
    bo.threads = opt.threads;
    std::vector<GptqResult> res = gptq_quantize_batch(problems, opt.gptq, bo);
    for (int64_t e = 0; e < E; ++e) {
      CompressedExpertResult r;
      r.stack = run.stack();
      r.block = run.block();
      r.expert = e;
      r.tokens = tokens[static_cast<size_t>(e)];
      for (int k = 0; k < 2; ++k) {
        GptqResult& g = res[static_cast<size_t>(2 * e + k)];
        if (g.status == GptqStatus::kFailed)
          throw InvalidArgument(std::string("compress_experts: ") + stack_name(r.stack) +
                                " block " + std::to_string(r.block) + " expert " +
                                std::to_string(e) + ": " + g.reason);
        qmoe::CompressedExpert& c = k == 0 ? r.wi : r.wo;
        c.matrix = encode(g.ternary, opt.encode);
        c.status = g.status;
        c.reason = g.reason;
        c.loss = g.loss;
        c.output_loss = g.output_loss;
        c.zero_fraction = g.ternary.zero_fraction();
      }
      if (opt.sequential) {
        model.set_expert(r.stack, r.block, e,
                         sw::CompressedExpert::owning(r.wi.matrix, r.wo.matrix));
        if (sink) sink(r);
      } else {
        deferred.push_back(std::move(r));
      }
    }
    run.end_block();
  }
  for (auto& r : deferred) {
    model.set_expert(r.stack, r.block, r.expert,
                     sw::CompressedExpert::owning(r.wi.matrix, r.wo.matrix));
    if (sink) sink(r);
  }
}

}  // namespace qmoe::sw

#endif  // QMOE_SWITCH_HAVE_GPTQ
