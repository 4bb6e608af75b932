// The qmoe-p5 encoder (format/SPEC.md 4.2.4): five symbols per byte, base 3.
#include "encode_internal.h"
#include "qmoe/format/codecs/p5.h"

namespace qmoe::detail {

CompressedMatrix encode_p5(const TernaryMatrix& t, const EncodeOptions& opt) {
  CompressedMatrix m;
  m.codec = Codec::kP5;
  m.rows = t.rows;
  m.cols = t.cols;
  const int64_t nb = p5::row_bytes(t.cols);
  m.packed.assign(static_cast<size_t>(t.rows * nb), 0);
  ThreadCount tc(opt.threads);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < t.rows; ++r) {
    const uint8_t* s = t.symbols.data() + r * t.cols;
    uint8_t* out = m.packed.data() + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      int v = 0;
      for (int i = p5::kSymbolsPerByte - 1; i >= 0; --i) {
        const int64_t c = 5 * b + i;
        v = 3 * v + (c < t.cols ? s[c] : 0);
      }
      out[b] = static_cast<uint8_t>(v);
    }
  }
  m.levels = t.levels;
  return m;
}

}  // namespace qmoe::detail
