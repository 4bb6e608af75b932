#include "qmoe/format/matrix.h"

#include <cmath>

#include "codecs/ops.h"
#include "matrix_internal.h"
#include "qmoe/core/bf16.h"

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
  int64_t bytes = 0;
  for (const Member mb : codec_traits(codec).members())
    bytes += static_cast<int64_t>(internal::member_bytes(*this, mb).size());
  return bytes;
}

double CompressedView::bits_per_weight(bool codes_only) const {
  const double weights = static_cast<double>(rows) * static_cast<double>(cols);
  if (weights == 0) return 0.0;
  size_t code_bytes = 0;  // the members that are not offsets or levels
  for (const Member mb : codec_traits(codec).members()) {
    if (mb != Member::kRowOffsets && mb != Member::kGroupOffsets && mb != Member::kLevels)
      code_bytes += internal::member_bytes(*this, mb).size();
  }
  const double bytes =
      codes_only ? static_cast<double>(code_bytes) : static_cast<double>(compressed_bytes());
  return bytes * 8.0 / weights;
}

CompressedView row_slice(const CompressedView& m, int64_t r0, int64_t r1,
                         std::vector<int32_t>& offsets) {
  CompressedView v = m;
  internal::codec_ops(m.codec).slice(m, r0, r1, offsets, v);
  v.rows = r1 - r0;
  v.levels = m.levels.subspan(static_cast<size_t>(2 * r0), static_cast<size_t>(2 * (r1 - r0)));
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

namespace internal {

std::span<const std::byte> member_bytes(const CompressedView& m, Member member) {
  switch (member) {
    case Member::kCodes:
      return std::as_bytes(m.codes);
    case Member::kRowOffsets:
      return std::as_bytes(m.row_offsets);
    case Member::kPacked:
      return std::as_bytes(m.packed);
    case Member::kGroupOffsets:
      return std::as_bytes(m.group_offsets);
    case Member::kTokens:
      return std::as_bytes(m.tokens);
    case Member::kKinds:
      return std::as_bytes(m.kinds);
    case Member::kLevels:
      return std::as_bytes(m.levels);
  }
  return {};
}

}  // namespace internal
}  // namespace qmoe
