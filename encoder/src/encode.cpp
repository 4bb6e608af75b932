// encode() and transcode() over every codec: the table of the codecs' encoders (each in its folder,
// format/codecs/<codec>/encode.cpp), the automatic codec choice, and what the encoders share.
#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "encode_internal.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/codecs/p5.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace qmoe {
namespace detail {

// Each codec's encoder, defined in its folder.
CompressedMatrix encode_v1(const TernaryMatrix& t, const EncodeOptions& opt);
CompressedMatrix encode_v2(const TernaryMatrix& t, const EncodeOptions& opt);
CompressedMatrix encode_v3(const TernaryMatrix& t, const EncodeOptions& opt);
CompressedMatrix encode_g4(const TernaryMatrix& t, const EncodeOptions& opt);
CompressedMatrix encode_p5(const TernaryMatrix& t, const EncodeOptions& opt);

void check_symbols(const TernaryMatrix& t) {
  if (t.rows < 0 || t.cols < 0) throw InvalidArgument("encode: negative shape");
  if (t.symbols.size() != static_cast<size_t>(t.rows * t.cols)) {
    throw InvalidArgument("encode: " + std::to_string(t.symbols.size()) + " symbols for a " +
                          std::to_string(t.rows) + "x" + std::to_string(t.cols) + " matrix");
  }
  if (t.levels.size() != static_cast<size_t>(2 * t.rows)) {
    throw InvalidArgument("encode: levels must hold 2*rows values");
  }
  uint8_t bad = 0;
  for (uint8_t v : t.symbols) bad |= (v > 2) ? 1 : 0;
  if (bad) throw InvalidArgument("encode: a symbol is not 0, 1 or 2");
}

namespace {

// Each codec's encoder, indexed by Codec (the order of kCodecs).
using EncodeFn = CompressedMatrix (*)(const TernaryMatrix&, const EncodeOptions&);
constexpr std::array<EncodeFn, kCodecs.size()> kEncoders = {encode_v1, encode_v2, encode_v3,
                                                            encode_g4, encode_p5};

CompressedMatrix encode_with(Codec codec, const TernaryMatrix& t, const EncodeOptions& opt) {
  return kEncoders[static_cast<size_t>(codec)](t, opt);
}

}  // namespace
}  // namespace detail

double fitted_p0_for(double zero_fraction) {
  const double k = std::nearbyint(std::clamp(zero_fraction, 0.0, 1.0) * 64.0);
  return std::clamp(k, 32.0, 63.0) / 64.0;
}

CompressedMatrix transcode(const CompressedView& m, const EncodeOptions& opt) {
  validate_layout(m, "transcode");
  if (m.has_dictionary()) validate_dictionary(m.codec, m.dictionary, "transcode");
  TernaryMatrix t(m.rows, m.cols);
  std::copy(m.levels.begin(), m.levels.end(), t.levels.begin());
  // The reference decoder on blocks of rows in parallel; the error reported is the first block's.
  const int64_t nblocks = (m.rows + detail::kRowsPerBlock - 1) / detail::kRowsPerBlock;
  std::vector<std::string> errors(static_cast<size_t>(nblocks));
  {
    detail::ThreadCount tc(opt.threads);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t r0 = b * detail::kRowsPerBlock,
                    r1 = std::min(m.rows, r0 + detail::kRowsPerBlock);
      std::vector<int32_t> offsets;
      try {
        decode_symbols_ref(row_slice(m, r0, r1, offsets), t.symbols.data() + r0 * m.cols);
      } catch (const FormatError& e) {
        errors[static_cast<size_t>(b)] =
            "transcode: rows from " + std::to_string(r0) + ": " + e.what();
      }
    }
  }
  for (const std::string& e : errors)
    if (!e.empty()) throw FormatError(e);
  return encode(t, opt);
}

CompressedMatrix encode(const TernaryMatrix& t, const EncodeOptions& opt) {
  detail::check_symbols(t);
  if (opt.codec) return detail::encode_with(*opt.codec, t, opt);
  // Automatic: the target's codec, or qmoe-p5 where that is smaller (a dense matrix).
  CompressedMatrix m = detail::encode_with(auto_codec(opt.target), t, opt);
  const int64_t p5_bytes = t.rows * p5::row_bytes(t.cols) + 4 * t.rows;
  if (p5_bytes < m.view().compressed_bytes()) return detail::encode_with(Codec::kP5, t, opt);
  return m;
}

}  // namespace qmoe
