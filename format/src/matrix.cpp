#include "qmoe/format/matrix.h"

#include <cmath>
#include <string>

#include "qmoe/format/bf16.h"
#include "qmoe/format/error.h"

namespace qmoe {

std::string_view codec_name(Codec c) {
  switch (c) {
    case Codec::kV1:
      return "qmoe-v1";
    case Codec::kP5:
      return "qmoe-p5";
    case Codec::kV2:
      return "qmoe-v2";
    case Codec::kV3:
      return "qmoe-v3";
  }
  return "unknown";
}

std::optional<Codec> codec_from_name(std::string_view s) {
  if (s == "qmoe-v1") return Codec::kV1;
  if (s == "qmoe-p5") return Codec::kP5;
  if (s == "qmoe-v2") return Codec::kV2;
  if (s == "qmoe-v3") return Codec::kV3;
  return std::nullopt;
}

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
  return static_cast<int64_t>(packed.size_bytes()) + level_bytes;
}

double CompressedView::bits_per_weight(bool codes_only) const {
  const double weights = static_cast<double>(rows) * static_cast<double>(cols);
  if (weights == 0) return 0.0;
  const double bytes =
      codes_only ? static_cast<double>(has_codes() ? codes.size_bytes() : packed.size_bytes())
                 : static_cast<double>(compressed_bytes());
  return bytes * 8.0 / weights;
}

CompressedView row_slice(const CompressedView& m, int64_t r0, int64_t r1,
                         std::vector<int32_t>& offsets) {
  if (m.codec == Codec::kV3 && (r0 % 2 != 0 || (r1 % 2 != 0 && r1 != m.rows))) {
    throw InvalidArgument("row_slice: a qmoe-v3 matrix codes rows in pairs; rows [" +
                          std::to_string(r0) + ", " + std::to_string(r1) + ") split a pair");
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
  if (dictionary) {
    v.dictionary = dictionary->entries;
    v.dictionary_id = dictionary->id;
  }
  return v;
}

}  // namespace qmoe
