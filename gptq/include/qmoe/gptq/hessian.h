// Hessian accumulation for GPTQ: streaming sums of x x^T over calibration tokens, merging of
// partial sums, and files of named accumulators (format: format/HESSIANS.md).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace qmoe {

// Sum of x x^T over the tokens x (rows of X, dim floats each) seen so far, kept in float64, and
// the token count. Each add() forms products of fixed blocks of 512 tokens in float32 and adds
// them to the float64 sum, so the error does not grow with the number of tokens. The block
// products run on AVX-512 or AVX2 kernels picked at run time, or an Eigen GEMM on other CPUs
// (gptq_kernel()). With fixed 256x256 output tiles and a fixed order, the result is
// bit-identical for any thread count; the AVX2 and AVX-512 kernels compute every entry as the
// same chain of fused multiply-adds, so they agree bit for bit too (the portable level rounds
// differently).
// Not thread-safe, const calls included (sum() and hessian() complete the lower triangle on their
// first call after an add()): use one accumulator per thread and merge() them in a fixed order.
class HessianAccumulator {
 public:
  HessianAccumulator() = default;
  // token_cap: accept at most this many tokens in all (0 = unlimited); later tokens are counted
  // in dropped() only (QMoE keeps the first tokens routed to an expert, see expert_token_cap()).
  explicit HessianAccumulator(int64_t dim, int64_t token_cap = 0);

  int64_t dim() const { return dim_; }
  int64_t tokens() const { return tokens_; }
  int64_t dropped() const { return dropped_; }
  int64_t token_cap() const { return token_cap_; }

  // Adds the n tokens of x (n rows of dim floats, row stride ld floats; ld = dim when 0), up to
  // the cap. Returns the number accepted. Throws InvalidArgument for n < 0, ld < dim, a null x
  // with n > 0, a non-finite value, or a token count that would pass INT64_MAX (nothing is added
  // then).
  int64_t add(const float* x, int64_t n, int64_t ld = 0, int threads = 0);
  // Adds the sums and counts of `other` (same dim, else InvalidArgument; InvalidArgument too, with
  // nothing changed, if a count would pass INT64_MAX); the cap is not applied.
  void merge(const HessianAccumulator& other);
  // Replaces the state (for readers): sum is dim*dim doubles, symmetric.
  void assign(std::vector<double> sum, int64_t tokens, int64_t dropped = 0);

  // sum of x x^T, dim*dim doubles, symmetric (row-major = column-major).
  const std::vector<double>& sum() const;
  // GPTQ's H = (2 / tokens) * sum, dim*dim floats; empty when tokens() == 0.
  std::vector<float> hessian() const;

 private:
  int64_t dim_ = 0;
  int64_t token_cap_ = 0;
  int64_t tokens_ = 0;
  int64_t dropped_ = 0;
  // add() and merge() update the upper triangle only; the lower one is filled in when the sum is
  // read (sum(), hessian()), so a stream of adds does not transpose dim^2 doubles each time.
  mutable std::vector<double> sum_;
  mutable bool lower_stale_ = false;
  void fill_lower() const;
};

// The float32 product kernels of the Hessian sums and of GPTQ in use: "avx512", "avx2" or
// "portable" (Eigen). The best this CPU runs, unless the environment variable QMOE_CPU_SIMD
// (scalar | avx2 | avx512, read on first use, as for the decode kernels) names a lower one. avx2
// and avx512 give the same bits. Throws InvalidArgument if QMOE_CPU_SIMD names an unknown level or
// one this CPU does not run.
std::string_view gptq_kernel();

namespace detail {
// For tests: one block product of add() (prod[i * nj + j] = sum over t < nb of
// xi[t * ld + i] * xj[t * ld + j]; with avx2 and avx512, fused multiply-adds in token order) by
// the kernel `level` ("portable", "avx2", "avx512").
// Returns false, writing nothing, when this build or CPU lacks that level.
bool hessian_block_product(std::string_view level, const float* xi, const float* xj, int64_t ld,
                           int64_t nb, int64_t ni, int64_t nj, float* prod);
}  // namespace detail

// Floating-point operations add() executes for n tokens of dimension dim: the block products of
// the upper 256 x 256 output tiles, 2 * n * rows * columns each.
double hessian_flops(int64_t dim, int64_t n);

// QMoE's cap on the tokens used per expert: floor(multiplier * total_tokens / num_experts), at
// least 1. Throws InvalidArgument for num_experts <= 0, total_tokens < 0 or multiplier <= 0.
int64_t expert_token_cap(int64_t total_tokens, int64_t num_experts, double multiplier = 4.0);

// Writes accumulators to a safetensors file (atomically; format: format/HESSIANS.md). Names
// must be non-empty and must not end in ".xtx", ".tokens" or ".dropped". Throws InvalidArgument
// for bad names, Error for I/O failures.
void write_hessians(const std::filesystem::path& path,
                    const std::map<std::string, HessianAccumulator>& accumulators);

// Reads every accumulator of a Hessian file. The sums may be stored as F64 or F32. Throws
// FormatError (naming the file and tensor) for a file that is not a valid Hessian file.
std::map<std::string, HessianAccumulator> read_hessians(const std::filesystem::path& path);

}  // namespace qmoe
