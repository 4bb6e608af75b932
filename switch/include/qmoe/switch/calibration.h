// Sequential (block-by-block) calibration of a Switch model, QMoE's scheme: calibration tokens
// flow through the model; at each sparse block the tokens routed to each expert give that
// expert's GPTQ inputs (wi: the layer-normed FF input; wo: ReLU(wi · x)); the experts are
// compressed; the block's output is then recomputed with the *compressed* experts and feeds the
// next block. The encoder runs first; its final output (computed with compressed encoder experts)
// is what the decoder's cross-attention sees.
//
// Typical use (the compressor and the Hessian accumulators belong to the caller):
//
//   SequentialRunner run(model, calib_pairs, opt);
//   while (!run.done()) {
//     run.begin_block();                        // attention + FF layer norm + routing
//     if (run.sparse())
//       for (int64_t e = 0; e < run.num_experts(); ++e) {
//         RowMatrix x = run.wi_inputs(e);        // [n_e, d_model] -> H_wi += xᵀx
//         RowMatrix a = run.wo_inputs(e);        // [n_e, d_ff]    -> H_wo += aᵀa
//         ... compress wi, wo ...
//         model.set_expert(run.stack(), run.block(), e, CompressedExpert::owning(wi_c, wo_c));
//       }
//     run.end_block();                          // FF with the experts now in the model
//   }
//
// The model must outlive the runner; the runner reads experts from it at end_block().
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "qmoe/switch/forward.h"

namespace qmoe::sw {

struct CalibrationOptions {
  // Expert capacity during calibration; 0 (default) = no dropping, as QMoE does.
  ForwardOptions forward;
  // Positions whose input token id (encoder input id in encoder blocks, decoder input id — the
  // shifted target — in decoder blocks) is in this list do not count towards any expert's
  // Hessians; they still flow through the model. QMoE-style: pass the T5 sentinel ids
  // (t5_sentinel_ids()) to keep span-corruption markers out of the statistics. Default: empty.
  std::vector<int32_t> excluded_ids;
  // Decoder positions whose *target* is -100 (ignored by the loss) do not count either.
  bool exclude_ignored_targets = true;
  // Tokens per piece of a block's work (whole sequences; at least one sequence): attention,
  // routing and dense feed-forward layers run piece by piece, experts one at a time on their own
  // tokens, so that temporaries stay at this many rows (or one expert's tokens) whatever the
  // number of calibration tokens. The bits do not depend on it.
  int64_t chunk_tokens = 16384;
};

// The ids of T5's sentinels <extra_id_0> … <extra_id_{count-1}>: the last `count` ids below
// 32100 in the T5 vocabulary, i.e. 32000 … 32099 for count = 100.
std::vector<int32_t> t5_sentinel_ids(int32_t count = 100);

class SequentialRunner {
 public:
  // Embeds the calibration pairs (validated against the model's vocabulary: InvalidArgument).
  SequentialRunner(SwitchModel& model, TokenPairs pairs, CalibrationOptions opt = {});

  // All encoder blocks, then all decoder blocks.
  bool done() const;
  Stack stack() const { return stack_; }
  int64_t block() const { return block_; }
  int64_t num_experts() const;
  // Total blocks (encoder + decoder) and the index of the current one in that order.
  int64_t total_blocks() const;
  int64_t block_index() const;

  // Runs the current block's attention layer(s), its FF layer norm and (sparse) routing.
  // InvalidArgument when called twice without end_block() or after done().
  void begin_block();
  bool sparse() const;
  // Layer-normed FF input of every token of the batch [tokens, d_model] (after begin_block()).
  const RowMatrix& ff_input() const { return x_; }
  // Moves the FF input out, for a caller that has copied what it needs from it and reuses its
  // memory (the block loop: for the expert outputs). ff_input() is empty, and wi_inputs() /
  // wo_inputs() must not be called, until the next begin_block().
  RowMatrix take_ff_input() { return std::move(x_); }
  const Routing& routing() const { return routing_; }
  // Rows of ff_input() routed to expert e that count for calibration (row order).
  std::span<const int64_t> counted_tokens(int64_t e) const;
  // wi's calibration inputs: the counted rows of ff_input() for expert e, [n_e, d_model].
  RowMatrix wi_inputs(int64_t e) const;
  // wo's calibration inputs: ReLU(wi · x) for those rows, [n_e, d_ff], computed with `expert`
  // (default: the expert currently in the model, e.g. the original, or a compressed wi).
  RowMatrix wo_inputs(int64_t e, const ExpertMlp* expert = nullptr) const;
  // Computes the FF output with the experts currently in the model (or with `experts`, one per
  // expert of the block, when given), adds the residual, moves to the next block (finishing the
  // encoder when its last block is done).
  void end_block(std::span<const std::shared_ptr<const ExpertMlp>> experts = {});
  // The same for a sparse block whose expert outputs were computed elsewhere (by the experts'
  // owners): y holds, for every token routed to an expert, that expert's output (rows of other
  // tokens are not read). InvalidArgument for a dense block or a y of the wrong shape.
  void end_block_outputs(const RowMatrix& y);
  const SeqOffsets& seqs() const { return stack_ == Stack::kEncoder ? enc_seqs_ : dec_seqs_; }
  // Whether token t of the current stack counts towards Hessians (not excluded).
  bool counts(int64_t t) const { return excluded_[static_cast<size_t>(t)] == 0; }
  // Tokens of the current stack (all pairs).
  int64_t stack_tokens() const { return h_.rows(); }

  // Hidden states of the current stack (tokens x d_model), after the last finished layer.
  const RowMatrix& hidden() const { return h_; }
  // The encoder output (after final LN) once the encoder is finished; empty before.
  const RowMatrix& encoder_output() const { return enc_out_; }
  const TokenPairs& pairs() const { return pairs_; }

 private:
  SwitchModel& model_;
  TokenPairs pairs_;
  CalibrationOptions opt_;
  SeqOffsets enc_seqs_, dec_seqs_;
  std::vector<int32_t> dec_inputs_;
  Stack stack_ = Stack::kEncoder;
  int64_t block_ = 0;
  bool in_block_ = false;
  RowMatrix h_, x_, enc_out_;
  Routing routing_;
  std::vector<std::vector<int64_t>> counted_;
  std::vector<uint8_t> excluded_;  // per token of the current stack

  void enter_stack(Stack s);
  void check_expert(int64_t e) const;
  void finish_block();  // dropped tokens, next block, the encoder's end
  // Pieces of whole sequences of the current stack with about opt_.chunk_tokens tokens.
  std::vector<std::pair<int64_t, int64_t>> chunks(const SeqOffsets& seqs) const;
};

}  // namespace qmoe::sw
