// Reference decoding and validation, following format/SPEC.md section by section. Clarity first:
// the fast kernels are tested against these functions.
#include "qmoe/format/reference.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "qmoe/format/bf16.h"
#include "qmoe/format/error.h"

namespace qmoe {
namespace {

[[noreturn]] void fail(std::string_view what, const std::string& msg) {
  if (what.empty()) throw FormatError(msg);
  throw FormatError(std::string(what) + ": " + msg);
}

// Row errors, worded once: the decoder and the codeword checks of validate() report the same.
[[noreturn]] void row_too_long(std::string_view what, int64_t r, int64_t cols) {
  fail(what, "row " + std::to_string(r) + " decodes to more than its " + std::to_string(cols) +
                 " columns");
}
[[noreturn]] void row_nonzero_past_end(std::string_view what, int64_t r) {
  fail(what, "row " + std::to_string(r) + " has a non-zero symbol past its last column");
}
[[noreturn]] void row_too_short(std::string_view what, int64_t r, int64_t decoded, int64_t cols) {
  fail(what, "row " + std::to_string(r) + " decodes to " + std::to_string(decoded) + " of its " +
                 std::to_string(cols) + " columns");
}

void check_sizes(const CompressedView& m, std::string_view what) {
  if (m.rows < 0 || m.cols < 0) fail(what, "negative shape");
  if (m.levels.size() != static_cast<size_t>(2 * m.rows)) {
    fail(what, "levels hold " + std::to_string(m.levels.size()) +
                   " values, expected 2*rows = " + std::to_string(2 * m.rows));
  }
  if (m.has_codes()) {
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
    if (m.codec == Codec::kV3) {
      for (int64_t r = 1; r < m.rows; r += 2) {
        if (m.row_offsets[r] != m.row_offsets[r + 1]) {
          fail(what, "row " + std::to_string(r) +
                         " has codes; a qmoe-v3 pair's codes are its even row's range");
        }
      }
    }
  } else {
    const uint64_t want =
        static_cast<uint64_t>(m.rows) * static_cast<uint64_t>(p5::row_bytes(m.cols));
    if (m.packed.size() != want) {
      fail(what, "packed data holds " + std::to_string(m.packed.size()) + " bytes, expected " +
                     std::to_string(want));
    }
  }
}

// Calls emit(column, symbol) for every symbol of row r, in column order. Throws on a row that
// does not decode to exactly its width.
template <class Emit>
void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
  if (m.codec == Codec::kV1) {
    const int32_t* table = v1_decode_table();
    const int64_t pairs_needed = v1::row_pairs(m.cols);
    int64_t pair = 0;
    for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
      const uint16_t code = m.codes[i];
      const uint32_t w[2] = {static_cast<uint32_t>(table[2 * code]),
                             static_cast<uint32_t>(table[2 * code + 1])};
      const int n = v1::entry_pairs(w[0]);
      if (pair + n > pairs_needed) {
        row_too_long(what, r, m.cols);
      }
      for (int k = 0; k < n; ++k) {
        const uint32_t word = w[k / v1::kPairsPerWord];
        const int j = k % v1::kPairsPerWord;
        const int64_t col = 2 * (pair + k);
        emit(col, v1::pair_s0(word, j));
        const int s1 = v1::pair_s1(word, j);
        if (col + 1 < m.cols) {
          emit(col + 1, s1);
        } else if (s1 != 0) {
          row_nonzero_past_end(what, r);
        }
      }
      pair += n;
    }
    if (pair != pairs_needed) {
      row_too_short(what, r, std::min<int64_t>(2 * pair, m.cols), m.cols);
    }
  } else if (m.codec == Codec::kV2) {
    // The last codeword may run past the row's end, over zero symbols only.
    int64_t pos = 0;
    for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
      if (pos >= m.cols) {
        row_too_long(what, r, m.cols);
      }
      const uint32_t e = m.dictionary[m.codes[i]];
      const int64_t end = std::min<int64_t>(pos + v2::entry_width(e), m.cols);
      int64_t c = pos;
      for (int j = 0; j < v2::kSlots && v2::slot_symbol(e, j) != 0; ++j) {
        const int64_t col = pos + v2::slot_col(e, j);
        if (col >= end) {
          row_nonzero_past_end(what, r);
        }
        if (col < c) {  // only an unvalidated dictionary has such an entry
          fail(what, "row " + std::to_string(r) + ": qmoe-v2 dictionary entry " +
                         std::to_string(m.codes[i]) + " has slot columns out of order");
        }
        for (; c < col; ++c) emit(c, 0);
        emit(c++, v2::slot_symbol(e, j));
      }
      for (; c < end; ++c) emit(c, 0);
      pos = end;
    }
    if (pos != m.cols) {
      row_too_short(what, r, pos, m.cols);
    }
  } else if (m.codec == Codec::kV3) {
    // Row r is one half of pair r / 2; the pair's stream is checked whole either way, so both of
    // its rows report the same errors. The zero row that completes an odd-height matrix's last
    // pair must be zero.
    const int64_t pr = r - (r & 1);
    const bool lone = pr + 1 == m.rows;
    const int half = static_cast<int>(r & 1);
    int64_t pos = 0;
    for (int32_t i = m.row_offsets[pr]; i < m.row_offsets[pr + 1]; ++i) {
      if (pos >= m.cols) {
        row_too_long(what, pr, m.cols);
      }
      const uint32_t e = m.dictionary[m.codes[i]];
      const int64_t end = std::min<int64_t>(pos + v3::entry_width(e), m.cols);
      int64_t c = pos;
      for (int j = 0; j < v3::kSlots && v3::slot_bits(e, j) != 0; ++j) {
        const int64_t col = pos + v3::slot_col(e, j);
        if (col >= end) {
          row_nonzero_past_end(what, pr);
        }
        if (col < c) {  // only an unvalidated dictionary has such an entry
          fail(what, "row " + std::to_string(pr) + ": qmoe-v3 dictionary entry " +
                         std::to_string(m.codes[i]) + " has slot columns out of order");
        }
        if (lone && v3::slot_symbol(e, j, 1) != 0) {
          fail(what, "row " + std::to_string(pr) +
                         " is the last of an odd height; its pair's second row must be zero");
        }
        for (; c < col; ++c) emit(c, 0);
        emit(c++, v3::slot_symbol(e, j, half));
      }
      for (; c < end; ++c) emit(c, 0);
      pos = end;
    }
    if (pos != m.cols) {
      row_too_short(what, pr, pos, m.cols);
    }
  } else {
    const int64_t nb = p5::row_bytes(m.cols);
    const uint8_t* row = m.packed.data() + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      int v = row[b];
      if (v > p5::kMaxByte)
        fail(what, "row " + std::to_string(r) + " has packed byte " + std::to_string(v) + " > 242");
      for (int i = 0; i < p5::kSymbolsPerByte; ++i, v /= 3) {
        const int64_t col = 5 * b + i;
        if (col < m.cols) {
          emit(col, v % 3);
        } else if (v % 3 != 0) {
          fail(what, "row " + std::to_string(r) + " has a non-zero padding symbol");
        }
      }
    }
  }
}

// The checks decode_row() makes on a code row, a codeword at a time instead of a symbol at a time
// (validation of a container, 22-24 symbols per codeword), with the same messages.
// qmoe-v1: the entries' pairs cover the row's pairs exactly; an odd width's half pair has s1 = 0.
void check_row_v1(const CompressedView& m, int64_t r, std::string_view what) {
  const int32_t* table = v1_decode_table();
  const int64_t pairs_needed = v1::row_pairs(m.cols);
  int64_t pair = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    const uint16_t code = m.codes[i];
    const int n = v1::entry_pairs(static_cast<uint32_t>(table[2 * code]));
    if (pair + n > pairs_needed) {
      row_too_long(what, r, m.cols);
    }
    if ((m.cols & 1) != 0 && pair + n == pairs_needed) {
      const int k = n - 1;  // the entry's last pair is the row's half pair
      const auto word = static_cast<uint32_t>(table[2 * code + k / v1::kPairsPerWord]);
      if (v1::pair_s1(word, k % v1::kPairsPerWord) != 0) {
        row_nonzero_past_end(what, r);
      }
    }
    pair += n;
  }
  if (pair != pairs_needed) {
    row_too_short(what, r, std::min<int64_t>(2 * pair, m.cols), m.cols);
  }
}

// qmoe-v2: every codeword starts inside the row, the last one's non-zero symbols lie inside it, and
// the codewords cover the row exactly.
void check_row_v2(const CompressedView& m, int64_t r, std::string_view what) {
  int64_t pos = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    if (pos >= m.cols) {
      row_too_long(what, r, m.cols);
    }
    const uint32_t e = m.dictionary[m.codes[i]];
    int last = -1;  // column of the entry's last non-zero symbol
    for (int j = 0; j < v2::kSlots; ++j)
      if (v2::slot_symbol(e, j) != 0) last = v2::slot_col(e, j);
    if (pos + last >= m.cols) {
      row_nonzero_past_end(what, r);
    }
    pos = std::min<int64_t>(pos + v2::entry_width(e), m.cols);
  }
  if (pos != m.cols) {
    row_too_short(what, r, pos, m.cols);
  }
}

// qmoe-v3: check_row_v2 for the pair whose even row is r (the pair's codes are r's range).
void check_pair_v3(const CompressedView& m, int64_t r, std::string_view what) {
  const bool lone = r + 1 == m.rows;
  int64_t pos = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    if (pos >= m.cols) {
      row_too_long(what, r, m.cols);
    }
    const uint32_t e = m.dictionary[m.codes[i]];
    // Slot by slot, in the order of decode_row()'s checks, so that both report the same error.
    for (int j = 0; j < v3::kSlots && v3::slot_bits(e, j) != 0; ++j) {
      if (pos + v3::slot_col(e, j) >= m.cols) {
        row_nonzero_past_end(what, r);
      }
      if (lone && v3::slot_symbol(e, j, 1) != 0) {
        fail(what, "row " + std::to_string(r) +
                       " is the last of an odd height; its pair's second row must be zero");
      }
    }
    pos = std::min<int64_t>(pos + v3::entry_width(e), m.cols);
  }
  if (pos != m.cols) {
    row_too_short(what, r, pos, m.cols);
  }
}

}  // namespace

uint64_t v2_dictionary_id(std::span<const uint32_t> entries) {
  return XXH3_64bits(entries.data(), entries.size_bytes());
}

void validate_v2_dictionary(std::span<const uint32_t> entries, std::string_view what) {
  if (entries.size() != static_cast<size_t>(v2::kEntries)) {
    fail(what, "a qmoe-v2 dictionary has 65536 entries, not " + std::to_string(entries.size()));
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint32_t e = entries[i];
    auto bad = [&](const std::string& why) {
      char word[16];
      std::snprintf(word, sizeof word, "%08x", e);
      fail(what, "qmoe-v2 dictionary entry " + std::to_string(i) + " (0x" + word + "): " + why);
    };
    const int width = v2::entry_width(e);
    if (width < 1) bad("width 0");
    if ((e >> 24) & 3u) bad("reserved bits 24..25 are set");
    int prev = -1;
    bool unused_seen = false;
    for (int j = 0; j < v2::kSlots; ++j) {
      const int sym = v2::slot_symbol(e, j);
      const int col = v2::slot_col(e, j);
      if (sym == 3) bad("slot " + std::to_string(j) + " is both low and high");
      if (sym == 0) {
        if (col != 0) bad("unused slot " + std::to_string(j) + " has a column");
        unused_seen = true;
        continue;
      }
      if (unused_seen) bad("slot " + std::to_string(j) + " is used after an unused one");
      if (col <= prev) bad("slot columns are not increasing");
      if (col >= width) bad("slot " + std::to_string(j) + " lies past the entry's width");
      prev = col;
    }
  }
}

void validate_v3_dictionary(std::span<const uint32_t> entries, std::string_view what) {
  if (entries.size() != static_cast<size_t>(v3::kEntries)) {
    fail(what, "a qmoe-v3 dictionary has 65536 entries, not " + std::to_string(entries.size()));
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint32_t e = entries[i];
    auto bad = [&](const std::string& why) {
      char word[16];
      std::snprintf(word, sizeof word, "%08x", e);
      fail(what, "qmoe-v3 dictionary entry " + std::to_string(i) + " (0x" + word + "): " + why);
    };
    const int width = v3::entry_width(e);
    if (width < 1) bad("width 0");
    if ((e >> 25) & 1u) bad("reserved bit 25 is set");
    int prev = -1;
    bool unused_seen = false;
    for (int j = 0; j < v3::kSlots; ++j) {
      const uint32_t bits = v3::slot_bits(e, j);
      const uint32_t field = j == 0 ? (e >> v3::kFirstShift) & 31u : (e >> (4 * (j - 1))) & 15u;
      if (bits == 0) {
        if (field != 0) bad("unused slot " + std::to_string(j) + " has a column");
        unused_seen = true;
        continue;
      }
      if ((bits & 3u) == 3u || (bits & 12u) == 12u) {
        bad("slot " + std::to_string(j) + " is both low and high in one row");
      }
      if (unused_seen) bad("slot " + std::to_string(j) + " is used after an unused one");
      const int col = v3::slot_col(e, j);
      if (col <= prev) bad("slot columns are not increasing");
      if (col >= width) bad("slot " + std::to_string(j) + " lies past the entry's width");
      prev = col;
    }
  }
}

std::shared_ptr<const V2Dictionary> make_v3_dictionary(std::vector<uint32_t> entries,
                                                       std::string_view what) {
  validate_v3_dictionary(entries, what);
  auto d = std::make_shared<V2Dictionary>();
  d->id = v2_dictionary_id(entries);
  d->entries = std::move(entries);
  return d;
}

void validate_dictionary(Codec codec, std::span<const uint32_t> entries, std::string_view what) {
  if (codec == Codec::kV3) {
    validate_v3_dictionary(entries, what);
  } else {
    validate_v2_dictionary(entries, what);
  }
}

std::shared_ptr<const V2Dictionary> make_v2_dictionary(std::vector<uint32_t> entries,
                                                       std::string_view what) {
  validate_v2_dictionary(entries, what);
  auto d = std::make_shared<V2Dictionary>();
  d->id = v2_dictionary_id(entries);
  d->entries = std::move(entries);
  return d;
}

void validate_layout(const CompressedView& m, std::string_view what) {
  check_sizes(m, what);
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
  for (int64_t r = 0; r < m.rows; ++r) {
    const float lo = bf16_to_float(m.levels[2 * r]);
    const float hi = bf16_to_float(m.levels[2 * r + 1]);
    if (!std::isfinite(lo) || !std::isfinite(hi) || lo > 0.0f || hi < 0.0f) {
      fail(what, "row " + std::to_string(r) + " has invalid levels (lo " + std::to_string(lo) +
                     ", hi " + std::to_string(hi) + "; need finite lo <= 0 <= hi)");
    }
    if (m.codec == Codec::kV1) {
      check_row_v1(m, r, what);
    } else if (m.codec == Codec::kV2) {
      check_row_v2(m, r, what);
    } else if (m.codec == Codec::kV3) {
      if ((r & 1) == 0) check_pair_v3(m, r, what);
    } else {
      decode_row(m, r, what, [](int64_t, int) {});
    }
  }
}

void decode_symbols_ref(const CompressedView& m, uint8_t* symbols) {
  check_sizes(m, {});
  for (int64_t r = 0; r < m.rows; ++r) {
    uint8_t* out = symbols + r * m.cols;
    decode_row(m, r, {}, [&](int64_t c, int s) { out[c] = static_cast<uint8_t>(s); });
  }
}

void decode_ref(const CompressedView& m, float* out) {
  check_sizes(m, {});
  for (int64_t r = 0; r < m.rows; ++r) {
    // Value of each symbol (codec_layout.h symbol_value()), as a table to keep the loop
    // branch-free.
    const float value[3] = {0.0f, bf16_to_float(m.levels[2 * r]),
                            bf16_to_float(m.levels[2 * r + 1])};
    float* row = out + r * m.cols;
    decode_row(m, r, {}, [&](int64_t c, int s) { row[c] = value[s]; });
  }
}

void matvec_ref(const CompressedView& m, const float* x, float* y) {
  check_sizes(m, {});
  for (int64_t r = 0; r < m.rows; ++r) {
    const double lo = bf16_to_float(m.levels[2 * r]);
    const double hi = bf16_to_float(m.levels[2 * r + 1]);
    double acc = 0.0;
    decode_row(m, r, {}, [&](int64_t c, int s) {
      if (s == 1) acc += lo * x[c];
      if (s == 2) acc += hi * x[c];
    });
    y[r] = static_cast<float>(acc);
  }
}

}  // namespace qmoe
