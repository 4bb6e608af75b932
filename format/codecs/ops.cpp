#include "codecs/ops.h"

#include <array>

#include "qmoe/format/codecs/v2.h"
#include "qmoe/format/error.h"

namespace qmoe::internal {

// Each codec's operations, defined in its folder (format/codecs/<codec>/reference.cpp).
extern const CodecOps kV1Ops, kV2Ops, kV3Ops, kG4Ops, kP5Ops;

const CodecOps& codec_ops(Codec c) {
  // Indexed by Codec, in the order of kCodecs.
  static constexpr std::array<const CodecOps*, kCodecs.size()> kOps = {&kV1Ops, &kV2Ops, &kV3Ops,
                                                                       &kG4Ops, &kP5Ops};
  return *kOps[static_cast<size_t>(c)];
}

void fail(std::string_view what, const std::string& msg) {
  if (what.empty()) throw FormatError(msg);
  throw FormatError(std::string(what) + ": " + msg);
}

void row_too_long(std::string_view what, int64_t r, int64_t cols) {
  fail(what, "row " + std::to_string(r) + " decodes to more than its " + std::to_string(cols) +
                 " columns");
}

void row_nonzero_past_end(std::string_view what, int64_t r) {
  fail(what, "row " + std::to_string(r) + " has a non-zero symbol past its last column");
}

void row_too_short(std::string_view what, int64_t r, int64_t decoded, int64_t cols) {
  fail(what, "row " + std::to_string(r) + " decodes to " + std::to_string(decoded) + " of its " +
                 std::to_string(cols) + " columns");
}

void bad_levels(std::string_view what, int64_t r, float lo, float hi) {
  fail(what, "row " + std::to_string(r) + " has invalid levels (lo " + std::to_string(lo) +
                 ", hi " + std::to_string(hi) + "; need finite lo <= 0 <= hi)");
}

void check_code_sizes(const CompressedView& m, std::string_view what) {
  if (m.row_offsets.size() != static_cast<size_t>(m.rows + 1)) {
    fail(what, "row_offsets hold " + std::to_string(m.row_offsets.size()) +
                   " values, expected rows+1 = " + std::to_string(m.rows + 1));
  }
  if (m.row_offsets[0] != 0)
    fail(what, "row_offsets[0] is " + std::to_string(m.row_offsets[0]) + ", not 0");
  for (int64_t r = 0; r < m.rows; ++r) {
    if (m.row_offsets[r + 1] < m.row_offsets[r]) {
      fail(what, "row_offsets decrease at row " + std::to_string(r) + " (" +
                     std::to_string(m.row_offsets[r]) + " > " +
                     std::to_string(m.row_offsets[r + 1]) + ")");
    }
  }
  if (static_cast<uint64_t>(m.row_offsets[m.rows]) != m.codes.size()) {
    fail(what, "row_offsets end at " + std::to_string(m.row_offsets[m.rows]) + " but there are " +
                   std::to_string(m.codes.size()) + " codes");
  }
  if (m.has_dictionary()) {
    if (m.dictionary.size() != static_cast<size_t>(v2::kEntries)) {
      fail(what, "the " + std::string(codec_name(m.codec)) + " dictionary holds " +
                     std::to_string(m.dictionary.size()) + " entries, expected 65536");
    }
  }
}

void slice_codes(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>& offsets,
                 CompressedView& v) {
  const int32_t base = m.row_offsets[static_cast<size_t>(r0)];
  offsets.resize(static_cast<size_t>(r1 - r0 + 1));
  for (int64_t r = r0; r <= r1; ++r)
    offsets[static_cast<size_t>(r - r0)] = m.row_offsets[static_cast<size_t>(r)] - base;
  v.row_offsets = offsets;
  v.codes = m.codes.subspan(static_cast<size_t>(base), static_cast<size_t>(offsets.back()));
}

void check_slice_units(const CompressedView& m, int64_t r0, int64_t r1, std::string_view units,
                       std::string_view unit) {
  const int64_t n = codec_traits(m.codec).row_unit;
  if (r0 % n != 0 || (r1 % n != 0 && r1 != m.rows)) {
    throw InvalidArgument("row_slice: a " + std::string(codec_name(m.codec)) +
                          " matrix codes rows in " + std::string(units) + "; rows [" +
                          std::to_string(r0) + ", " + std::to_string(r1) + ") split a " +
                          std::string(unit));
  }
}

}  // namespace qmoe::internal
