// What the reference decoder and validator (format/src/reference.cpp) ask of a codec: one CodecOps
// per codec, defined in the codec's folder (format/codecs/<codec>/reference.cpp) and listed by
// codec_ops() (ops.cpp). Also the errors that every codec words the same. Internal to qmoe_format.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/format/codec.h"
#include "qmoe/format/matrix.h"

namespace qmoe::internal {

// Each function throws FormatError whose message starts with `what` (none where empty). A row's
// decoder and its check report the same errors with the same messages.
struct CodecOps {
  // The sizes of the codec's members and their offsets (validate_layout()), after the shape and
  // the levels, which are checked for every codec. No decoding.
  void (*check_sizes)(const CompressedView& m, std::string_view what);
  // What validate_codes() checks of a whole matrix besides check_sizes, before its rows; nullptr:
  // nothing.
  void (*check_streams)(const CompressedView& m, std::string_view what);
  // validate_codes()'s check of every row, in order: its levels, then the errors decoding its
  // code raises, found as cheaply as the codec allows (a codeword at a time instead of a symbol at
  // a time).
  void (*check_rows)(const CompressedView& m, std::string_view what);
  // A matrix whose sizes are checked, decoded: its symbols and its values (rows*cols, row-major;
  // 0, lo or hi as float), and W x in double, in column order, rounded once to float (y[r] for
  // each row). Throw where a row does not decode to exactly its width.
  void (*decode_symbols)(const CompressedView& m, uint8_t* out);
  void (*decode_values)(const CompressedView& m, float* out);
  void (*matvec)(const CompressedView& m, const float* x, float* y);
  // The checks of a fitted dictionary's entries (validate_dictionary()); nullptr for a codec
  // without one.
  void (*check_dictionary)(std::span<const uint32_t> entries, std::string_view what);
  // row_slice(): the members of rows [r0, r1) of m (sizes checked) into v, their offsets rebased
  // into `offsets`; InvalidArgument first where the rows split a unit the codec codes together.
  void (*slice)(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>& offsets,
                CompressedView& v);
  // The most compressed_bytes() (matrix.h) a rows x cols matrix of the codec can take, whatever
  // its symbols (max_compressed_bytes() in reference.h).
  int64_t (*max_bytes)(int64_t rows, int64_t cols);
};

// The operations of codec c.
const CodecOps& codec_ops(Codec c);

// ---- errors ------------------------------------------------------------------------------------

// FormatError("<what>: <msg>"), or msg alone where `what` is empty.
[[noreturn]] void fail(std::string_view what, const std::string& msg);

// Row errors, worded once: the decoders and the row checks of validate() report the same.
[[noreturn]] void row_too_long(std::string_view what, int64_t r, int64_t cols);
[[noreturn]] void row_nonzero_past_end(std::string_view what, int64_t r);
[[noreturn]] void row_too_short(std::string_view what, int64_t r, int64_t decoded, int64_t cols);

// Row r's levels: finite, lo <= 0 <= hi.
[[noreturn]] void bad_levels(std::string_view what, int64_t r, float lo, float hi);
inline void check_levels(const CompressedView& m, int64_t r, std::string_view what) {
  const float lo = bf16_to_float(m.levels[2 * r]);
  const float hi = bf16_to_float(m.levels[2 * r + 1]);
  if (!std::isfinite(lo) || !std::isfinite(hi) || lo > 0.0f || hi < 0.0f) {
    bad_levels(what, r, lo, hi);
  }
}

// ---- shared checks -----------------------------------------------------------------------------

// check_sizes of a codeword stream (qmoe-v1, qmoe-v2, qmoe-v3): row offsets from 0, non-decreasing,
// ending at the number of codes; a fitted dictionary of 65536 entries.
void check_code_sizes(const CompressedView& m, std::string_view what);

// slice of a codeword stream: the rows' codes and row offsets.
void slice_codes(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>& offsets,
                 CompressedView& v);

// InvalidArgument unless rows [r0, r1) start and end on whole units of the codec's row_unit rows
// (codec.h) or end at the matrix's end: "row_slice: a <codec> matrix codes rows in <units>; rows
// [r0, r1) split a <unit>".
void check_slice_units(const CompressedView& m, int64_t r0, int64_t r1, std::string_view units,
                       std::string_view unit);

// ---- a codec as a class ------------------------------------------------------------------------

// The CodecOps of a codec described by a class C of static members:
//   C::decode_row(m, r, what, emit)  (required) calls emit(column, symbol) for every symbol of
//                                    row r in column order; throws where the row does not decode
//                                    to exactly its width. The decoders call it row by row with
//                                    emit inlined.
//   C::check_sizes, C::slice, C::max_bytes (required)
//   C::check_row(m, r, what)         (optional) row r's share of check_rows; default: decode_row
//                                    with an emit that does nothing
//   C::check_streams, C::check_dictionary (optional; default: nullptr)
template <class C>
constexpr CodecOps ops_of() {
  CodecOps ops{};
  ops.check_sizes = C::check_sizes;
  if constexpr (requires { &C::check_streams; }) ops.check_streams = C::check_streams;
  ops.check_rows = [](const CompressedView& m, std::string_view what) {
    for (int64_t r = 0; r < m.rows; ++r) {
      check_levels(m, r, what);
      if constexpr (requires { &C::check_row; }) {
        C::check_row(m, r, what);
      } else {
        C::decode_row(m, r, what, [](int64_t, int) {});
      }
    }
  };
  ops.decode_symbols = [](const CompressedView& m, uint8_t* out) {
    for (int64_t r = 0; r < m.rows; ++r) {
      uint8_t* row = out + r * m.cols;
      C::decode_row(m, r, {}, [&](int64_t c, int s) { row[c] = static_cast<uint8_t>(s); });
    }
  };
  ops.decode_values = [](const CompressedView& m, float* out) {
    for (int64_t r = 0; r < m.rows; ++r) {
      // Value of each symbol (codec_layout.h symbol_value()), as a table to keep the loop
      // branch-free.
      const float value[3] = {0.0f, bf16_to_float(m.levels[2 * r]),
                              bf16_to_float(m.levels[2 * r + 1])};
      float* row = out + r * m.cols;
      C::decode_row(m, r, {}, [&](int64_t c, int s) { row[c] = value[s]; });
    }
  };
  ops.matvec = [](const CompressedView& m, const float* x, float* y) {
    for (int64_t r = 0; r < m.rows; ++r) {
      const double lo = bf16_to_float(m.levels[2 * r]);
      const double hi = bf16_to_float(m.levels[2 * r + 1]);
      double acc = 0.0;
      C::decode_row(m, r, {}, [&](int64_t c, int s) {
        if (s == 1) acc += lo * x[c];
        if (s == 2) acc += hi * x[c];
      });
      y[r] = static_cast<float>(acc);
    }
  };
  if constexpr (requires { &C::check_dictionary; }) ops.check_dictionary = C::check_dictionary;
  ops.slice = C::slice;
  ops.max_bytes = C::max_bytes;
  return ops;
}

}  // namespace qmoe::internal
