// Compression of a whole Switch Transformers checkpoint into a qmoe container (`qmoe compress`).
//
// Every expert matrix ({encoder,decoder}.block.{b}.layer.{f}.mlp.experts.expert_{e}.{wi,wo}.weight)
// is ternarized -- by round to nearest, or by GPTQ with Hessians from a file or from calibration
// tokens run through the model -- and encoded (the codec of the target -- qmoe-v1 for "any",
// qmoe-g4 for "cpu", qmoe-v2 for "gpu" -- or qmoe-p5, the smaller per matrix, unless a codec is
// forced; encoder/encode.h); every other stored tensor is copied byte for byte (or cast to bf16 on
// request). The expert work is the block loop of block_loop.h.
//
// Scale: the checkpoint is opened once; tensors are read lazily through the shards' mappings and
// their pages are handed back to the page cache once used; expert matrices are processed by a pool
// of workers that admits a matrix only while the estimated memory of the matrices in flight stays
// under the cap; each result goes to its own small file in a work directory, and the container is
// assembled from those files and the mappings at the end, shard by shard (ContainerWriter streams
// to disk).
//
// Resumability: the work directory "<output>.qmoe-work" holds one file per finished expert matrix,
// each written under a temporary name and renamed, plus run.json that identifies the run (input
// files, options that change the bytes). A run killed at any moment (SIGKILL included) continues
// with resume = true from the finished matrices; the container is then byte-identical to the one
// of an uninterrupted run, for any thread count or memory cap (both only schedule the work).
// The work directory is removed once the container is complete.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/core/dtype.h"
#include "qmoe/format/codec.h"
#include "qmoe/format/matrix.h"
#include "qmoe/switch/block_loop.h"

namespace qmoe::sw {

// Hessians from an accumulator file written by write_hessians() (gptq/hessian.h): one entry per
// expert matrix, named as the tensor. Read lazily, one matrix at a time. Throws FormatError if the
// file is not a valid Hessian file; validate() throws for a missing entry or one whose dimension
// is not the matrix's input width.
std::unique_ptr<HessianProvider> open_hessian_file(const std::filesystem::path& path);

struct CompressProgress {
  int64_t done = 0;     // expert matrices finished (resumed ones included)
  int64_t total = 0;    // expert matrices in all
  int64_t resumed = 0;  // of `done`, finished by an earlier run
  double seconds = 0;   // since the compression phase started
  std::string current;  // block being worked on ("encoder.block.3"), or the tensor being written
  // "compress" (step: "load", "forward" or "experts") or "assemble"
  std::string phase;
  std::string step;
  int64_t tokens = 0;        // calibration: token-blocks through the forward so far
  int64_t total_tokens = 0;  // and in all (0 without calibration)
};

struct CompressPlan;

struct CompressOptions {
  int threads = 0;               // 0 = the OpenMP default
  int64_t max_memory = 0;        // resident memory cap in bytes (0 = none)
  int64_t shard_size = 0;        // 0 = one file, else shards of about this size (output is a dir)
  bool resume = false;           // continue from "<output>.qmoe-work" if it is there
  bool cast_bf16 = false;        // store passthrough F32/F16 tensors as BF16
  std::optional<Codec> codec;    // nullopt: the target's codec or qmoe-p5, the smaller per matrix
  Target target = Target::kAny;  // picks the automatic codec; cpu / gpu recorded as "qmoe.target"
  bool check_disk = true;        // refuse to start without enough free space for the output
  // Quantizer: GPTQ with Hessians from `hessians` (e.g. open_hessian_file()), or from the token
  // pairs of `calib_tokens` (format/TOKENS.md) run through the model block by block
  // (QMoE's sequential calibration), or round to nearest when neither is given. Not both.
  HessianProvider* hessians = nullptr;
  std::filesystem::path calib_tokens;
  CalibrationOptions calibration;     // which tokens count; expert capacity (0 = none)
  bool sequential = true;             // recompute each block with its compressed experts (QMoE)
  double token_cap_multiplier = 4.0;  // QMoE's per-expert token cap (0 = all tokens)
  // GPTQ settings (used with hessians), as in gptq/gptq.h.
  double percdamp = 0.1;
  int64_t blocksize = 128;
  bool actorder = false;
  // Ternary levels and rounding, and a size per expert matrix (gptq.h), for GPTQ and round to
  // nearest alike. Recorded in compress.options and run.json when not the defaults.
  TernaryOptions ternary;
  RateControl rate;
  // Called from the calling thread about 5 times a second and once at the end of each phase.
  // It may throw to stop the run (e.g. on a user's interrupt): no new matrix starts, those in
  // flight finish, nothing is written to the output, the work directory is kept for `resume`,
  // and compress_checkpoint rethrows the exception. Only the final call (phase "assemble",
  // current "done") comes after the output is complete.
  std::function<void(const CompressProgress&)> progress;
  // Called with one-line notes (resumed work, cleaned-up leftovers).
  std::function<void(const std::string&)> note;
  // Called once the checks are done and before any work, with what the run will do.
  std::function<void(const CompressPlan&)> planned;
  // The processes of the run (switch/comm.h; null: this one alone). Every process calls
  // compress_checkpoint() with the same arguments; each runs its share of the calibration pairs and
  // compresses the experts it owns into the shared work directory; process 0 sets the work
  // directory up, writes the container and reports progress, plans and notes. The container is
  // byte-identical for any number of processes.
  std::shared_ptr<Comm> comm;
};

struct BlockSummary {
  std::string block;  // "encoder.block.1"
  int64_t matrices = 0;
  int64_t weights = 0;
  int64_t compressed_bytes = 0;  // codes + offsets + levels
  double bits_per_weight() const {
    return weights ? 8.0 * static_cast<double>(compressed_bytes) / static_cast<double>(weights)
                   : 0.0;
  }
};

struct CompressSummary {
  std::vector<std::filesystem::path> files;  // the container's files
  std::string quantizer;                     // "rtn" or "gptq"
  int64_t input_bytes = 0;                   // checkpoint files in all
  int64_t output_bytes = 0;                  // container files in all
  int64_t expert_matrices = 0;
  int64_t resumed_matrices = 0;
  int64_t expert_weights = 0;
  int64_t expert_input_bytes = 0;  // expert tensors as stored in the checkpoint
  int64_t expert_compressed_bytes = 0;
  int64_t passthrough_tensors = 0;
  std::array<int64_t, kCodecs.size()> codec_matrices{};  // expert matrices per codec (by Codec)
  int64_t matrices_of(Codec c) const { return codec_matrices[static_cast<size_t>(c)]; }
  int64_t fallback_matrices = 0;  // GPTQ without tokens: rounded to nearest
  // Rate control (--target-bits): matrices whose every rounding is smaller than their size target
  // (stored at the largest size found), so the mean falls short of it.
  int64_t below_target_matrices = 0;
  double mean_zero_fraction = 0;
  double compress_seconds = 0;  // compression phase (this run's share)
  double assemble_seconds = 0;
  double total_seconds = 0;
  int64_t memory_budget = 0;  // bytes admitted for matrices in flight (0 = no cap)
  std::vector<BlockSummary> blocks;
  LoopReport loop;                 // the block loop's phases: time and work (all processes)
  std::vector<LoopReport> ranks;   // each process's (one entry without MPI)
  int64_t calibration_pairs = 0;   // token pairs run through the model (0 without calibration)
  int64_t calibration_tokens = 0;  // their encoder + decoder tokens
  double bits_per_expert_weight() const {
    return expert_weights ? 8.0 * static_cast<double>(expert_compressed_bytes) /
                                static_cast<double>(expert_weights)
                          : 0.0;
  }
};

// The checks compress_checkpoint() does before any work, and what it will do. Throws FormatError
// naming the file and tensor for: missing files or shards, a config that is not a Switch
// Transformer, no sparse block, a missing expert, an expert tensor of unexpected shape or dtype,
// Hessians that do not match their expert; InvalidArgument for a bad output path; Error for too
// little free disk space.
struct CompressPlan {
  std::vector<ExpertMatrix> experts;  // in processing order
  int64_t input_bytes = 0;
  int64_t passthrough_tensors = 0;
  int64_t passthrough_bytes = 0;   // as written (after an optional cast)
  int64_t output_bytes_bound = 0;  // upper bound of the container's size
  int64_t disk_needed = 0;         // bound on the disk the run needs (work dir + output)
  int64_t disk_free = 0;
};
CompressPlan plan_compression(const std::filesystem::path& checkpoint,
                              const std::filesystem::path& output, const CompressOptions& opt);

// Compresses `checkpoint` (a Hugging Face checkpoint directory) into `output` (a file, or a
// directory when opt.shard_size > 0). Everything is written under temporary names; on any error
// nothing is left under the output name (the work directory keeps finished matrices for a resume).
CompressSummary compress_checkpoint(const std::filesystem::path& checkpoint,
                                    const std::filesystem::path& output,
                                    const CompressOptions& opt = {});

// Checks a container against the checkpoint it was compressed from: every expert matrix decodes
// (reference decoder) to exactly the round-to-nearest ternarization of the original (RTN
// containers; for GPTQ ones the ternary values are only decoded and measured), every other tensor
// is byte-identical (or the bf16 cast of the original). Also measures how far the ternary
// matrices are from the original weights. Throws FormatError naming the tensor on the first
// mismatch.
struct CheckSummary {
  int64_t expert_matrices = 0;
  int64_t expert_weights = 0;
  int64_t exact_matrices = 0;       // equal to the RTN ternarization (RTN containers)
  int64_t passthrough_tensors = 0;  // byte-identical
  double relative_error = 0;        // ||W - Q||_F / ||W||_F over all expert weights
  double decode_seconds = 0;        // reference decode of every expert matrix
  double seconds = 0;
};
CheckSummary check_compressed(const std::filesystem::path& checkpoint,
                              const std::filesystem::path& container, int threads = 0);

// The work directory of an output.
std::filesystem::path work_dir_for(const std::filesystem::path& output);

// Metadata keys the pipeline writes into the container (beside the format's own keys):
inline constexpr std::string_view kMetaConfig = "config.json";       // the checkpoint's config.json
inline constexpr std::string_view kMetaQuantizer = "quantizer";      // "rtn" or "gptq"
inline constexpr std::string_view kMetaInputBytes = "source.bytes";  // checkpoint size in bytes
inline constexpr std::string_view kMetaSource = "source.name";       // checkpoint directory name
inline constexpr std::string_view kMetaOptions =
    "compress.options";  // JSON: codec, gptq settings, hessians
// Per sparse block, "compress.stats.<stack>.block.<b>": JSON {"experts": E, "zero_fraction":
// [wi_0, wo_0, wi_1, ...], and with GPTQ "loss": [...], "output_loss": [...], "tokens": [...],
// "fallback": [indices rounded to nearest]}, and with rate control, when any, "below_target":
// [indices of matrices that stayed below their size target].
inline constexpr std::string_view kMetaStatsPrefix = "compress.stats.";

}  // namespace qmoe::sw
