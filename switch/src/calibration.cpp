#include "qmoe/switch/calibration.h"

#include <algorithm>
#include <unordered_set>

#include "qmoe/format/error.h"

namespace qmoe::sw {

std::vector<int32_t> t5_sentinel_ids(int32_t count) {
  if (count < 0 || count > 100) throw InvalidArgument("t5_sentinel_ids: count must be in [0, 100]");
  std::vector<int32_t> ids;
  for (int32_t i = 0; i < count; ++i) ids.push_back(32099 - i);
  std::sort(ids.begin(), ids.end());
  return ids;
}

SequentialRunner::SequentialRunner(SwitchModel& model, TokenPairs pairs, CalibrationOptions opt)
    : model_(model), pairs_(std::move(pairs)), opt_(std::move(opt)) {
  try {
    pairs_.validate(model_.config.vocab_size, "calibration tokens");
  } catch (const FormatError& e) {
    throw InvalidArgument(e.what());
  }
  enc_seqs_ = encoder_seqs(pairs_);
  dec_seqs_ = decoder_seqs(pairs_);
  for (int64_t p = 0; p < pairs_.num_pairs(); ++p) {
    const auto s = shift_right(model_, pairs_.decoder(p));
    dec_inputs_.insert(dec_inputs_.end(), s.begin(), s.end());
  }
  enter_stack(Stack::kEncoder);
}

void SequentialRunner::enter_stack(Stack s) {
  stack_ = s;
  block_ = 0;
  const bool enc = s == Stack::kEncoder;
  const std::vector<int32_t>& ids = enc ? pairs_.encoder_ids : dec_inputs_;
  h_ = embed(model_, ids);
  const std::unordered_set<int32_t> ex(opt_.excluded_ids.begin(), opt_.excluded_ids.end());
  excluded_.assign(ids.size(), 0);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ex.count(ids[i])) excluded_[i] = 1;
    if (!enc && opt_.exclude_ignored_targets && pairs_.decoder_targets[i] == -100) excluded_[i] = 1;
  }
}

bool SequentialRunner::done() const {
  return stack_ == Stack::kDecoder && block_ >= static_cast<int64_t>(model_.decoder.size());
}

int64_t SequentialRunner::total_blocks() const {
  return static_cast<int64_t>(model_.encoder.size() + model_.decoder.size());
}

int64_t SequentialRunner::block_index() const {
  return stack_ == Stack::kEncoder ? block_ : static_cast<int64_t>(model_.encoder.size()) + block_;
}

int64_t SequentialRunner::num_experts() const {
  return model_.layout.num_experts;
}

bool SequentialRunner::sparse() const {
  if (done()) return false;
  return model_.blocks(stack_)[static_cast<size_t>(block_)].ff.sparse;
}

void SequentialRunner::begin_block() {
  if (done()) throw InvalidArgument("SequentialRunner::begin_block: all blocks are done");
  if (in_block_)
    throw InvalidArgument("SequentialRunner::begin_block: end_block() of the current block first");
  const SeqOffsets& seqs = stack_ == Stack::kEncoder ? enc_seqs_ : dec_seqs_;
  self_attention_layer(model_, stack_, block_, seqs, h_);
  if (stack_ == Stack::kDecoder)
    cross_attention_layer(model_, block_, dec_seqs_, enc_out_, enc_seqs_, h_);
  const FeedForward& ff = model_.blocks(stack_)[static_cast<size_t>(block_)].ff;
  rms_norm(h_, ff.layer_norm, model_.config.layer_norm_epsilon, x_);
  routing_ = Routing{};
  counted_.clear();
  if (ff.sparse) {
    routing_ = route(ff, x_, seqs, opt_.forward);
    counted_.resize(routing_.tokens_of.size());
    for (size_t e = 0; e < routing_.tokens_of.size(); ++e)
      for (int64_t t : routing_.tokens_of[e])
        if (!excluded_[static_cast<size_t>(t)]) counted_[e].push_back(t);
  }
  in_block_ = true;
}

void SequentialRunner::check_expert(int64_t e) const {
  if (!in_block_) throw InvalidArgument("SequentialRunner: begin_block() first");
  if (!sparse()) throw InvalidArgument("SequentialRunner: the current block is not sparse");
  if (e < 0 || e >= static_cast<int64_t>(counted_.size()))
    throw InvalidArgument("SequentialRunner: no expert " + std::to_string(e));
}

std::span<const int64_t> SequentialRunner::counted_tokens(int64_t e) const {
  check_expert(e);
  return counted_[static_cast<size_t>(e)];
}

RowMatrix SequentialRunner::wi_inputs(int64_t e) const {
  const auto toks = counted_tokens(e);
  RowMatrix x(static_cast<int64_t>(toks.size()), x_.cols());
  for (size_t i = 0; i < toks.size(); ++i) x.row(static_cast<int64_t>(i)) = x_.row(toks[i]);
  return x;
}

RowMatrix SequentialRunner::wo_inputs(int64_t e, const ExpertMlp* expert) const {
  const RowMatrix x = wi_inputs(e);
  if (!expert)
    expert =
        model_.blocks(stack_)[static_cast<size_t>(block_)].ff.experts[static_cast<size_t>(e)].get();
  RowMatrix hidden(x.rows(), expert->d_ff()), y(x.rows(), x.cols());
  expert->forward(x.data(), x.rows(), hidden.data(), y.data());
  return hidden;
}

std::vector<RowMatrix> SequentialRunner::gather_counted() const {
  check_expert(0);
  std::vector<RowMatrix> out(counted_.size());
  for (size_t e = 0; e < counted_.size(); ++e) out[e] = wi_inputs(static_cast<int64_t>(e));
  return out;
}

void SequentialRunner::end_block(std::span<const std::shared_ptr<const ExpertMlp>> experts) {
  if (!in_block_) throw InvalidArgument("SequentialRunner::end_block: begin_block() first");
  const FeedForward& ff = model_.blocks(stack_)[static_cast<size_t>(block_)].ff;
  feed_forward_apply(ff, x_, ff.sparse ? &routing_ : nullptr, h_, experts);
  in_block_ = false;
  ++block_;
  if (stack_ == Stack::kEncoder && block_ >= static_cast<int64_t>(model_.encoder.size())) {
    rms_norm(h_, model_.encoder_final_ln, model_.config.layer_norm_epsilon, enc_out_);
    enter_stack(Stack::kDecoder);
  }
}

}  // namespace qmoe::sw
