#include "qmoe/switch/calibration_provider.h"

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "qmoe/format/error.h"

#ifdef QMOE_SWITCH_HAVE_GPTQ
#include "qmoe/gptq/hessian.h"
#endif

namespace qmoe::sw {

#ifdef QMOE_SWITCH_HAVE_GPTQ
namespace {

Stack stack_of(std::string_view s) {
  return s == "decoder" ? Stack::kDecoder : Stack::kEncoder;
}

class CalibrationProvider final : public HessianProvider {
 public:
  CalibrationProvider(const std::filesystem::path& checkpoint, const std::filesystem::path& tokens,
                      const CalibrationProviderOptions& opt)
      : tokens_path_(tokens), opt_(opt), model_(SwitchModel::load(checkpoint)) {
    if (model_.source->is_container())
      throw FormatError(error_context(
          checkpoint.string(), "", "calibration needs the original checkpoint, not a container"));
    pairs_ = TokenPairs::load(tokens, model_.config.vocab_size);
    runner_ = std::make_unique<SequentialRunner>(model_, pairs_, opt_.calibration);
  }

  std::string describe() const override {
    return "calibration " + tokens_path_.filename().string() + " (" +
           std::to_string(pairs_.num_pairs()) + " pairs, " +
           (opt_.sequential ? "sequential" : "one pass") + ")";
  }

  std::string fingerprint() const override {
    std::ifstream in(tokens_path_, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string ids;
    for (int32_t id : opt_.calibration.excluded_ids) ids += std::to_string(id) + ",";
    return "calib:" + std::to_string(std::hash<std::string>{}(ss.str())) + ":" +
           std::to_string(ss.str().size()) + ":seq=" + std::to_string(opt_.sequential) +
           ":cap=" + std::to_string(opt_.token_cap_multiplier) +
           ":capacity=" + std::to_string(opt_.calibration.forward.expert_capacity) + ":excl=" + ids;
  }

  void validate(std::span<const ExpertMatrix> experts) const override {
    for (const auto& m : experts) {
      const auto& blocks = model_.blocks(stack_of(m.stack));
      if (m.block < 0 || m.block >= static_cast<int64_t>(blocks.size()) ||
          !blocks[static_cast<size_t>(m.block)].ff.sparse)
        throw FormatError(error_context(m.file, m.name,
                                        "not an expert of a sparse block of the calibrated model"));
      const int64_t cols = m.which == "wi" ? model_.config.d_model : model_.config.d_ff;
      if (m.cols != cols)
        throw FormatError(error_context(
            m.file, m.name,
            "has " + std::to_string(m.cols) + " inputs, the model " + std::to_string(cols)));
    }
  }

  void begin_block(std::string_view stack, int64_t block) override {
    const Stack s = stack_of(stack);
    auto before = [&] {
      return runner_->stack() == Stack::kEncoder && s == Stack::kDecoder ? true
             : runner_->stack() == s                                     ? runner_->block() < block
                                                                         : false;
    };
    while (!runner_->done() && before()) {
      runner_->begin_block();
      runner_->end_block();
    }
    if (runner_->done() || runner_->stack() != s || runner_->block() != block)
      throw InvalidArgument("calibration: blocks must be visited in order (" + std::string(stack) +
                            " block " + std::to_string(block) + " is behind the runner)");
    runner_->begin_block();
    if (!runner_->sparse())
      throw InvalidArgument("calibration: " + std::string(stack) + " block " +
                            std::to_string(block) + " is not sparse");
    const int64_t total = runner_->ff_input().rows();
    cap_ = opt_.token_cap_multiplier > 0 && total > 0
               ? expert_token_cap(total, runner_->num_experts(), opt_.token_cap_multiplier)
               : 0;
  }

  std::vector<float> hessian(const ExpertMatrix& m, int64_t& tokens) const override {
    if (runner_->stack() != stack_of(m.stack) || runner_->block() != m.block)
      throw InvalidArgument("calibration: hessian(" + m.name + ") outside its block");
    const RowMatrix x =
        m.which == "wi" ? runner_->wi_inputs(m.expert) : runner_->wo_inputs(m.expert);
    HessianAccumulator acc(x.cols(), cap_);
    acc.add(x.data(), x.rows(), 0, 1);
    tokens = acc.tokens();
    return acc.hessian();
  }

  void end_block(std::string_view stack, int64_t block,
                 const std::function<CompressedMatrix(const ExpertMatrix&)>& result) override {
    const Stack s = stack_of(stack);
    if (opt_.sequential) {
      for (int64_t e = 0; e < runner_->num_experts(); ++e) {
        ExpertMatrix wi, wo;
        wi.name = SwitchNames::expert(stack, block, e, "wi");
        wo.name = SwitchNames::expert(stack, block, e, "wo");
        wi.stack = wo.stack = std::string(stack);
        wi.block = wo.block = block;
        wi.expert = wo.expert = e;
        wi.which = "wi", wo.which = "wo";
        wi.rows = wo.cols = model_.config.d_ff;
        wi.cols = wo.rows = model_.config.d_model;
        model_.set_expert(s, block, e, CompressedExpert::owning(result(wi), result(wo)));
      }
    }
    runner_->end_block();
  }

 private:
  std::filesystem::path tokens_path_;
  CalibrationProviderOptions opt_;
  SwitchModel model_;
  TokenPairs pairs_;
  std::unique_ptr<SequentialRunner> runner_;
  int64_t cap_ = 0;
};

}  // namespace
#endif

std::unique_ptr<HessianProvider> open_calibration(const std::filesystem::path& checkpoint,
                                                  const std::filesystem::path& tokens,
                                                  const CalibrationProviderOptions& opt) {
#ifdef QMOE_SWITCH_HAVE_GPTQ
  return std::make_unique<CalibrationProvider>(checkpoint, tokens, opt);
#else
  (void)opt;
  throw Error(checkpoint.string() + ", " + tokens.string() +
              ": calibration is not available in this build (qmoe was built without gptq/)");
#endif
}

}  // namespace qmoe::sw
