// Ternarization (round to nearest) and encoding of ternary matrices into qmoe codecs.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "qmoe/core/dtype.h"
#include "qmoe/format/matrix.h"

namespace qmoe {

// Round-to-nearest ternarization, per row (QMoE's quant.py): lo = min(row, 0), hi = max(row, 0),
// both rounded to bf16; a row with lo = hi = 0 gets lo = -1, hi = +1. A weight w becomes 2 (hi)
// if w > hi/2, 1 (lo) if w < lo/2, else 0. The thresholds use the bf16-rounded levels.
// `data` is rows*cols elements of `dtype` (kF32, kF16 or kBF16), row-major with row stride
// `ld` elements (ld = cols when 0). Throws InvalidArgument for other dtypes or non-finite weights.
TernaryMatrix ternarize_rtn(const void* data, DType dtype, int64_t rows, int64_t cols,
                            int64_t ld = 0);
inline TernaryMatrix ternarize_rtn(const float* w, int64_t rows, int64_t cols) {
  return ternarize_rtn(w, DType::kF32, rows, cols);
}

struct EncodeOptions {
  // Codec to use; nullopt ("auto") picks the target's codec (auto_codec() in
  // qmoe/format/codec.h: qmoe-v1 for kAny, qmoe-g4 for kCpu, qmoe-v2 for kGpu), or qmoe-p5 where
  // that is smaller (matrices too dense for the target's codec; ties keep the target's codec).
  std::optional<Codec> codec;
  // Where the matrix will run, for the automatic choice (format/SPEC.md 2.2): kAny (the default,
  // QMoE-compatible qmoe-v1, read natively by the CPU and CUDA decoders), kCpu (qmoe-g4, the
  // fastest on the CPU at one token and in batches, and the smallest; the CUDA decoder converts it
  // to qmoe-v2 on upload) or kGpu (qmoe-v2, read natively by the CUDA kernels).
  Target target = Target::kAny;
  // OpenMP threads (0 = the OpenMP default). The output is identical for any value.
  int threads = 0;
  // qmoe-v2: the longest dictionary entry (1..63 symbols). qmoe-v2 and qmoe-v3: the zero fraction
  // the fitted dictionary is built for (nullopt: the matrix's own, see fitted_p0_for()).
  int v2_max_width = 63;
  std::optional<double> fitted_p0{};
};

// Encodes a ternary matrix. qmoe-v1 and qmoe-v2 use greedy longest match through a trie of the
// dictionary, each row separately (v1 is bit-compatible with QMoE's encoder); qmoe-v3 walks its
// dictionary's tree a column of two rows at a time, each pair of rows separately; qmoe-g4 writes
// each group of 4 rows' gaps as tokens (its only encoding, SPEC 4.5.4). Throws InvalidArgument if a
// symbol is not 0, 1 or 2, or if a matrix would need more than 2^31-1 codes or qmoe-g4 tokens.
CompressedMatrix encode(const TernaryMatrix& t, const EncodeOptions& opt = {});

// The qmoe-v2 dictionary the encoder uses for zero fraction p0 (0 < p0 < 1) and entries of at
// most max_width symbols (format/SPEC.md section 4.3.4): the leaves of a Tunstall tree over single
// symbols, i.i.d. with P(0) = p0 and P(1) = P(2) (entries with at most 3 non-zero symbols, those
// within 32 columns). Built once per argument pair; the same arguments give the same object. Throws
// InvalidArgument for p0 outside (0, 1) or max_width outside 1..63. Below 39, the tree has fewer
// than 65535 leaves and the codes past them repeat code 0's entry.
std::shared_ptr<const FittedDictionary> v2_dictionary(double p0, int max_width = v2::kMaxWidth);

// The qmoe-v3 dictionary the encoder uses for zero fraction p0 (0 < p0 < 1), format/SPEC.md
// section 4.4.4: the leaves of a Tunstall tree over the 9 values of a column of two rows. Built
// once per p0; the same argument gives the same object. Throws InvalidArgument for p0 outside (0,
// 1).
std::shared_ptr<const FittedDictionary> v3_dictionary(double p0);

// The zero fraction qmoe-v2 and qmoe-v3 fit a matrix's dictionary to: `zero_fraction` rounded to a
// multiple of 1/64 and clamped to [32/64, 63/64], so that matrices of similar sparsity share one
// dictionary (the fit costs under 0.2% of size at P(0) = 0.85..0.95).
double fitted_p0_for(double zero_fraction);

// Re-encodes a matrix in opt.codec (nullopt: the automatic choice): its symbols, decoded by the
// reference decoder, encoded again; levels are kept (e.g. a QMoE-compatible qmoe-v1 file as the
// smaller qmoe-v2). Throws FormatError for a malformed matrix.
CompressedMatrix transcode(const CompressedView& m, const EncodeOptions& opt = {});

// Number of v1 codes each row needs, without storing them (for choosing a codec cheaply).
int64_t v1_code_count(const TernaryMatrix& t, int threads = 0);

}  // namespace qmoe
