// The qmoe-v2 encoder (format/SPEC.md 4.3.4): qmoe-v1's walk, a symbol at a time, through the tree
// of the matrix's fitted dictionary (codebook.cpp).
#include <memory>

#include "codebook.h"
#include "encode_internal.h"

namespace qmoe {
namespace detail {
namespace {

// Encodes one row of v2; calls sink(code) per codeword (SPEC 4.3.3: the symbols of the last
// codeword past the row's end are zero).
template <class Sink>
inline void encode_row_v2(const V2Codebook& cb, const uint8_t* s, int64_t cols, Sink&& sink) {
  walk_tree<3>(
      cb.child.data(), cols, [&](int64_t c) { return s[c]; }, sink);
}

}  // namespace

CompressedMatrix encode_v2(const TernaryMatrix& t, const EncodeOptions& opt) {
  const V2Codebook& cb = v2_codebook(
      opt.fitted_p0 ? *opt.fitted_p0 : fitted_p0_for(t.zero_fraction()), opt.v2_max_width);
  CompressedMatrix m = encode_codes(t, opt.threads, Codec::kV2, [&](int64_t r, auto&& sink) {
    encode_row_v2(cb, t.symbols.data() + r * t.cols, t.cols, sink);
  });
  m.dictionary = cb.dictionary;
  return m;
}

}  // namespace detail

std::shared_ptr<const FittedDictionary> v2_dictionary(double p0, int max_width) {
  return detail::v2_codebook(p0, max_width).dictionary;
}

}  // namespace qmoe
