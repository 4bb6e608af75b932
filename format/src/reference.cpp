// Reference decoding and validation, following format/SPEC.md section by section. Clarity first:
// the fast kernels are tested against these functions. What differs between codecs is in each
// codec's folder (format/codecs/<codec>/reference.cpp), behind codec_ops().
#include "qmoe/format/reference.h"

#include <xxhash.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "codecs/ops.h"
#include "qmoe/format/error.h"

namespace qmoe {

using internal::codec_ops;
using internal::fail;

namespace {

void check_sizes(const CompressedView& m, std::string_view what) {
  if (m.rows < 0 || m.cols < 0) fail(what, "negative shape");
  if (m.levels.size() != static_cast<size_t>(2 * m.rows)) {
    fail(what, "levels hold " + std::to_string(m.levels.size()) +
                   " values, expected 2*rows = " + std::to_string(2 * m.rows));
  }
  codec_ops(m.codec).check_sizes(m, what);
}

// Validates `entries` as a dictionary of `codec` and wraps them with their id.
std::shared_ptr<const FittedDictionary> make_fitted_dictionary(Codec codec,
                                                               std::vector<uint32_t> entries,
                                                               std::string_view what) {
  codec_ops(codec).check_dictionary(entries, what);
  auto d = std::make_shared<FittedDictionary>();
  d->id = v2_dictionary_id(entries);
  d->entries = std::move(entries);
  return d;
}

}  // namespace

uint64_t v2_dictionary_id(std::span<const uint32_t> entries) {
  return XXH3_64bits(entries.data(), entries.size_bytes());
}

void validate_v2_dictionary(std::span<const uint32_t> entries, std::string_view what) {
  codec_ops(Codec::kV2).check_dictionary(entries, what);
}

void validate_v3_dictionary(std::span<const uint32_t> entries, std::string_view what) {
  codec_ops(Codec::kV3).check_dictionary(entries, what);
}

std::shared_ptr<const FittedDictionary> make_v2_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what) {
  return make_fitted_dictionary(Codec::kV2, std::move(entries), what);
}

std::shared_ptr<const FittedDictionary> make_v3_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what) {
  return make_fitted_dictionary(Codec::kV3, std::move(entries), what);
}

void validate_dictionary(Codec codec, std::span<const uint32_t> entries, std::string_view what) {
  // A codec without a fitted dictionary: qmoe-v2's checks.
  const auto check = codec_ops(codec).check_dictionary;
  (check != nullptr ? check : validate_v2_dictionary)(entries, what);
}

void validate_layout(const CompressedView& m, std::string_view what) {
  check_sizes(m, what);
}

int64_t max_compressed_bytes(Codec c, int64_t rows, int64_t cols) {
  return internal::codec_ops(c).max_bytes(rows, cols);
}

void validate(const CompressedView& m, std::string_view what) {
  if (m.has_dictionary()) {  // sizes and rows: validate_codes()
    validate_dictionary(m.codec, m.dictionary, what);
    if (v2_dictionary_id(m.dictionary) != m.dictionary_id) {
      fail(what, "dictionary_id is not the XXH3-64 of the " + std::string(codec_name(m.codec)) +
                     " dictionary");
    }
  }
  validate_codes(m, what);
}

void validate_codes(const CompressedView& m, std::string_view what) {
  check_sizes(m, what);
  const internal::CodecOps& ops = codec_ops(m.codec);
  if (ops.check_streams != nullptr) ops.check_streams(m, what);
  ops.check_rows(m, what);
}

void decode_symbols_ref(const CompressedView& m, uint8_t* symbols) {
  check_sizes(m, {});
  codec_ops(m.codec).decode_symbols(m, symbols);
}

void decode_ref(const CompressedView& m, float* out) {
  check_sizes(m, {});
  codec_ops(m.codec).decode_values(m, out);
}

void matvec_ref(const CompressedView& m, const float* x, float* y) {
  check_sizes(m, {});
  codec_ops(m.codec).matvec(m, x, y);
}

}  // namespace qmoe
