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
  h_ = embed(model_, s, ids);
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

std::vector<std::pair<int64_t, int64_t>> SequentialRunner::chunks(const SeqOffsets& seqs) const {
  std::vector<std::pair<int64_t, int64_t>> out;  // sequence ranges
  const int64_t limit = std::max<int64_t>(1, opt_.chunk_tokens);
  // In the decoder the encoder tokens of the same pairs count too: cross-attention copies them and
  // projects them to keys and values per piece.
  const SeqOffsets* enc = &seqs == &dec_seqs_ ? &enc_seqs_ : nullptr;
  auto fits = [&](const SeqOffsets& o, int64_t s0, int64_t s1) {
    return o.offsets[static_cast<size_t>(s1)] - o.offsets[static_cast<size_t>(s0)] <= limit;
  };
  int64_t s0 = 0;
  while (s0 < seqs.num_seqs()) {
    int64_t s1 = s0 + 1;
    while (s1 < seqs.num_seqs() && fits(seqs, s0, s1 + 1) && (!enc || fits(*enc, s0, s1 + 1))) ++s1;
    out.emplace_back(s0, s1);
    s0 = s1;
  }
  return out;
}

namespace {

// Sequences [s0, s1) of `seqs`, their offsets starting at 0.
SeqOffsets sub_seqs(const SeqOffsets& seqs, int64_t s0, int64_t s1) {
  SeqOffsets r;
  r.offsets.assign(seqs.offsets.begin() + s0, seqs.offsets.begin() + s1 + 1);
  const int64_t base = r.offsets.front();
  for (auto& o : r.offsets) o -= base;
  return r;
}

}  // namespace

void SequentialRunner::begin_block() {
  if (done()) throw InvalidArgument("SequentialRunner::begin_block: all blocks are done");
  if (in_block_)
    throw InvalidArgument("SequentialRunner::begin_block: end_block() of the current block first");
  const SeqOffsets& seqs = stack_ == Stack::kEncoder ? enc_seqs_ : dec_seqs_;
  const FeedForward& ff = model_.blocks(stack_)[static_cast<size_t>(block_)].ff;
  x_.resize(h_.rows(), h_.cols());
  routing_ = Routing{};
  counted_.clear();
  if (ff.sparse) {
    const size_t n = static_cast<size_t>(h_.rows());
    routing_.expert.resize(n);
    routing_.prob.resize(n);
    routing_.dropped.resize(n);
    routing_.tokens_of.assign(static_cast<size_t>(model_.layout.num_experts), {});
  }
  // Piece by piece (whole sequences: attention and expert capacity are per sequence; every product
  // row depends only on its own row, so the pieces give the bits of one batch).
  RowMatrix hc, xc, ec;
  for (const auto& [s0, s1] : chunks(seqs)) {
    const int64_t t0 = seqs.offsets[static_cast<size_t>(s0)],
                  t1 = seqs.offsets[static_cast<size_t>(s1)];
    const SeqOffsets cs = sub_seqs(seqs, s0, s1);
    hc = h_.middleRows(t0, t1 - t0);
    self_attention_layer(model_, stack_, block_, cs, hc);
    if (stack_ == Stack::kDecoder) {
      const int64_t e0 = enc_seqs_.offsets[static_cast<size_t>(s0)],
                    e1 = enc_seqs_.offsets[static_cast<size_t>(s1)];
      ec = enc_out_.middleRows(e0, e1 - e0);
      cross_attention_layer(model_, block_, cs, ec, sub_seqs(enc_seqs_, s0, s1), hc);
    }
    h_.middleRows(t0, t1 - t0) = hc;
    rms_norm(hc, ff.layer_norm, model_.config.layer_norm_epsilon, xc);
    x_.middleRows(t0, t1 - t0) = xc;
    if (ff.sparse) {
      const Routing r = route(ff, xc, cs, opt_.forward);
      for (int64_t i = 0; i < t1 - t0; ++i) {
        const size_t t = static_cast<size_t>(t0 + i);
        routing_.expert[t] = r.expert[static_cast<size_t>(i)];
        routing_.prob[t] = r.prob[static_cast<size_t>(i)];
        routing_.dropped[t] = r.dropped[static_cast<size_t>(i)];
      }
      for (size_t e = 0; e < r.tokens_of.size(); ++e)
        for (int64_t i : r.tokens_of[e]) routing_.tokens_of[e].push_back(t0 + i);
    }
  }
  if (ff.sparse) {
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

void SequentialRunner::end_block(std::span<const std::shared_ptr<const ExpertMlp>> experts) {
  if (!in_block_) throw InvalidArgument("SequentialRunner::end_block: begin_block() first");
  const FeedForward& ff = model_.blocks(stack_)[static_cast<size_t>(block_)].ff;
  const SeqOffsets& seqs = stack_ == Stack::kEncoder ? enc_seqs_ : dec_seqs_;
  if (!ff.sparse) {
    RowMatrix xc, hc;
    for (const auto& [s0, s1] : chunks(seqs)) {
      const int64_t t0 = seqs.offsets[static_cast<size_t>(s0)],
                    t1 = seqs.offsets[static_cast<size_t>(s1)];
      xc = x_.middleRows(t0, t1 - t0);
      hc = h_.middleRows(t0, t1 - t0);
      feed_forward_apply(ff, xc, nullptr, hc);
      h_.middleRows(t0, t1 - t0) = hc;
    }
  } else {
    if (experts.empty()) experts = ff.experts;
    if (experts.size() != routing_.tokens_of.size())
      throw InvalidArgument("SequentialRunner::end_block: " + std::to_string(experts.size()) +
                            " experts for " + std::to_string(routing_.tokens_of.size()));
    // Each expert on all of its tokens at once (a token's result then does not depend on how the
    // batch is cut, or on which process runs the expert); h += prob * output. Temporaries: one
    // expert's tokens at a time.
    const int64_t d = x_.cols();
    RowMatrix xin, yout;
    for (size_t e = 0; e < experts.size(); ++e) {
      const auto& toks = routing_.tokens_of[e];
      if (toks.empty()) continue;
      if (!experts[e])
        throw InvalidArgument("SequentialRunner::end_block: expert " + std::to_string(e) +
                              " is missing");
      const auto k = static_cast<int64_t>(toks.size());
      xin.resize(k, d);
      yout.resize(k, d);
      for (int64_t i = 0; i < k; ++i) xin.row(i) = x_.row(toks[static_cast<size_t>(i)]);
      experts[e]->forward(xin.data(), k, nullptr, yout.data());
      for (int64_t i = 0; i < k; ++i) {
        const int64_t t = toks[static_cast<size_t>(i)];
        h_.row(t) += routing_.prob[static_cast<size_t>(t)] * yout.row(i);
      }
    }
  }
  finish_block();
}

void SequentialRunner::end_block_outputs(const RowMatrix& y) {
  if (!in_block_) throw InvalidArgument("SequentialRunner::end_block_outputs: begin_block() first");
  if (!sparse()) throw InvalidArgument("SequentialRunner::end_block_outputs: a dense block");
  if (y.rows() != h_.rows() || y.cols() != h_.cols())
    throw InvalidArgument("SequentialRunner::end_block_outputs: outputs of the wrong shape");
  for (const auto& toks : routing_.tokens_of)
    for (int64_t t : toks) h_.row(t) += routing_.prob[static_cast<size_t>(t)] * y.row(t);
  finish_block();
}

void SequentialRunner::finish_block() {
  // Dropped tokens (over capacity): FF output zero, the residual alone goes on (as in
  // feed_forward_apply and transformers 5).
  in_block_ = false;
  ++block_;
  if (stack_ == Stack::kEncoder && block_ >= static_cast<int64_t>(model_.encoder.size())) {
    rms_norm(h_, model_.encoder_final_ln, model_.config.layer_norm_epsilon, enc_out_);
    enter_stack(Stack::kDecoder);
  }
}

}  // namespace qmoe::sw
