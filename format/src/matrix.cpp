#include "qmoe/format/matrix.h"

#include <cmath>
#include <string>

#include "qmoe/format/bf16.h"
#include "qmoe/format/error.h"

namespace qmoe {

std::vector<float> TernaryMatrix::to_dense() const {
  std::vector<float> out(symbols.size());
  for (int64_t r = 0; r < rows; ++r) {
    const float lo = bf16_to_float(levels[2 * r]);
    const float hi = bf16_to_float(levels[2 * r + 1]);
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = symbol_value(symbols[r * cols + c], lo, hi);
  }
  return out;
}

double TernaryMatrix::zero_fraction() const {
  if (symbols.empty()) return 0.0;
  int64_t zeros = 0;
  for (uint8_t s : symbols) zeros += (s == 0);
  return static_cast<double>(zeros) / static_cast<double>(symbols.size());
}

int64_t CompressedView::compressed_bytes() const {
  const int64_t level_bytes = static_cast<int64_t>(levels.size_bytes());
  if (has_codes()) {
    return static_cast<int64_t>(codes.size_bytes() + row_offsets.size_bytes()) + level_bytes;
  }
  if (codec == Codec::kG4) {
    return static_cast<int64_t>(tokens.size_bytes() + kinds.size_bytes() +
                                group_offsets.size_bytes()) +
           level_bytes;
  }
  return static_cast<int64_t>(packed.size_bytes()) + level_bytes;
}

double CompressedView::bits_per_weight(bool codes_only) const {
  const double weights = static_cast<double>(rows) * static_cast<double>(cols);
  if (weights == 0) return 0.0;
  const double code_bytes =
      static_cast<double>(has_codes()           ? codes.size_bytes()
                          : codec == Codec::kG4 ? tokens.size_bytes() + kinds.size_bytes()
                                                : packed.size_bytes());
  const double bytes = codes_only ? code_bytes : static_cast<double>(compressed_bytes());
  return bytes * 8.0 / weights;
}

CompressedView row_slice(const CompressedView& m, int64_t r0, int64_t r1,
                         std::vector<int32_t>& offsets) {
  if (m.codec == Codec::kV3 && (r0 % 2 != 0 || (r1 % 2 != 0 && r1 != m.rows))) {
    throw InvalidArgument("row_slice: a qmoe-v3 matrix codes rows in pairs; rows [" +
                          std::to_string(r0) + ", " + std::to_string(r1) + ") split a pair");
  }
  if (m.codec == Codec::kG4 && (r0 % g4::kRows != 0 || (r1 % g4::kRows != 0 && r1 != m.rows))) {
    throw InvalidArgument("row_slice: a qmoe-g4 matrix codes rows in groups of 4; rows [" +
                          std::to_string(r0) + ", " + std::to_string(r1) + ") split a group");
  }
  CompressedView v = m;
  v.rows = r1 - r0;
  v.levels = m.levels.subspan(static_cast<size_t>(2 * r0), static_cast<size_t>(2 * (r1 - r0)));
  if (m.has_codes()) {
    const int32_t base = m.row_offsets[static_cast<size_t>(r0)];
    offsets.resize(static_cast<size_t>(r1 - r0 + 1));
    for (int64_t r = r0; r <= r1; ++r)
      offsets[static_cast<size_t>(r - r0)] = m.row_offsets[static_cast<size_t>(r)] - base;
    v.row_offsets = offsets;
    v.codes = m.codes.subspan(static_cast<size_t>(base), static_cast<size_t>(offsets.back()));
  } else if (m.codec == Codec::kG4) {
    // The slice's groups, their offsets rebased to the bytes that hold their first token and
    // first kind bit (a group may start inside a byte).
    const int64_t g0 = r0 / g4::kRows, g1 = g4::groups(r1);
    const int32_t* off = m.group_offsets.data();
    const int32_t tok_base = off[2 * g0] / 2 * 2, kind_base = off[2 * g0 + 1] / 8 * 8;
    offsets.resize(static_cast<size_t>(2 * (g1 - g0 + 1)));
    for (int64_t g = g0; g <= g1; ++g) {
      offsets[static_cast<size_t>(2 * (g - g0))] = off[2 * g] - tok_base;
      offsets[static_cast<size_t>(2 * (g - g0) + 1)] = off[2 * g + 1] - kind_base;
    }
    v.group_offsets = offsets;
    v.tokens = m.tokens.subspan(static_cast<size_t>(tok_base / 2),
                                static_cast<size_t>((off[2 * g1] - tok_base + 1) / 2));
    v.kinds = m.kinds.subspan(static_cast<size_t>(kind_base / 8),
                              static_cast<size_t>((off[2 * g1 + 1] - kind_base + 7) / 8));
  } else {
    const int64_t rb = p5::row_bytes(m.cols);
    v.packed = m.packed.subspan(static_cast<size_t>(r0 * rb), static_cast<size_t>((r1 - r0) * rb));
  }
  return v;
}

CompressedView CompressedMatrix::view() const {
  CompressedView v;
  v.codec = codec;
  v.rows = rows;
  v.cols = cols;
  v.codes = codes;
  v.row_offsets = row_offsets;
  v.packed = packed;
  v.levels = levels;
  v.tokens = tokens;
  v.kinds = kinds;
  v.group_offsets = group_offsets;
  if (dictionary) {
    v.dictionary = dictionary->entries;
    v.dictionary_id = dictionary->id;
  }
  return v;
}

}  // namespace qmoe
