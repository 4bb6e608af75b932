// The block loop of compression: the one place where a Switch checkpoint's expert matrices are
// ternarized and encoded, block after block, for `qmoe compress` (round to nearest, `--hessians`,
// `--calib-tokens`), `qmoe eval --quantize` and Python's compress_checkpoint.
//
// For each block of the model (encoder blocks, then decoder blocks, in order):
//   1. load      the block's weights from the checkpoint (views of F32 tensors, float copies of
//                BF16/F16 ones), through the one SwitchSource the caller opened;
//   2. forward   (calibration only) the calibration pairs this process runs through the block's
//                attention, its feed-forward layer norm and its router (SequentialRunner);
//   3. gather    (calibration only, sparse blocks) each expert's counted inputs, once;
//   4. Hessians  per expert matrix: from the gathered inputs (wi: the layer-normed inputs; wo:
//                ReLU(wi x) with the original wi), from a HessianProvider, or none (round to
//                nearest);
//   5. GPTQ      (or round to nearest) and 6. encode, per matrix, on a pool of workers whose
//                matrices in flight fit the memory budget;
//   7. write     each result to the ExpertStore (the work directory, or memory);
//   8. recompute (calibration only) the block's output for every kept token with the block's
//                compressed experts (QMoE's sequential scheme) or its original ones, which becomes
//                the next block's input;
//   9. release   the block's weights and pages.
// Stages are functions from data to data; the loop calls them in order. Blocks after the last one
// with expert matrices are not visited.
//
// Bits: every result depends only on the checkpoint, the calibration pairs and the options, never
// on the thread count, the memory budget, or which matrices were finished by an earlier run.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qmoe/format/matrix.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/switch/calibration.h"
#include "qmoe/switch/checkpoint.h"
#include "qmoe/switch/comm.h"
#include "qmoe/switch/tokens.h"

namespace qmoe::sw {

// One expert matrix of a checkpoint.
struct ExpertMatrix {
  std::string name;   // tensor name
  std::string stack;  // "encoder" or "decoder"
  int64_t block = 0;
  int64_t expert = 0;
  std::string which;  // "wi" ([d_ff, d_model]) or "wo" ([d_model, d_ff])
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;
  std::string file;  // shard holding it
  int64_t numel() const { return rows * cols; }
};

// Hessians for GPTQ from outside the model: a Hessian file (format/HESSIANS.md), or a
// provider of one's own (benchmarks use synthetic ones).
class HessianProvider {
 public:
  virtual ~HessianProvider() = default;
  // Short text for the output's metadata ("hessians.safetensors").
  virtual std::string describe() const = 0;
  // Identifies the Hessians (e.g. file size and a hash of its header) so that a resumed run can
  // check that it continues with the same ones.
  virtual std::string fingerprint() const = 0;
  // Before any work: throws FormatError naming the file and tensor on any mismatch.
  virtual void validate(std::span<const ExpertMatrix> experts) const = 0;
  // H = (2/n) X^T X, cols x cols float32, for matrix m; empty when no calibration token reached
  // the expert (the matrix is then rounded to nearest, and its statistics say so). Thread-safe.
  // `tokens` receives the number of tokens behind H.
  virtual std::vector<float> hessian(const ExpertMatrix& m, int64_t& tokens) const = 0;
};

// Statistics of one compressed expert matrix (kept in the work files and, per block, in the
// container's compress.stats metadata).
struct MatrixStats {
  double zero_fraction = 0;
  double loss = 0, output_loss = 0;  // GPTQ's (gptq.h); 0 for round to nearest
  int64_t tokens = 0;                // calibration tokens behind its Hessian (after the cap)
  bool fallback = false;             // GPTQ without a Hessian: rounded to nearest
  bool below_target = false;         // rate control: no rounding reached its size (the largest)
};

// A compressed matrix held by a store: a view and what keeps it alive (a mapping, a buffer).
struct StoredMatrix {
  CompressedView view;
  std::shared_ptr<const void> owner;
};

// Where the loop's results go, and which matrices are finished already (a resumed run).
class ExpertStore {
 public:
  virtual ~ExpertStore() = default;
  // True when m was finished earlier (its result is not computed again). Called from the loop's
  // thread, once per matrix, before its block's work starts.
  virtual bool has(const ExpertMatrix& m) = 0;
  // A finished matrix, for recomputing a calibrated block with its compressed experts. Called from
  // the loop's thread after the block's work.
  virtual StoredMatrix load(const ExpertMatrix& m) = 0;
  // A freshly compressed matrix. Called from worker threads, concurrently.
  virtual void store(const ExpertMatrix& m, const CompressedMatrix& cm, const MatrixStats& s) = 0;
};

// Results kept in memory (qmoe eval --quantize, benchmarks, callers that install the compressed
// experts themselves). Nothing is finished beforehand.
class MemoryExpertStore final : public ExpertStore {
 public:
  struct Entry {
    std::shared_ptr<const CompressedMatrix> matrix;
    MatrixStats stats;
  };
  bool has(const ExpertMatrix&) override { return false; }
  StoredMatrix load(const ExpertMatrix& m) override;
  void store(const ExpertMatrix& m, const CompressedMatrix& cm, const MatrixStats& s) override;
  // The entry of tensor `name` (std::out_of_range when it was not stored).
  const Entry& at(const std::string& name) const;
  size_t size() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
};

// Time and floating-point work of one phase of the loop. Work done on the pool's workers is counted
// in thread-seconds (the sum over workers), the rest in wall seconds of the loop's thread (whose
// parallel loops use every thread).
struct PhaseStats {
  double seconds = 0;
  double cpu_seconds = 0;  // CPU time of the threads doing the phase (all OpenMP threads for the
                           // forward), which a machine shared with other work does not inflate
  double flops = 0;
  bool thread_seconds = false;
};

struct LoopReport {
  PhaseStats load, forward, hessians, gptq, encode, write;
  // The expert outputs of blocks with work, computed by the experts' owners after compression
  // (the compressed experts in sequential calibration, else the originals) and sent back, the
  // exchange included. Its flops are dense-equivalent (4 x tokens x d_model x d_ff): a ternary
  // expert does far fewer operations, so its rate can exceed the dense GEMM rate. The forward
  // phase counts the rest of every block (attention, router, dense layers, and the experts of
  // blocks without work).
  PhaseStats outputs;
  int64_t blocks = 0;          // blocks visited
  int64_t matrices = 0;        // expert matrices compressed by this run
  int64_t resumed = 0;         // expert matrices finished earlier
  int64_t forward_tokens = 0;  // token-blocks run through the forward (tokens x blocks)
  int64_t hessian_tokens = 0;  // tokens added to Hessians, over all matrices
  int threads = 0;             // threads the loop used
  int64_t memory_budget = 0;   // smallest budget of matrices in flight of any block (0: no cap)
  int64_t spilled_blocks = 0;  // blocks whose expert inputs went to the scratch file
  int64_t bytes_sent = 0;      // expert inputs and outputs sent to other processes
  int64_t routed_tokens = 0;   // tokens of this process routed to an expert, over sparse blocks
  int64_t peak_in_flight = 0;  // most estimated bytes admitted at once
  double seconds = 0;          // wall time of the whole loop
  int64_t peak_rss = 0;        // the process's peak resident memory at the loop's end (VmHWM)
  // With a memory cap: the least cap this run could keep to (the most, over blocks, of what was
  // resident before the expert work plus the block's largest matrix alone), and the blocks whose
  // largest matrix alone did not fit in what the cap left (they ran one matrix at a time, above
  // the cap).
  int64_t memory_needed = 0;
  int64_t over_cap_blocks = 0;
};

// Progress, from the loop's thread about 5 times a second and at the end of each block.
struct LoopProgress {
  std::string phase;         // "load", "forward", "experts" (Hessians, GPTQ, encode, write)
  std::string block;         // "encoder.block.3"
  int64_t done = 0;          // expert matrices finished, resumed ones included
  int64_t total = 0;         // expert matrices in all
  int64_t resumed = 0;       // of `done`, finished by an earlier run
  int64_t tokens = 0;        // token-blocks through the forward so far
  int64_t total_tokens = 0;  // token-blocks the forward will run in all (0 without calibration)
  double seconds = 0;        // since the loop started
};

struct LoopOptions {
  // Quantizer: GPTQ with Hessians from `hessians`, or from `calibration` (the pairs run through the
  // model), or round to nearest when both are null. Not both.
  const HessianProvider* hessians = nullptr;
  const TokenPairs* calibration = nullptr;
  CalibrationOptions calib;  // which tokens count; expert capacity (0 = none, as QMoE)
  bool sequential = true;    // recompute each calibrated block with its compressed experts
  // Tokens per expert kept for its Hessians: floor(m * tokens of the stack / experts) (QMoE's
  // cap, hessian.h expert_token_cap()); 0 = all tokens.
  double token_cap_multiplier = 4.0;
  // GPTQ (gptq.h); the grid must be ternary (kTernary or kTernarySymmetric).
  GptqGrid grid = GptqGrid::kTernary;
  double percdamp = 0.1;
  int64_t blocksize = 128;
  bool actorder = false;
  // Ternary levels and rounding (gptq.h; round to nearest uses them too, with the identity
  // Hessian), and a size per matrix to aim at (rate control). The defaults are QMoE's recipe.
  TernaryOptions ternary;
  RateControl rate;
  std::optional<Codec> codec;  // nullopt: the target's codec or qmoe-p5, the smaller per matrix
  Target target = Target::kAny;
  int threads = 0;  // 0: the OpenMP default
  // Cap on the process's resident memory (0: none). Before each block's expert work, what the cap
  // leaves (it minus the resident memory then, calibration state included, minus 24 MiB) is the
  // budget of the matrices in flight; a block whose counted expert inputs would take more than
  // half of it keeps them in a scratch file instead of memory.
  int64_t max_memory = 0;
  std::filesystem::path scratch_dir;  // for that scratch file (empty: the system's temp folder)
  // The processes of the run (comm.h; null: this one alone). Process r runs its share of the
  // calibration pairs and compresses the experts it owns (Partition); each sparse block's expert
  // inputs go to their owners and the outputs come back. The results do not depend on the number
  // of processes. Every process of `comm` calls run_block_loop() with the same arguments.
  std::shared_ptr<Comm> comm;
  // Progress (optional). May throw to stop the run: no new matrix starts, those in flight finish
  // (their results reach the store), and the exception comes out of run_block_loop().
  std::function<void(const LoopProgress&)> progress;
};

// Runs the loop over `experts` (every expert matrix of the checkpoint, in the order of
// plan_compression(): encoder blocks, then decoder blocks, wi before wo). Throws FormatError naming
// the file and tensor for a tensor that cannot be used, InvalidArgument for bad options; a
// matrix's failure stops the run as a progress exception does.
LoopReport run_block_loop(const std::shared_ptr<const SwitchSource>& src,
                          std::span<const ExpertMatrix> experts, const LoopOptions& opt,
                          ExpertStore& store);

// Every process's report, in rank order (collective), and the run's report made of them: work,
// CPU and thread-seconds summed, wall times the longest, threads summed.
std::vector<LoopReport> gather_reports(Comm& comm, const LoopReport& mine);
LoopReport combine(std::span<const LoopReport> reports);

// Estimated peak bytes one expert matrix needs while being compressed (its input pages, symbols,
// codes, and for GPTQ the Hessian, its sums, the hidden activations of calibration and GPTQ's
// workspace).
int64_t expert_memory_estimate(const ExpertMatrix& m, bool gptq, int64_t calib_tokens = 0);

}  // namespace qmoe::sw
