#include <cmath>
#include <string>

#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"

namespace qmoe {
namespace {

template <class Load>
void ternarize_rows(TernaryMatrix& t, int64_t ld, Load&& load) {
  const int64_t rows = t.rows, cols = t.cols;
  bool bad = false;
  int64_t bad_row = 0;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float mn = 0.0f, mx = 0.0f;
    bool finite = true;
    for (int64_t c = 0; c < cols; ++c) {
      const float w = load(r * ld + c);
      finite &= std::isfinite(w);
      mn = std::min(mn, w);
      mx = std::max(mx, w);
    }
    if (!finite) {
#pragma omp critical
      {
        if (!bad || r < bad_row) bad_row = r;
        bad = true;
      }
      continue;
    }
    uint16_t lo_bits = float_to_bf16(mn);
    uint16_t hi_bits = float_to_bf16(mx);
    float lo = bf16_to_float(lo_bits), hi = bf16_to_float(hi_bits);
    if (lo == 0.0f && hi == 0.0f) {
      lo_bits = float_to_bf16(-1.0f);
      hi_bits = float_to_bf16(1.0f);
      lo = -1.0f;
      hi = 1.0f;
    }
    t.levels[2 * r] = lo_bits;
    t.levels[2 * r + 1] = hi_bits;
    const float hi_t = hi / 2, lo_t = lo / 2;
    uint8_t* out = t.symbols.data() + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float w = load(r * ld + c);
      out[c] = w > hi_t ? 2 : (w < lo_t ? 1 : 0);
    }
  }
  if (bad)
    throw InvalidArgument("ternarize: row " + std::to_string(bad_row) +
                          " holds a non-finite weight");
}

}  // namespace

TernaryMatrix ternarize_rtn(const void* data, DType dtype, int64_t rows, int64_t cols, int64_t ld) {
  if (rows < 0 || cols < 0) throw InvalidArgument("ternarize: negative shape");
  if (ld == 0) ld = cols;
  if (ld < cols) throw InvalidArgument("ternarize: row stride smaller than the number of columns");
  if (data == nullptr && rows * cols > 0) throw InvalidArgument("ternarize: null data");
  TernaryMatrix t(rows, cols);
  switch (dtype) {
    case DType::kF32: {
      auto p = static_cast<const float*>(data);
      ternarize_rows(t, ld, [p](int64_t i) { return p[i]; });
      break;
    }
    case DType::kF16: {
      auto p = static_cast<const uint16_t*>(data);
      ternarize_rows(t, ld, [p](int64_t i) { return fp16_to_float(p[i]); });
      break;
    }
    case DType::kBF16: {
      auto p = static_cast<const uint16_t*>(data);
      ternarize_rows(t, ld, [p](int64_t i) { return bf16_to_float(p[i]); });
      break;
    }
    default:
      throw InvalidArgument("ternarize: unsupported dtype " + std::string(dtype_name(dtype)) +
                            " (F32, F16 or BF16 expected)");
  }
  return t;
}

}  // namespace qmoe
