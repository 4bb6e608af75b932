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

// The two fitted-dictionary codecs as decode_row(), the codeword checks and the dictionary checks
// see them: a stream of entries with at most kSlots used slots, in column order, each holding a
// symbol of the row being decoded (`half`: qmoe-v3's row within its pair; qmoe-v2 has one).
struct V2Layout {
  static constexpr std::string_view kName = "qmoe-v2";
  static constexpr int kSlots = v2::kSlots;
  static constexpr bool kPairs = false;
  static int width(uint32_t e) { return v2::entry_width(e); }
  static bool used(uint32_t e, int j) { return v2::slot_symbol(e, j) != 0; }
  static int col(uint32_t e, int j) { return v2::slot_col(e, j); }
  static int symbol(uint32_t e, int j, int /*half*/) { return v2::slot_symbol(e, j); }
  // The raw column field of slot j (0 when the slot is unused), a slot both low and high, and the
  // reserved bits.
  static uint32_t col_field(uint32_t e, int j) { return static_cast<uint32_t>(v2::slot_col(e, j)); }
  static bool both_kinds(uint32_t e, int j) { return v2::slot_symbol(e, j) == 3; }
  static constexpr std::string_view kBothKinds = " is both low and high";
  static bool reserved(uint32_t e) { return ((e >> 24) & 3u) != 0; }
  static constexpr std::string_view kReserved = "reserved bits 24..25 are set";
};
struct V3Layout {
  static constexpr std::string_view kName = "qmoe-v3";
  static constexpr int kSlots = v3::kSlots;
  static constexpr bool kPairs = true;
  static int width(uint32_t e) { return v3::entry_width(e); }
  // Any of slot j's four kind bits (8 + j, 11 + j, 14 + j, 17 + j).
  static bool used(uint32_t e, int j) { return ((e >> (v3::kSymShift + j)) & 0x249u) != 0; }
  static int col(uint32_t e, int j) { return v3::slot_col(e, j); }
  static int symbol(uint32_t e, int j, int half) { return v3::slot_symbol(e, j, half); }
  static uint32_t col_field(uint32_t e, int j) {
    return j == 0 ? (e >> v3::kFirstShift) & 31u : (e >> (4 * (j - 1))) & 15u;
  }
  static bool both_kinds(uint32_t e, int j) {
    const uint32_t bits = v3::slot_bits(e, j);
    return (bits & 3u) == 3u || (bits & 12u) == 12u;
  }
  static constexpr std::string_view kBothKinds = " is both low and high in one row";
  static bool reserved(uint32_t e) { return ((e >> 25) & 1u) != 0; }
  static constexpr std::string_view kReserved = "reserved bit 25 is set";
};

// The name of qmoe-g4 group g in error messages: "qmoe-g4 group 1 (rows 4..7)".
std::string g4_group_name(const CompressedView& m, int64_t g) {
  const int64_t r0 = g * g4::kRows, r1 = std::min<int64_t>(m.rows, r0 + g4::kRows) - 1;
  return "qmoe-g4 group " + std::to_string(g) + " (rows " + std::to_string(r0) + ".." +
         std::to_string(r1) + ")";
}

// Decodes group g of a qmoe-g4 matrix (SPEC 4.5.3), calling emit(j, column, symbol) for each
// non-zero symbol of row 4g + j, by increasing position (so by increasing column within a row).
// Throws FormatError, naming the group, where 16.3 requires.
template <class Emit>
void decode_group(const CompressedView& m, int64_t g, std::string_view what, Emit&& emit) {
  const int32_t* off = m.group_offsets.data();
  const int64_t t0 = off[2 * g], t1 = off[2 * g + 2], k1 = off[2 * g + 3];
  int64_t k = off[2 * g + 1];
  const int64_t positions = g4::kRows * m.cols;
  int64_t pos = 0;
  for (int64_t i = t0; i < t1; ++i) {
    const int t = g4::token(m.tokens.data(), i);
    if (t == g4::kEscape) {
      if (i + 1 == t1) fail(what, g4_group_name(m, g) + " ends with an escape token");
      pos += g4::kEscape;
      continue;
    }
    const int64_t p = pos + t;
    if (p >= positions) {
      fail(what, g4_group_name(m, g) + " has a non-zero symbol past its last column");
    }
    if (k >= k1) fail(what, g4_group_name(m, g) + " has more non-zero symbols than kind bits");
    const int j = static_cast<int>(p % g4::kRows);
    if (g * g4::kRows + j >= m.rows) {
      fail(what, g4_group_name(m, g) + " has a non-zero symbol in a padding row");
    }
    emit(j, p / g4::kRows, 1 + g4::kind_bit(m.kinds.data(), k));
    ++k;
    pos = p + 1;
  }
  if (k != k1) {
    fail(what, g4_group_name(m, g) + " has " + std::to_string(k1 - k) +
                   " kind bits more than non-zero symbols");
  }
}

[[noreturn]] void lone_row_nonzero(std::string_view what, int64_t r) {
  fail(what, "row " + std::to_string(r) +
                 " is the last of an odd height; its pair's second row must be zero");
}

// Decodes the entries of one code row (qmoe-v2: row r; qmoe-v3: the pair whose even row is r,
// emitting its row `half`). Errors name row r. `lone`: r is the last row of an odd height, whose
// pair's second row must be zero. The last codeword may run past the row's end, over zeros only.
template <class L, class Emit>
void decode_fitted(const CompressedView& m, int64_t r, int half, bool lone, std::string_view what,
                   Emit&& emit) {
  int64_t pos = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    if (pos >= m.cols) {
      row_too_long(what, r, m.cols);
    }
    const uint32_t e = m.dictionary[m.codes[i]];
    const int64_t end = std::min<int64_t>(pos + L::width(e), m.cols);
    int64_t c = pos;
    for (int j = 0; j < L::kSlots && L::used(e, j); ++j) {
      const int64_t col = pos + L::col(e, j);
      if (col >= end) {
        row_nonzero_past_end(what, r);
      }
      if (col < c) {  // only an unvalidated dictionary has such an entry
        fail(what, "row " + std::to_string(r) + ": " + std::string(L::kName) +
                       " dictionary entry " + std::to_string(m.codes[i]) +
                       " has slot columns out of order");
      }
      if (L::both_kinds(e, j)) {  // symbol 3, which no table of values has: likewise
        fail(what, "row " + std::to_string(r) + ": " + std::string(L::kName) +
                       " dictionary entry " + std::to_string(m.codes[i]) + " slot " +
                       std::to_string(j) + std::string(L::kBothKinds));
      }
      if (lone && L::symbol(e, j, 1) != 0) {
        lone_row_nonzero(what, r);
      }
      for (; c < col; ++c) emit(c, 0);
      emit(c++, L::symbol(e, j, half));
    }
    for (; c < end; ++c) emit(c, 0);
    pos = end;
  }
  if (pos != m.cols) {
    row_too_short(what, r, pos, m.cols);
  }
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
  } else if (m.codec == Codec::kG4) {
    const int64_t groups = g4::groups(m.rows);
    if (m.group_offsets.size() != static_cast<size_t>(2 * (groups + 1))) {
      fail(what, "group_offsets hold " + std::to_string(m.group_offsets.size()) +
                     " values, expected 2*(groups+1) = " + std::to_string(2 * (groups + 1)));
    }
    const int32_t* off = m.group_offsets.data();
    if (off[0] < 0 || off[1] < 0) fail(what, "group_offsets start below 0");
    for (int64_t g = 0; g < groups; ++g) {
      for (int c = 0; c < 2; ++c) {
        if (off[2 * g + 2 + c] < off[2 * g + c]) {
          fail(what, std::string(c == 0 ? "token" : "kind") + " offsets decrease at group " +
                         std::to_string(g) + " (" + std::to_string(off[2 * g + c]) + " > " +
                         std::to_string(off[2 * g + 2 + c]) + ")");
        }
      }
    }
    if (static_cast<uint64_t>(off[2 * groups]) > 2 * static_cast<uint64_t>(m.tokens.size())) {
      fail(what, "group_offsets end at token " + std::to_string(off[2 * groups]) +
                     " but the tokens hold " + std::to_string(2 * m.tokens.size()));
    }
    if (static_cast<uint64_t>(off[2 * groups + 1]) > 8 * static_cast<uint64_t>(m.kinds.size())) {
      fail(what, "group_offsets end at kind bit " + std::to_string(off[2 * groups + 1]) +
                     " but the kinds hold " + std::to_string(8 * m.kinds.size()));
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
    decode_fitted<V2Layout>(m, r, 0, false, what, emit);
  } else if (m.codec == Codec::kV3) {
    // Row r is one half of pair r / 2; the pair's stream is checked whole either way, so both of
    // its rows report the same errors.
    const int64_t pr = r - (r & 1);
    decode_fitted<V3Layout>(m, pr, static_cast<int>(r & 1), pr + 1 == m.rows, what, emit);
  } else if (m.codec == Codec::kG4) {
    // The whole group is decoded (and checked), its row r's symbols emitted.
    const int row = static_cast<int>(r % g4::kRows);
    int64_t c = 0;
    decode_group(m, r / g4::kRows, what, [&](int j, int64_t col, int sym) {
      if (j != row) return;
      for (; c < col; ++c) emit(c, 0);
      emit(c++, sym);
    });
    for (; c < m.cols; ++c) emit(c, 0);
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

// qmoe-v2 and qmoe-v3 (arguments as decode_fitted()): every codeword starts inside the row, the
// last one's non-zero symbols lie inside it, and the codewords cover the row exactly. Where two
// errors are possible in one entry (a lone row), slot by slot in the order of decode_fitted()'s
// checks, so that both report the same error.
template <class L>
void check_fitted(const CompressedView& m, int64_t r, bool lone, std::string_view what) {
  int64_t pos = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    if (pos >= m.cols) {
      row_too_long(what, r, m.cols);
    }
    const uint32_t e = m.dictionary[m.codes[i]];
    if (lone) {  // the last pair of an odd height: both checks, slot by slot
      for (int j = 0; j < L::kSlots && L::used(e, j); ++j) {
        if (pos + L::col(e, j) >= m.cols) {
          row_nonzero_past_end(what, r);
        }
        if (L::symbol(e, j, 1) != 0) {
          lone_row_nonzero(what, r);
        }
      }
    } else {
      int last = -1;  // column of the entry's last non-zero symbol (used slots come first)
      for (int j = 0; j < L::kSlots; ++j)
        if (L::used(e, j)) last = L::col(e, j);
      if (pos + last >= m.cols) {
        row_nonzero_past_end(what, r);
      }
    }
    pos = std::min<int64_t>(pos + L::width(e), m.cols);
  }
  if (pos != m.cols) {
    row_too_short(what, r, pos, m.cols);
  }
}

// Checks every entry of a fitted dictionary (codec_layout.h, SPEC 4.3.2 and 4.4.2).
template <class L>
void validate_entries(std::span<const uint32_t> entries, std::string_view what) {
  const std::string name(L::kName);
  if (entries.size() != static_cast<size_t>(v2::kEntries)) {
    fail(what,
         "a " + name + " dictionary has 65536 entries, not " + std::to_string(entries.size()));
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint32_t e = entries[i];
    auto bad = [&](const std::string& why) {
      char word[16];
      std::snprintf(word, sizeof word, "%08x", e);
      fail(what, name + " dictionary entry " + std::to_string(i) + " (0x" + word + "): " + why);
    };
    const int width = L::width(e);
    if (width < 1) bad("width 0");
    if (L::reserved(e)) bad(std::string(L::kReserved));
    int prev = -1;
    bool unused_seen = false;
    for (int j = 0; j < L::kSlots; ++j) {
      if (!L::used(e, j)) {
        if (L::col_field(e, j) != 0) bad("unused slot " + std::to_string(j) + " has a column");
        unused_seen = true;
        continue;
      }
      if (L::both_kinds(e, j)) bad("slot " + std::to_string(j) + std::string(L::kBothKinds));
      if (unused_seen) bad("slot " + std::to_string(j) + " is used after an unused one");
      const int col = L::col(e, j);
      if (col <= prev) bad("slot columns are not increasing");
      if (col >= width) bad("slot " + std::to_string(j) + " lies past the entry's width");
      prev = col;
    }
  }
}

template <class L>
std::shared_ptr<const FittedDictionary> make_fitted_dictionary(std::vector<uint32_t> entries,
                                                               std::string_view what) {
  validate_entries<L>(entries, what);
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
  validate_entries<V2Layout>(entries, what);
}

void validate_v3_dictionary(std::span<const uint32_t> entries, std::string_view what) {
  validate_entries<V3Layout>(entries, what);
}

void validate_dictionary(Codec codec, std::span<const uint32_t> entries, std::string_view what) {
  if (codec == Codec::kV3) {
    validate_v3_dictionary(entries, what);
  } else {
    validate_v2_dictionary(entries, what);
  }
}

std::shared_ptr<const FittedDictionary> make_v2_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what) {
  return make_fitted_dictionary<V2Layout>(std::move(entries), what);
}

std::shared_ptr<const FittedDictionary> make_v3_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what) {
  return make_fitted_dictionary<V3Layout>(std::move(entries), what);
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

// What a whole qmoe-g4 matrix adds to check_sizes() (SPEC 4.5.5): offsets from (0, 0) to the
// streams' exact sizes, whose unused nibble and bits are zero.
void check_g4_streams(const CompressedView& m, std::string_view what) {
  const int32_t* off = m.group_offsets.data();
  const int64_t groups = g4::groups(m.rows);
  if (off[0] != 0 || off[1] != 0) {
    fail(what, "group_offsets start at (" + std::to_string(off[0]) + ", " + std::to_string(off[1]) +
                   "), not (0, 0)");
  }
  const int64_t t = off[2 * groups], n = off[2 * groups + 1];
  if (m.tokens.size() != static_cast<size_t>((t + 1) / 2)) {
    fail(what, "the tokens hold " + std::to_string(m.tokens.size()) + " bytes, expected " +
                   std::to_string((t + 1) / 2) + " for " + std::to_string(t) + " tokens");
  }
  if (m.kinds.size() != static_cast<size_t>((n + 7) / 8)) {
    fail(what, "the kinds hold " + std::to_string(m.kinds.size()) + " bytes, expected " +
                   std::to_string((n + 7) / 8) + " for " + std::to_string(n) + " kind bits");
  }
  if ((t & 1) != 0 && (m.tokens.back() >> 4) != 0) {
    fail(what, "the unused last nibble of the tokens is not 0");
  }
  if ((n & 7) != 0 && (m.kinds.back() >> (n & 7)) != 0) {
    fail(what, "the unused last bits of the kinds are not 0");
  }
}

void validate_codes(const CompressedView& m, std::string_view what) {
  check_sizes(m, what);
  if (m.codec == Codec::kG4) check_g4_streams(m, what);
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
      check_fitted<V2Layout>(m, r, false, what);
    } else if (m.codec == Codec::kV3) {
      if ((r & 1) == 0) check_fitted<V3Layout>(m, r, r + 1 == m.rows, what);
    } else if (m.codec == Codec::kG4) {
      if (r % g4::kRows == 0) decode_group(m, r / g4::kRows, what, [](int, int64_t, int) {});
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
