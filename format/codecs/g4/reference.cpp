// qmoe-g4's reference decoding and validation (format/SPEC.md 4.5.3, 4.5.5).
#include <algorithm>
#include <string>
#include <vector>

#include "codecs/ops.h"
#include "qmoe/format/codecs/g4.h"

namespace qmoe::internal {
namespace {

// FormatError naming qmoe-g4 group g: "qmoe-g4 group 1 (rows 4..7)<msg>".
[[noreturn]] void group_fail(const CompressedView& m, int64_t g, std::string_view what,
                             const std::string& msg) {
  const int64_t r0 = g * g4::kRows, r1 = std::min<int64_t>(m.rows, r0 + g4::kRows) - 1;
  fail(what, "qmoe-g4 group " + std::to_string(g) + " (rows " + std::to_string(r0) + ".." +
                 std::to_string(r1) + ")" + msg);
}

// Decodes group g (SPEC 4.5.3), calling emit(j, column, symbol) for each non-zero symbol of row
// 4g + j, by increasing position (so by increasing column within a row). Throws FormatError,
// naming the group, where 16.3 requires.
template <class Emit>
void decode_group(const CompressedView& m, int64_t g, std::string_view what, Emit&& emit) {
  const int32_t* off = m.group_offsets.data();
  const uint8_t *tokens = m.tokens.data(), *kinds = m.kinds.data();
  const int64_t t0 = off[2 * g], t1 = off[2 * g + 2], k1 = off[2 * g + 3];
  int64_t k = off[2 * g + 1];
  const int64_t positions = g4::kRows * m.cols;
  int64_t pos = 0;
  for (int64_t i = t0; i < t1; ++i) {
    const int t = g4::token(tokens, i);
    if (t == g4::kEscape) {
      if (i + 1 == t1) group_fail(m, g, what, " ends with an escape token");
      pos += g4::kEscape;
      continue;
    }
    const int64_t p = pos + t;
    if (p >= positions) {
      group_fail(m, g, what, " has a non-zero symbol past its last column");
    }
    if (k >= k1) group_fail(m, g, what, " has more non-zero symbols than kind bits");
    const int j = static_cast<int>(p % g4::kRows);
    if (g * g4::kRows + j >= m.rows) {
      group_fail(m, g, what, " has a non-zero symbol in a padding row");
    }
    emit(j, p / g4::kRows, 1 + g4::kind_bit(kinds, k));
    ++k;
    pos = p + 1;
  }
  if (k != k1) {
    group_fail(m, g, what,
               " has " + std::to_string(k1 - k) + " kind bits more than non-zero symbols");
  }
}

struct G4 {
  // One token per position at worst (4 bits), a kind bit per weight, the group offsets, the levels.
  static int64_t max_bytes(int64_t rows, int64_t cols) {
    return (rows * cols + 1) / 2 + (rows * cols + 7) / 8 + 8 * (g4::groups(rows) + 1) + 4 * rows;
  }
  static void check_sizes(const CompressedView& m, std::string_view what) {
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
  }

  // What a whole matrix adds to check_sizes() (SPEC 4.5.5): offsets from (0, 0) to the streams'
  // exact sizes, whose unused nibble and bits are zero.
  static void check_streams(const CompressedView& m, std::string_view what) {
    const int32_t* off = m.group_offsets.data();
    const int64_t groups = g4::groups(m.rows);
    if (off[0] != 0 || off[1] != 0) {
      fail(what, "group_offsets start at (" + std::to_string(off[0]) + ", " +
                     std::to_string(off[1]) + "), not (0, 0)");
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

  // The whole group is decoded (and checked), its row r's symbols emitted.
  template <class Emit>
  static void decode_row(const CompressedView& m, int64_t r, std::string_view what, Emit&& emit) {
    const int row = static_cast<int>(r % g4::kRows);
    int64_t c = 0;
    decode_group(m, r / g4::kRows, what, [&](int j, int64_t col, int sym) {
      if (j != row) return;
      for (; c < col; ++c) emit(c, 0);
      emit(c++, sym);
    });
    for (; c < m.cols; ++c) emit(c, 0);
  }

  static void slice(const CompressedView& m, int64_t r0, int64_t r1, std::vector<int32_t>& offsets,
                    CompressedView& v) {
    check_slice_units(m, r0, r1, "groups of 4", "group");
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
  }

  // A group is checked once, at its first row.
  static void check_row(const CompressedView& m, int64_t r, std::string_view what) {
    if (r % g4::kRows == 0) decode_group(m, r / g4::kRows, what, [](int, int64_t, int) {});
  }
};

}  // namespace

extern constinit const CodecOps kG4Ops = ops_of<G4>();

}  // namespace qmoe::internal
