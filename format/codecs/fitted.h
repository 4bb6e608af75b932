// The two fitted-dictionary codecs (qmoe-v2, qmoe-v3) as their decoder, row checks and dictionary
// checks see them: a stream of entries with at most kSlots used slots, in column order, each
// holding a symbol of the row being decoded (`half`: qmoe-v3's row within its pair; qmoe-v2 has
// one). A codec's Layout class gives the entry fields (format/codecs/v2/reference.cpp, v3/).
// Internal to qmoe_format.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>

#include "codecs/ops.h"
#include "qmoe/format/codecs/v2.h"
#include "qmoe/format/matrix.h"

namespace qmoe::internal {

// Errors of decode_fitted() and check_fitted() (fitted.cpp): the last row of an odd height has a
// non-zero symbol in its pair's second row; an entry of an unvalidated dictionary is malformed.
[[noreturn]] void lone_row_nonzero(std::string_view what, int64_t r);
[[noreturn]] void bad_entry(std::string_view what, int64_t r, std::string_view codec, uint16_t code,
                            const std::string& why);

// Calls entry(e, code, pos, end) for each codeword of code row r (e: its entry word, covering
// columns pos..end-1 of the row, cut at its end), after the checks on the stream that
// decode_fitted() and check_fitted() share: every codeword starts inside the row, and the codewords
// cover it exactly.
template <class L, class Entry>
void for_each_code(const CompressedView& m, int64_t r, std::string_view what, Entry&& entry) {
  const uint16_t* codes = m.codes.data();
  const uint32_t* dictionary = m.dictionary.data();
  int64_t pos = 0;
  for (int32_t i = m.row_offsets[r]; i < m.row_offsets[r + 1]; ++i) {
    if (pos >= m.cols) {
      row_too_long(what, r, m.cols);
    }
    const uint32_t e = dictionary[codes[i]];
    const int64_t end = std::min<int64_t>(pos + L::width(e), m.cols);
    entry(e, codes[i], pos, end);
    pos = end;
  }
  if (pos != m.cols) {
    row_too_short(what, r, pos, m.cols);
  }
}

// Decodes the entries of one code row (qmoe-v2: row r; qmoe-v3: the pair whose even row is r,
// emitting its row `half`). Errors name row r. `lone`: r is the last row of an odd height, whose
// pair's second row must be zero. The last codeword may run past the row's end, over zeros only.
template <class L, class Emit>
void decode_fitted(const CompressedView& m, int64_t r, int half, bool lone, std::string_view what,
                   Emit&& emit) {
  for_each_code<L>(m, r, what, [&](uint32_t e, uint16_t code, int64_t pos, int64_t end) {
    int64_t c = pos;
    for (int j = 0; j < L::kSlots && L::used(e, j); ++j) {
      const int64_t col = pos + L::col(e, j);
      if (col >= end) {
        row_nonzero_past_end(what, r);
      }
      if (col < c) {  // only an unvalidated dictionary has such an entry
        bad_entry(what, r, L::kName, code, " has slot columns out of order");
      }
      if (L::both_kinds(e, j)) {  // symbol 3, which no table of values has: likewise
        bad_entry(what, r, L::kName, code,
                  " slot " + std::to_string(j) + std::string(L::kBothKinds));
      }
      if (lone && L::symbol(e, j, 1) != 0) {
        lone_row_nonzero(what, r);
      }
      for (; c < col; ++c) emit(c, 0);
      emit(c++, L::symbol(e, j, half));
    }
    for (; c < end; ++c) emit(c, 0);
  });
}

// The checks decode_fitted() makes (same arguments), a codeword at a time instead of a symbol at a
// time, with the same messages: besides for_each_code()'s, the last codeword's non-zero symbols
// lie inside the row. Where two errors are possible in one entry (a lone row), slot by slot in the
// order of decode_fitted()'s checks, so that both report the same error.
template <class L>
void check_fitted(const CompressedView& m, int64_t r, bool lone, std::string_view what) {
  for_each_code<L>(m, r, what, [&](uint32_t e, uint16_t, int64_t pos, int64_t) {
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
  });
}

// Checks every entry of a fitted dictionary (format/SPEC.md 4.3.2 and 4.4.2).
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

}  // namespace qmoe::internal
