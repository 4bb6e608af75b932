// The weights of a Switch Transformers encoder-decoder, as the CPU forward pass uses them, and the
// expert-MLP interface through which expert layers run either from dense weights or straight from
// compressed (ternary, any qmoe codec) matrices.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "qmoe/format/matrix.h"
#include "qmoe/switch/checkpoint.h"

namespace qmoe::sw {

// Activations: one token per row, row-major, contiguous.
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A weight matrix [out, in] as stored by HF (y = W x); a zero-copy view of an F32 tensor or an
// owned float copy. The SwitchSource it came from must outlive it.
struct Linear {
  FloatTensor t;
  int64_t out = 0;
  int64_t in = 0;
  Eigen::Map<const RowMatrix> map() const { return {t.data, out, in}; }
};

// y = W x for every row x of X (Y = X Wᵀ), X [n, in], Y [n, out]; with relu, y = max(W x, 0).
// core's gemm(): every output is one chain of fused multiply-adds, so a row's result depends only
// on that row of X (not on n, the other rows or the thread count); parallel with OpenMP when not
// already inside a parallel region.
void linear_forward(const Eigen::Map<const RowMatrix>& w, const float* x, int64_t n, float* y,
                    bool relu = false);

// One expert's MLP: y = wo · ReLU(wi · x). Implementations must be deterministic and give the
// same result for any number of OpenMP threads; they may run in parallel internally.
class ExpertMlp {
 public:
  virtual ~ExpertMlp() = default;
  virtual int64_t d_model() const = 0;
  virtual int64_t d_ff() const = 0;
  // x: n rows of d_model floats; hidden: n * d_ff floats that receive ReLU(wi · x), the input
  // of wo (nullptr: the implementation uses scratch of its own); y: n rows of d_model floats.
  // n may be 0. Thread-safe (const).
  virtual void forward(const float* x, int64_t n, float* hidden, float* y) const = 0;
  // "dense" or "compressed".
  virtual std::string kind() const = 0;
};

// An expert from dense float weights: wi [d_ff, d_model], wo [d_model, d_ff].
class DenseExpert final : public ExpertMlp {
 public:
  DenseExpert(Linear wi, Linear wo);
  int64_t d_model() const override { return wi_.in; }
  int64_t d_ff() const override { return wi_.out; }
  void forward(const float* x, int64_t n, float* hidden, float* y) const override;
  std::string kind() const override { return "dense"; }
  const Linear& wi() const { return wi_; }
  const Linear& wo() const { return wo_; }

 private:
  Linear wi_, wo_;
};

// An expert whose wi [d_ff, d_model] and wo [d_model, d_ff] are compressed ternary matrices,
// multiplied straight from their codes by compressed_linear_forward() (never materialising the
// dense matrix). The views must stay valid while the expert lives; `keep_alive` (optional) holds
// whatever owns them (a Container, a CompressedMatrix, ...).
class CompressedExpert final : public ExpertMlp {
 public:
  CompressedExpert(CompressedView wi, CompressedView wo,
                   std::shared_ptr<const void> keep_alive = {});
  // Owns the two matrices (e.g. just produced by the compressor).
  static std::shared_ptr<CompressedExpert> owning(CompressedMatrix wi, CompressedMatrix wo);
  int64_t d_model() const override { return wi_.cols; }
  int64_t d_ff() const override { return wi_.rows; }
  void forward(const float* x, int64_t n, float* hidden, float* y) const override;
  std::string kind() const override { return "compressed"; }
  const CompressedView& wi() const { return wi_; }
  const CompressedView& wo() const { return wo_; }

 private:
  CompressedView wi_, wo_;
  std::shared_ptr<const void> keep_alive_;
};

// Y = X Wᵀ for n rows of X [n, in], W compressed [out, in], Y [n, out]. Runs decoder_cpu's fused
// kernels (qmoe::cpu::matmul) when the library was built with them, else the _ref path below.
// Bit-identical for any thread count either way.
void compressed_linear_forward(const CompressedView& w, const float* x, int64_t n, float* y);
// The plain path: each fixed 64-row slice of W decoded by decode_ref() into a per-thread buffer,
// then a gemm with the whole batch (equal, bit for bit, to linear_forward on the decoded W).
void compressed_linear_forward_ref(const CompressedView& w, const float* x, int64_t n, float* y);

struct Attention {
  Linear q, k, v, o;          // [heads*d_kv, d_model] ×3, o: [d_model, heads*d_kv]
  FloatTensor relative_bias;  // [num_buckets, heads] in block 0 of each stack; empty otherwise
};

struct FeedForward {
  FloatTensor layer_norm;  // [d_model]
  bool sparse = false;
  Linear wi, wo;                                          // dense blocks
  Linear router;                                          // sparse blocks: [num_experts, d_model]
  std::vector<std::shared_ptr<const ExpertMlp>> experts;  // sparse blocks
};

struct Block {
  FloatTensor self_ln;
  Attention self_attn;
  FloatTensor cross_ln;  // decoder only
  Attention cross_attn;  // decoder only
  FeedForward ff;
};

enum class Stack { kEncoder, kDecoder };
const char* stack_name(Stack s);

struct LoadOptions {
  // For containers: run compressed experts through CompressedExpert (true) or decode them once
  // into dense float experts at load time (false: faster per token, 32 bits per weight in memory).
  bool compressed_experts = true;
  // For checkpoints: load the dense experts (false leaves ff.experts null, for callers that read
  // the expert tensors themselves).
  bool dense_experts = true;
};

// The whole model. Holds the source open (its tensors are viewed, not copied, when F32).
// Movable; experts can be replaced (e.g. by compressed ones during sequential calibration).
struct SwitchModel {
  std::shared_ptr<const SwitchSource> source;
  SwitchConfig config;
  SwitchLayout layout;
  FloatTensor shared;  // [vocab, d_model]
  // Untied checkpoints (tie_word_embeddings false) saved by transformers 5 store each stack's own
  // embedding, encoder.embed_tokens.weight and decoder.embed_tokens.weight, which the model uses;
  // empty (data == nullptr) where a stack embeds with `shared` (tied checkpoints, or untied ones
  // that store no embedding of their own).
  FloatTensor encoder_embed, decoder_embed;
  Linear lm_head;            // [vocab, d_model]
  bool scale_logits = true;  // tied embeddings: multiply by d_model^-0.5 before lm_head
  std::vector<Block> encoder;
  FloatTensor encoder_final_ln;
  std::vector<Block> decoder;
  FloatTensor decoder_final_ln;

  // Loads every tensor, checking names and shapes (FormatError naming file and tensor).
  static SwitchModel load(std::shared_ptr<const SwitchSource> src, const LoadOptions& opt = {});
  static SwitchModel load(const std::filesystem::path& path, const LoadOptions& opt = {});
  // The model without its blocks' weights: config, layout, embeddings, final layer norms, and
  // empty blocks to be filled by load_block() (the block loop of compression holds one block at a
  // time). lm_head is not loaded.
  static SwitchModel shell(std::shared_ptr<const SwitchSource> src);
  // Loads (or reloads) the weights of one block; release_block() drops them again (block 0 keeps
  // the stack's relative position bias, which every block of the stack uses).
  void load_block(Stack s, int64_t block, const LoadOptions& opt = {});
  void release_block(Stack s, int64_t block);

  std::vector<Block>& blocks(Stack s) { return s == Stack::kEncoder ? encoder : decoder; }
  // The embedding matrix [vocab, d_model] that stack s embeds its input ids with.
  const FloatTensor& embedding(Stack s) const {
    const FloatTensor& own = s == Stack::kEncoder ? encoder_embed : decoder_embed;
    return own.data != nullptr ? own : shared;
  }
  const std::vector<Block>& blocks(Stack s) const {
    return s == Stack::kEncoder ? encoder : decoder;
  }
  // Replaces one expert (block must be sparse, expert in range, shapes must match; else
  // InvalidArgument).
  void set_expert(Stack s, int64_t block, int64_t expert, std::shared_ptr<const ExpertMlp> mlp);
};

}  // namespace qmoe::sw
