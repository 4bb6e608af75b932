// In-memory forms of a ternary matrix: plain symbols (TernaryMatrix), an owning encoded matrix
// (CompressedMatrix) and a non-owning view of one (CompressedView), e.g. into an mmapped container.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/format/codec.h"
#include "qmoe/format/codec_layout.h"

namespace qmoe {

// R x C ternary matrix. symbols: R*C bytes, row-major, each 0, 1 or 2.
// levels: 2*R bf16 bit patterns, (lo_r, hi_r) at [2r, 2r+1], lo_r <= 0 <= hi_r.
struct TernaryMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> symbols;
  std::vector<uint16_t> levels;

  TernaryMatrix() = default;
  TernaryMatrix(int64_t r, int64_t c)
      : rows(r), cols(c), symbols(static_cast<size_t>(r * c)), levels(static_cast<size_t>(2 * r)) {}
  // Dense float value of every weight (R*C floats, row-major).
  std::vector<float> to_dense() const;
  double zero_fraction() const;
};

// Non-owning view of an encoded matrix. Which members are used depends on the codec:
//   qmoe-v1: codes (num_codes uint16), row_offsets (rows+1 int32; row r is codes
//            [row_offsets[r], row_offsets[r+1]); row_offsets[0] = 0, row_offsets[rows] = num_codes)
//   qmoe-v3: as qmoe-v2, rows coded in pairs: pair p's codes are row 2p's range, odd rows' ranges
//            are empty (codec_layout.h, SPEC section 4.4); the dictionary holds v3 entry words
//   qmoe-v2: codes and row_offsets as for qmoe-v1, plus dictionary (v2::kEntries entry words,
//            codec_layout.h) and dictionary_id, the XXH3-64 of the dictionary's bytes: decoders
//            cache what they derive from a dictionary under this id
//   qmoe-p5: packed (rows * p5::row_bytes(cols) bytes)
//   qmoe-g4: tokens (gap tokens, two per byte), kinds (one bit per non-zero symbol) and
//            group_offsets (2 * (g4::groups(rows) + 1) int32: the first token and the first kind
//            bit of each group of 4 rows, then the ends; codec_layout.h, SPEC section 4.5). In a
//            view they index `tokens` and `kinds` from any start (a row slice keeps its groups'
//            offsets); a whole matrix starts at (0, 0) and ends at the streams' sizes.
//   all    : levels (2*rows bf16 bits, as in TernaryMatrix)
// A view obtained from the container reader or the encoder has been validated (see validate()).
struct CompressedView {
  Codec codec = Codec::kV1;
  int64_t rows = 0;
  int64_t cols = 0;
  std::span<const uint16_t> codes;
  std::span<const int32_t> row_offsets;
  std::span<const uint8_t> packed;
  std::span<const uint16_t> levels;
  std::span<const uint32_t> dictionary;
  uint64_t dictionary_id = 0;
  std::span<const uint8_t> tokens;
  std::span<const uint8_t> kinds;
  std::span<const int32_t> group_offsets;

  // Whether the matrix is a codeword stream (qmoe-v1, qmoe-v2 or qmoe-v3).
  bool has_codes() const { return codec_traits(codec).has_codes(); }
  // Whether the matrix carries its own dictionary (qmoe-v2 or qmoe-v3).
  bool has_dictionary() const { return codec_traits(codec).has_fitted_dictionary(); }
  // Bytes of codes, offsets and levels together (a qmoe-v2 dictionary is shared by the matrices
  // of a file and not counted).
  int64_t compressed_bytes() const;
  // compressed_bytes() * 8 / (rows * cols); the codes alone with codes_only.
  double bits_per_weight(bool codes_only = false) const;
};

// A view of rows [r0, r1) of `m`, whose sizes and row offsets must be sound (validate_layout() in
// reference.h): `offsets` receives the slice's rebased row offsets (qmoe-v1, qmoe-v2, qmoe-v3) or
// group offsets (qmoe-g4) and must outlive the view. A qmoe-v3 slice starts at an even row and ends
// at an even row or at the end (a pair cannot be split), a qmoe-g4 slice at multiples of 4 or at
// the end (groups of 4 rows); InvalidArgument otherwise.
CompressedView row_slice(const CompressedView& m, int64_t r0, int64_t r1,
                         std::vector<int32_t>& offsets);

// A qmoe-v2 or qmoe-v3 dictionary: 65536 entry words and their XXH3-64 (see CompressedView), plus
// the parameters the encoder built it for (0 when unknown, e.g. read from a file).
struct FittedDictionary {
  std::vector<uint32_t> entries;
  uint64_t id = 0;
  double p0 = 0;
  int max_width = 0;
};

// Owning encoded matrix; matrices encoded with the same qmoe-v2 / qmoe-v3 dictionary share it.
struct CompressedMatrix {
  Codec codec = Codec::kV1;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint16_t> codes;
  std::vector<int32_t> row_offsets;
  std::vector<uint8_t> packed;
  std::vector<uint16_t> levels;
  std::shared_ptr<const FittedDictionary> dictionary;  // qmoe-v2, qmoe-v3
  std::vector<uint8_t> tokens;                         // qmoe-g4
  std::vector<uint8_t> kinds;                          // qmoe-g4
  std::vector<int32_t> group_offsets;                  // qmoe-g4

  bool has_codes() const { return codec_traits(codec).has_codes(); }
  // Whether the matrix carries its own dictionary (qmoe-v2 or qmoe-v3).
  bool has_dictionary() const { return codec_traits(codec).has_fitted_dictionary(); }
  CompressedView view() const;
};

}  // namespace qmoe
