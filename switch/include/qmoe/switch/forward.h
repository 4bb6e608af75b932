// The Switch Transformers forward pass on the CPU (Eigen + OpenMP), matching Hugging Face
// transformers' SwitchTransformersForConditionalGeneration at inference (dropout off), and the
// sequential block-by-block runner that calibration builds on.
//
// Sequences are processed as a ragged batch: the tokens of all sequences are the rows of one
// matrix; token-wise layers (layer norms, projections, experts) run on all rows at once, attention
// runs per sequence, so no padding or attention mask is needed.
//
// Determinism: every parallel loop is split into fixed pieces that do not depend on the number
// of threads, and Eigen's own threading is off (EIGEN_DONT_PARALLELIZE), so results are
// bit-identical for any OMP thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "qmoe/switch/model.h"
#include "qmoe/switch/tokens.h"

namespace qmoe::sw {

struct ForwardOptions {
  // Tokens routed to one expert, per sequence, beyond which tokens are dropped; 0 = no limit (no
  // dropping, as QMoE's calibration does). With a limit the behaviour is that of transformers 5
  // and of the original Switch Transformer: a token's priority is its position in its sequence;
  // a dropped token skips the expert, its FF output is zero and the residual alone goes on.
  int64_t expert_capacity = 0;
};

// Row ranges of the sequences of a ragged batch: sequence i is rows [offsets[i], offsets[i+1]).
struct SeqOffsets {
  std::vector<int64_t> offsets{0};
  int64_t num_seqs() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t num_tokens() const { return offsets.back(); }
};

// Per-token routing of one sparse layer.
struct Routing {
  std::vector<int32_t>
      expert;               // chosen expert (argmax of router probabilities; lowest index on ties)
  std::vector<float> prob;  // its softmax probability (computed in float32)
  std::vector<uint8_t> dropped;  // 1 if over capacity
  // Tokens routed to and kept by expert e, in row order.
  std::vector<std::vector<int64_t>> tokens_of;
};

// ---- building blocks (usable one by one) --------------------------------------------------------

// T5 RMS norm: x / sqrt(mean(x²) + eps) * w, per row.
void rms_norm(const RowMatrix& x, const FloatTensor& w, double eps, RowMatrix& out);
// Relative position bucket of (key position - query position), as in T5/Switch.
int64_t relative_position_bucket(int64_t relative_position, bool bidirectional, int64_t num_buckets,
                                 int64_t max_distance);
// Embedding rows of stack s for ids (SwitchModel::embedding(s); ids must be in range:
// InvalidArgument otherwise).
RowMatrix embed(const SwitchModel& m, Stack s, std::span<const int32_t> ids);

// h += SelfAttention(LN(h)) of block `b` of stack `s`. The position bias comes from block 0 of the
// stack (bidirectional in the encoder, causal in the decoder); the decoder masks future keys.
void self_attention_layer(const SwitchModel& m, Stack s, int64_t b, const SeqOffsets& seqs,
                          RowMatrix& h);
// h += CrossAttention(LN(h), encoder output) of decoder block b (no position bias).
void cross_attention_layer(const SwitchModel& m, int64_t b, const SeqOffsets& dec_seqs,
                           const RowMatrix& enc_out, const SeqOffsets& enc_seqs, RowMatrix& h);
// Router of a sparse FF layer on layer-normed input x.
Routing route(const FeedForward& ff, const RowMatrix& x, const SeqOffsets& seqs,
              const ForwardOptions& opt);
// h += FF(x) where x = LN(h) was computed by the caller; `routing` is required for sparse layers.
// `experts` overrides ff.experts when non-empty (same count).
void feed_forward_apply(const FeedForward& ff, const RowMatrix& x, const Routing* routing,
                        RowMatrix& h,
                        std::span<const std::shared_ptr<const ExpertMlp>> experts = {});
// Whole FF layer: LN, route, apply.
void feed_forward_layer(const SwitchModel& m, Stack s, int64_t b, const SeqOffsets& seqs,
                        RowMatrix& h, const ForwardOptions& opt);

// ---- whole model ------------------------------------------------------------------------------

struct ForwardTrace {
  std::vector<RowMatrix> encoder_blocks;  // output of each encoder block
  RowMatrix encoder_final;                // after the encoder's final layer norm
  std::vector<RowMatrix> decoder_blocks;
};

// Decoder inputs for teacher forcing: targets shifted right by one, decoder_start_token_id first,
// -100 replaced by pad_token_id (per pair).
std::vector<int32_t> shift_right(const SwitchModel& m, std::span<const int32_t> targets);

// Encoder output (after final LN) of the pairs' encoder inputs.
RowMatrix encode(const SwitchModel& m, const TokenPairs& batch, const ForwardOptions& opt = {},
                 ForwardTrace* trace = nullptr);
// Decoder output (after final LN, before the logit scaling) given the encoder output.
RowMatrix decode(const SwitchModel& m, const TokenPairs& batch, const RowMatrix& enc_out,
                 const ForwardOptions& opt = {}, ForwardTrace* trace = nullptr);
// Logits [rows, vocab] of decoder outputs (scaled by d_model^-0.5 first when embeddings are tied).
RowMatrix logits(const SwitchModel& m, const RowMatrix& dec_out);

struct LossResult {
  double nll_sum = 0;   // sum of -log p(target) over counted targets
  int64_t targets = 0;  // counted targets (not -100)
  double mean() const { return targets ? nll_sum / static_cast<double>(targets) : 0.0; }
};
// Teacher-forced cross-entropy of the batch's decoder targets (logits computed and discarded in
// fixed row chunks, so memory stays at chunk × vocab).
LossResult cross_entropy(const SwitchModel& m, const TokenPairs& batch,
                         const ForwardOptions& opt = {});

struct EvalResult {
  LossResult loss;
  int64_t encoder_tokens = 0;
  int64_t decoder_tokens = 0;
  double seconds = 0;
  double flops = 0;  // forward_flops() of every batch
};
// cross_entropy over all pairs in batches of `batch_pairs` pairs; `progress` (optional) is called
// after each batch with pairs done.
EvalResult evaluate(const SwitchModel& m, const TokenPairs& pairs, int64_t batch_pairs,
                    const ForwardOptions& opt = {},
                    const std::function<void(int64_t)>& progress = {});

// Floating-point operations of one block's forward for sequences `seqs` (encoder: its own; decoder:
// with cross-attention over `enc_seqs`): attention projections and products, and the feed-forward
// layer (the router and one expert per token for sparse blocks, counted as dense products).
double block_forward_flops(const SwitchConfig& c, Stack s, bool sparse, int64_t num_experts,
                           const SeqOffsets& seqs, const SeqOffsets& enc_seqs);
// Of the whole teacher-forced forward of a batch: every block of both stacks and the logits.
double forward_flops(const SwitchModel& m, const TokenPairs& batch);

// Chunk the SeqOffsets of pairs' encoder or decoder side.
SeqOffsets encoder_seqs(const TokenPairs& p);
SeqOffsets decoder_seqs(const TokenPairs& p);

}  // namespace qmoe::sw
