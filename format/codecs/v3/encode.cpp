// The qmoe-v3 encoder (format/SPEC.md 4.4.4): each pair of rows through the tree of the matrix's
// fitted dictionary (codebook.cpp), a column of two rows at a time.
#include <memory>

#include "codebook.h"
#include "encode_internal.h"

namespace qmoe {
namespace detail {
namespace {

// One pair of rows through the tree of a qmoe-v3 dictionary, a column (s0 + 3 * s1) at a time; s1
// is null for the zero row that completes an odd-height matrix.
template <class Sink>
inline void encode_pair_v3(const V3Codebook& cb, const uint8_t* s0, const uint8_t* s1, int64_t cols,
                           Sink&& sink) {
  walk_tree<9>(
      cb.child.data(), cols, [&](int64_t c) { return s0[c] + (s1 != nullptr ? 3 * s1[c] : 0); },
      sink);
}

}  // namespace

CompressedMatrix encode_v3(const TernaryMatrix& t, const EncodeOptions& opt) {
  const V3Codebook& cb =
      v3_codebook(opt.fitted_p0 ? *opt.fitted_p0 : fitted_p0_for(t.zero_fraction()));
  CompressedMatrix m = encode_codes(t, opt.threads, Codec::kV3, [&](int64_t r, auto&& sink) {
    if (r % 2 != 0) return;
    const uint8_t* s0 = t.symbols.data() + r * t.cols;
    encode_pair_v3(cb, s0, r + 1 < t.rows ? s0 + t.cols : nullptr, t.cols, sink);
  });
  m.dictionary = cb.dictionary;
  return m;
}

}  // namespace detail

std::shared_ptr<const FittedDictionary> v3_dictionary(double p0) {
  return detail::v3_codebook(p0).dictionary;
}

}  // namespace qmoe
