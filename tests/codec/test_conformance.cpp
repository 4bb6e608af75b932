// The conformance suite of the codecs: every check below runs once per entry of kCodecs
// (qmoe/format/codec.h), named by the codec, so a codec added to the table is tested with no edit
// here. What differs between codecs comes from the table: the members a codec stores, its
// dictionary, the rows a row slice keeps together (row_unit) and whether the CUDA kernels read it
// as stored (gpu_native). For each codec, over shapes at the edges of every codec's units (no
// rows, one row, rows not a multiple of any row unit, odd widths, widths around the 5-symbol bytes
// of qmoe-p5, the 16-column window of qmoe-v3, the 28-symbol entries of qmoe-v1, the 32-column span
// and 63-symbol entries of qmoe-v2, the 64-row blocks of the CPU kernels, the shared-memory windows
// of the CUDA kernels, one wide matrix and the Switch shapes) and zero fractions 0.5, 0.885, 0.97,
// 1 (all zeros) and 0 (no zeros):
//   EncodeRoundTrip            encode, then the reference decoders give the matrix back; the
//                              members the table lists and only those; the same bytes for 1 and 2
//                              threads.
//   ValidatorAgreesWithDecoder corrupted copies (every member, the dictionary): whenever validate()
//                              accepts, the reference decoder, transcode() and every CPU kernel
//                              level run and agree; whenever the reference decoder throws,
//                              validate() and transcode() throw FormatError.
//   ContainerRoundTrip         a container written and read back with checksums: the same bytes,
//                              the same symbols, row slices at every legal boundary.
//   CpuKernels                 every SIMD level (and the int8 path where there is one) at 1, 3, 8
//                              and 32 tokens and across the pass sizes: exactly the reference's
//                              products on integer inputs, within the documented tolerances on
//                              float inputs.
//   EmulatedCudaKernels        the CUDA kernels under the CPU emulation, on what the device path
//                              runs: the matrix as stored, or its qmoe-v2 conversion.
//   Transcode                  to every other codec and back: the same bytes as encoding directly.
// EncodeRoundTrip and CpuKernels take every shape at every zero fraction, and the Switch shapes;
// ContainerRoundTrip and Transcode every shape once, at the zero fractions in turn;
// ValidatorAgreesWithDecoder a few matrices; EmulatedCudaKernels a ragged list of its own (the
// emulation runs a fiber per GPU thread).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <stdlib.h>

#include "decoder_cuda/test_util.h"
#include "format/format_test_util.h"
#include "qmoe/core/bf16.h"
#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/decoder_cuda/emulated.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/codec.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "random_ternary.h"

namespace qmoe {

// Test names and failure messages show the codec's name.
void PrintTo(const CodecTraits& t, std::ostream* os) {
  *os << t.name;
}

namespace {

namespace fs = std::filesystem;
using cuda::test::Acts;
using test::TempDir;

// ---- cases --------------------------------------------------------------------------------------

struct Case {
  int64_t rows, cols;
  double p0;  // zero fraction
};

std::string case_name(const Case& c) {
  return std::to_string(c.rows) + "x" + std::to_string(c.cols) + " p0=" + std::to_string(c.p0);
}

constexpr double kZeroFractions[] = {0.5, 0.885, 0.97, 1.0, 0.0};

// Every pair of these (rows x columns), at every zero fraction: heights around 2 and 4 rows,
// widths around 5 (qmoe-p5 bytes), 16 (qmoe-v3 windows), 28 (qmoe-v1 entries), 32 (qmoe-v2 spans)
// and 63/64 (qmoe-v2 entries).
constexpr int64_t kEdgeRows[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 33};
constexpr int64_t kEdgeCols[] = {0,  1,  2,  4,  5,  6,  15, 16, 17, 28,
                                 29, 31, 32, 33, 61, 63, 64, 65, 128};

// Larger shapes, at every zero fraction: one column, rows spanning several 64-row blocks of the
// CPU kernels, widths that need several shared-memory windows of the CUDA kernels (1024 and 256
// columns for 8 and 32 tokens) and the wide one (8192 columns for one token).
struct Shape {
  int64_t rows, cols;
};
constexpr Shape kLargeShapes[] = {{97, 1}, {17, 257}, {130, 700}, {5, 2999}, {3, 9001}};

// The Switch experts' shapes, at QMoE's zero fraction (the encoder and the CPU kernels).
constexpr Case kSwitchCases[] = {{768, 3072, 0.885}, {3072, 768, 0.885}};

// The edge grid and the larger shapes.
std::vector<Case> grid_cases() {
  std::vector<Case> out;
  for (int64_t r : kEdgeRows) {
    for (int64_t c : kEdgeCols) {
      for (double p0 : kZeroFractions) out.push_back({r, c, p0});
    }
  }
  for (const Shape& s : kLargeShapes) {
    for (double p0 : kZeroFractions) out.push_back({s.rows, s.cols, p0});
  }
  return out;
}

// Each shape of grid_cases() once, at the zero fractions in turn.
std::vector<Case> diagonal_cases() {
  std::vector<Case> out;
  size_t i = 0;
  for (int64_t r : kEdgeRows) {
    for (int64_t c : kEdgeCols)
      out.push_back({r, c, kZeroFractions[i++ % std::size(kZeroFractions)]});
  }
  for (const Shape& s : kLargeShapes)
    out.push_back({s.rows, s.cols, kZeroFractions[i++ % std::size(kZeroFractions)]});
  return out;
}

std::vector<Case> all_cases() {
  std::vector<Case> out = grid_cases();
  out.insert(out.end(), std::begin(kSwitchCases), std::end(kSwitchCases));
  return out;
}

// The CUDA emulation runs a fiber per GPU thread: each shape at one zero fraction. Ragged on
// purpose: 1x1, odd widths, rows not a multiple of the kernels' 8-row blocks nor of any row unit,
// several shared-memory windows for 8 and 32 tokens (7x1001 is just under one 8-token window,
// 5x2999 spans three) and for one token (3x9001), rows longer than one 128-code chunk, no rows,
// no columns, all-zero and dense rows.
constexpr Case kEmulatedCases[] = {
    {1, 1, 0.885}, {1, 2, 0.5},      {2, 3, 0.0},    {3, 5, 0.885},  {8, 64, 0.97},
    {9, 63, 0.5},  {17, 257, 0.885}, {7, 1001, 0.5}, {5, 2999, 0.0}, {3, 9001, 0.885},
    {4, 600, 1.0}, {11, 300, 0.0},   {0, 17, 0.885}, {6, 0, 0.885}};

// The same matrix for every codec: the seed follows the case.
uint64_t seed_of(const Case& c) {
  return static_cast<uint64_t>(c.rows * 1000003 + c.cols * 101 + static_cast<int64_t>(c.p0 * 1000));
}

TernaryMatrix make_ternary(const Case& c) {
  return test::random_ternary(c.rows, c.cols, c.p0, seed_of(c));
}

// How the suite encodes case c in `codec`. One thread unless asked: most matrices here are small,
// and starting OpenMP threads for each would cost more than encoding it (EncodeRoundTrip checks
// that threads change nothing). A fitted dictionary (qmoe-v2, qmoe-v3) is fitted to the case's
// zero fraction: small matrices' own fractions spread over every 1/64 step, and building a
// dictionary for each would cost more than the checks.
EncodeOptions encode_options(Codec codec, const Case& c, int threads = 1) {
  EncodeOptions o;
  o.codec = codec;
  o.threads = threads;
  o.fitted_p0 = fitted_p0_for(c.p0);
  return o;
}

CompressedMatrix encode_as(const TernaryMatrix& t, Codec codec, const Case& c, int threads = 1) {
  return encode(t, encode_options(codec, c, threads));
}

std::vector<uint8_t> decoded(const CompressedView& v) {
  std::vector<uint8_t> s(static_cast<size_t>(v.rows * v.cols), 9);
  decode_symbols_ref(v, s.data());
  return s;
}

// ---- members ------------------------------------------------------------------------------------

constexpr Member kAllMembers[] = {Member::kCodes,        Member::kRowOffsets, Member::kPacked,
                                  Member::kGroupOffsets, Member::kTokens,     Member::kKinds,
                                  Member::kLevels};

std::string_view member_suffix(Member m) {
  switch (m) {
    case Member::kCodes:
      return kCodesSuffix;
    case Member::kRowOffsets:
      return kRowOffsetsSuffix;
    case Member::kPacked:
      return kPackedSuffix;
    case Member::kGroupOffsets:
      return kGroupOffsetsSuffix;
    case Member::kTokens:
      return kTokensSuffix;
    case Member::kKinds:
      return kKindsSuffix;
    case Member::kLevels:
      return kLevelsSuffix;
  }
  return {};
}

std::span<const std::byte> member_bytes(const CompressedView& v, Member m) {
  switch (m) {
    case Member::kCodes:
      return std::as_bytes(v.codes);
    case Member::kRowOffsets:
      return std::as_bytes(v.row_offsets);
    case Member::kPacked:
      return std::as_bytes(v.packed);
    case Member::kGroupOffsets:
      return std::as_bytes(v.group_offsets);
    case Member::kTokens:
      return std::as_bytes(v.tokens);
    case Member::kKinds:
      return std::as_bytes(v.kinds);
    case Member::kLevels:
      return std::as_bytes(v.levels);
  }
  return {};
}

// Calls f(vector) with the storage of member m of `matrix`.
template <class F>
void visit_member(CompressedMatrix& matrix, Member m, F&& f) {
  switch (m) {
    case Member::kCodes:
      f(matrix.codes);
      return;
    case Member::kRowOffsets:
      f(matrix.row_offsets);
      return;
    case Member::kPacked:
      f(matrix.packed);
      return;
    case Member::kGroupOffsets:
      f(matrix.group_offsets);
      return;
    case Member::kTokens:
      f(matrix.tokens);
      return;
    case Member::kKinds:
      f(matrix.kinds);
      return;
    case Member::kLevels:
      f(matrix.levels);
      return;
  }
}

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// The same encoded matrix, byte for byte: shape, every member of the codec, its dictionary.
::testing::AssertionResult same_encoding(const CompressedView& a, const CompressedView& b) {
  if (a.codec != b.codec || a.rows != b.rows || a.cols != b.cols) {
    return ::testing::AssertionFailure()
           << codec_name(a.codec) << " " << a.rows << "x" << a.cols << " vs " << codec_name(b.codec)
           << " " << b.rows << "x" << b.cols;
  }
  for (Member m : codec_traits(a.codec).members()) {
    if (!same_bytes(member_bytes(a, m), member_bytes(b, m)))
      return ::testing::AssertionFailure() << "member " << member_suffix(m) << " differs";
  }
  if (a.dictionary_id != b.dictionary_id ||
      !same_bytes(std::as_bytes(a.dictionary), std::as_bytes(b.dictionary)))
    return ::testing::AssertionFailure() << "the dictionary differs";
  return ::testing::AssertionSuccess();
}

// ---- products -----------------------------------------------------------------------------------

// Levels -2^a and 2^b (a, b in -1..1, varying by row): with integer inputs every kernel's sums are
// exact, so every product must equal the exact one.
std::vector<uint16_t> power_of_two_levels(int64_t rows) {
  std::vector<uint16_t> l(static_cast<size_t>(2 * rows));
  for (int64_t r = 0; r < rows; ++r) {
    l[static_cast<size_t>(2 * r)] = float_to_bf16(-std::ldexp(1.0f, static_cast<int>(r % 3) - 1));
    l[static_cast<size_t>(2 * r + 1)] =
        float_to_bf16(std::ldexp(1.0f, static_cast<int>((r / 3) % 3) - 1));
  }
  return l;
}

// out[k * rows + r] = sum over c of W[r][c] * x[k * ldx + c], in double, for n tokens.
std::vector<double> dense_products(const std::vector<uint8_t>& symbols,
                                   const std::vector<uint16_t>& levels, int64_t rows, int64_t cols,
                                   const float* x, int64_t ldx, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n * rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const double value[3] = {0.0, bf16_to_float(levels[static_cast<size_t>(2 * r)]),
                             bf16_to_float(levels[static_cast<size_t>(2 * r + 1)])};
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t s = symbols[static_cast<size_t>(r * cols + c)];
      if (s == 0) continue;
      for (int64_t k = 0; k < n; ++k)
        out[static_cast<size_t>(k * rows + r)] += value[s] * x[k * ldx + c];
    }
  }
  return out;
}

// n tokens of integers in [-bound, bound] with row stride ldx (the stride gap filled too); each
// token holds +bound once, so that the int8 path's scale is 1 and leaves the inputs as they are.
std::vector<float> integer_inputs(int64_t n, int64_t cols, int64_t ldx, int bound, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> x(static_cast<size_t>(std::max<int64_t>(n * ldx, 1)));
  for (float& v : x) v = static_cast<float>(static_cast<int>(rng() % (2 * bound + 1)) - bound);
  if (cols > 0) {
    for (int64_t k = 0; k < n; ++k)
      x[static_cast<size_t>(k * ldx + k % cols)] = static_cast<float>(bound);
  }
  return x;
}

std::vector<float> normal_inputs(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(std::max<int64_t>(n, 1)));
  for (float& v : x) v = d(rng);
  return x;
}

// ---- the suite ----------------------------------------------------------------------------------

class Conformance : public ::testing::TestWithParam<CodecTraits> {};

// ---- 1. encode round trip -----------------------------------------------------------------------

// validate(v), checking a fitted dictionary's entries only the first time they are met (as the
// container reader does: validate_codes() for the matrices of a dictionary already checked).
void validate_sharing(const CompressedView& v, std::set<const uint32_t*>& checked) {
  if (v.has_dictionary() && !checked.insert(v.dictionary.data()).second) {
    ASSERT_EQ(v.dictionary_id, v2_dictionary_id(v.dictionary));
    ASSERT_NO_THROW(validate_codes(v, "encoded"));
  } else {
    ASSERT_NO_THROW(validate(v, "encoded"));
  }
}

TEST_P(Conformance, EncodeRoundTrip) {
  const CodecTraits& traits = GetParam();
  std::set<const uint32_t*> checked;
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(case_name(c));
    const TernaryMatrix t = make_ternary(c);
    const CompressedMatrix m = encode_as(t, traits.codec, c);
    const CompressedView v = m.view();
    ASSERT_EQ(m.codec, traits.codec);
    ASSERT_EQ(m.rows, c.rows);
    ASSERT_EQ(m.cols, c.cols);
    // The members the table lists, and only those; a dictionary where the table has one.
    for (Member mem : kAllMembers) {
      if (!traits.stores(mem)) {
        ASSERT_TRUE(member_bytes(v, mem).empty()) << member_suffix(mem) << " is not stored";
      }
    }
    if (traits.has_fitted_dictionary()) {
      ASSERT_TRUE(m.dictionary);
      ASSERT_EQ(v.dictionary.size(), static_cast<size_t>(v2::kEntries));
      ASSERT_EQ(v.dictionary_id, v2_dictionary_id(v.dictionary));
    } else {
      ASSERT_FALSE(m.dictionary);
    }
    ASSERT_NO_FATAL_FAILURE(validate_sharing(v, checked));
    ASSERT_EQ(decoded(v), t.symbols);
    ASSERT_EQ(m.levels, t.levels);
    // The codec's size bound holds for every matrix it encodes.
    ASSERT_LE(v.compressed_bytes(), max_compressed_bytes(traits.codec, c.rows, c.cols));
    std::vector<float> dense(t.symbols.size(), -1.0f);
    decode_ref(v, dense.data());
    ASSERT_EQ(dense, t.to_dense());
    // matvec_ref: the dense product summed in double, rounded once.
    std::vector<float> x(static_cast<size_t>(c.cols)), y(static_cast<size_t>(c.rows));
    for (int64_t k = 0; k < c.cols; ++k)
      x[static_cast<size_t>(k)] = 0.25f * static_cast<float>(k % 7) - 0.5f;
    matvec_ref(v, x.data(), y.data());
    for (int64_t r = 0; r < c.rows; ++r) {
      double want = 0;
      for (int64_t k = 0; k < c.cols; ++k)
        want += static_cast<double>(dense[static_cast<size_t>(r * c.cols + k)]) *
                x[static_cast<size_t>(k)];
      ASSERT_EQ(y[static_cast<size_t>(r)], static_cast<float>(want)) << "matvec_ref row " << r;
    }
    // The larger matrices: the same bytes for 2 threads as for 1 where the encoder splits the rows
    // between threads (blocks of 32 rows), and the encoder's own dictionary choice (fitted to the
    // matrix's own zero fraction).
    if (c.rows * c.cols >= 4096) {
      if (c.rows > 32) {
        ASSERT_TRUE(same_encoding(encode_as(t, traits.codec, c, 2).view(), v)) << "2 threads";
      }
      const CompressedMatrix d = encode(t, {.codec = traits.codec, .threads = 1});
      ASSERT_NO_FATAL_FAILURE(validate_sharing(d.view(), checked));
      ASSERT_EQ(decoded(d.view()), t.symbols);
    }
  }
}

// ---- 2. validator and decoder agree on corrupted copies -----------------------------------------

struct Outcomes {
  int accepted = 0, rejected = 0;
};

// One corrupted copy: validate() accepting means every decoder runs it and agrees; the reference
// decoder throwing means validate() and transcode() throw FormatError.
void check_corrupted(const CompressedView& v, Outcomes& out) {
  bool valid = true;
  try {
    validate(v, "corrupted");
  } catch (const FormatError&) {
    valid = false;
  }
  std::vector<uint8_t> symbols(static_cast<size_t>(v.rows * v.cols), 9);
  bool decodes = true;
  try {
    decode_symbols_ref(v, symbols.data());
  } catch (const FormatError&) {
    decodes = false;
  }
  ++(valid ? out.accepted : out.rejected);
  if (!decodes) {
    EXPECT_FALSE(valid) << "decode_symbols_ref threw on a matrix validate() accepted";
    EXPECT_THROW(transcode(v, {.codec = v.codec, .threads = 1}), FormatError);
    return;
  }
  if (!valid) return;
  for (uint8_t s : symbols) ASSERT_LE(s, 2) << "a symbol left unwritten";
  CompressedMatrix again;
  ASSERT_NO_THROW(again = transcode(v, {.codec = v.codec, .threads = 1}));
  EXPECT_EQ(decoded(again.view()), symbols);
  // The kernels read a validated matrix without checking it again: they must agree with the
  // reference on every one, whatever its levels, within fp32 summation. A row's n non-zero terms
  // summed in any order are within (n - 1) * 2^-24 * sum |terms| of the exact sum (matmul.h: the
  // low and high sums are fp32), and the reference and the kernel round the result once each.
  const std::vector<float> x = normal_inputs(v.cols, 17);
  std::vector<float> ref(static_cast<size_t>(v.rows)), y(ref.size());
  matvec_ref(v, x.data(), ref.data());
  std::vector<double> bound(ref.size());
  for (int64_t r = 0; r < v.rows; ++r) {
    double sum_abs = 0.0;
    int64_t n = 0;
    for (int64_t c = 0; c < v.cols; ++c) {
      const uint8_t s = symbols[static_cast<size_t>(r * v.cols + c)];
      if (s == 0) continue;
      const double w = bf16_to_float(v.levels[static_cast<size_t>(2 * r + s - 1)]);
      sum_abs += std::fabs(w * x[static_cast<size_t>(c)]);
      ++n;
    }
    bound[static_cast<size_t>(r)] =
        static_cast<double>(n + 2) * 0x1p-24 * sum_abs + std::numeric_limits<float>::denorm_min();
  }
  for (cpu::SimdLevel level : cpu::supported_simd_levels()) {
    cpu::MatmulOptions o;
    o.simd = level;
    o.threads = 1;
    o.int8_activations = false;
    cpu::matvec(v, x.data(), y.data(), o);
    for (size_t r = 0; r < ref.size(); ++r) {
      if (std::isfinite(ref[r])) {
        ASSERT_LE(std::fabs(static_cast<double>(y[r]) - ref[r]), bound[r])
            << cpu::simd_level_name(level) << " row " << r << ": " << y[r] << ", reference "
            << ref[r];
      } else {
        ASSERT_EQ(y[r], ref[r]) << cpu::simd_level_name(level) << " row " << r;
      }
    }
  }
}

// Corruptions of one member: a bit flipped, a byte replaced, the last element dropped.
void corrupt(CompressedMatrix& m, Member mem, std::mt19937_64& rng) {
  visit_member(m, mem, [&](auto& vec) {
    const size_t bytes = vec.size() * sizeof(vec[0]);
    const int kind = static_cast<int>(rng() % 8);
    if (bytes == 0 || kind == 0) {
      if (!vec.empty()) {
        vec.pop_back();
      } else {
        vec.emplace_back();
      }
      return;
    }
    auto* p = reinterpret_cast<uint8_t*>(vec.data()) + rng() % bytes;
    if (kind < 5) {
      *p ^= static_cast<uint8_t>(1u << (rng() % 8));
    } else {
      *p = static_cast<uint8_t>(rng());
    }
  });
}

// A few matrices (rows not a multiple of any row unit, odd and even widths) and a bounded number
// of corruptions each, from a fixed seed.
constexpr Case kCorruptionCases[] = {{9, 65, 0.885}, {33, 128, 0.5}, {7, 63, 0.0}, {5, 17, 0.97}};
constexpr int kCorruptionsPerMember = 32;

TEST_P(Conformance, ValidatorAgreesWithDecoder) {
  const CodecTraits& traits = GetParam();
  std::mt19937_64 rng(2024);
  Outcomes all;
  for (const Case& c : kCorruptionCases) {
    const CompressedMatrix base = encode_as(make_ternary(c), traits.codec, c);
    for (Member mem : traits.members()) {
      SCOPED_TRACE(case_name(c) + ", member " + std::string(member_suffix(mem)));
      Outcomes o;
      for (int i = 0; i < kCorruptionsPerMember; ++i) {
        CompressedMatrix m = base;
        corrupt(m, mem, rng);
        check_corrupted(m.view(), o);
        if (HasFailure()) return;  // the first corruption that fails is enough
      }
      EXPECT_GT(o.rejected, 0) << "no corruption of the member was noticed";
      all.accepted += o.accepted;
      all.rejected += o.rejected;
    }
    if (traits.dictionary != DictionaryKind::kFitted) continue;
    // The matrix's own dictionary, corrupted: a bit of an entry its codes use, or of any entry,
    // under the id of the new bytes (so that validate() checks the entries) or the old one.
    SCOPED_TRACE(case_name(c) + ", dictionary");
    Outcomes o;
    for (int i = 0; i < kCorruptionsPerMember; ++i) {
      auto d = std::make_shared<FittedDictionary>(*base.dictionary);
      const size_t e = !base.codes.empty() && rng() % 2 ? base.codes[rng() % base.codes.size()]
                                                        : rng() % d->entries.size();
      d->entries[e] ^= 1u << (rng() % 32);
      const bool new_id = rng() % 4 != 0;
      if (new_id) d->id = v2_dictionary_id(d->entries);
      CompressedMatrix m = base;
      m.dictionary = d;
      const int rejected_before = o.rejected;
      check_corrupted(m.view(), o);
      if (!new_id) {
        EXPECT_EQ(o.rejected, rejected_before + 1) << "a dictionary under another's id passed";
      }
      if (HasFailure()) return;
    }
    EXPECT_GT(o.rejected, 0);
    all.accepted += o.accepted;
    all.rejected += o.rejected;
  }
  // Both outcomes were exercised.
  EXPECT_GT(all.accepted, 0);
  EXPECT_GT(all.rejected, 0);
}

// ---- 3. container round trip --------------------------------------------------------------------

// Row slices of `v` (whose rows decode to `symbols`): at every legal boundary (a slice starts at a
// multiple of the row unit and ends at one or at the last row), every pair of them on small
// matrices; the other boundaries are refused.
void check_row_slices(const CompressedView& v, const std::vector<uint8_t>& symbols) {
  const CodecTraits& traits = codec_traits(v.codec);
  const int64_t unit = traits.row_unit;
  // Legal starts: multiples of the unit; legal ends: those and the last row.
  std::vector<int64_t> starts, ends;
  for (int64_t r = 0; r <= v.rows; r += unit) starts.push_back(r);
  ends = starts;
  if (ends.back() != v.rows) ends.push_back(v.rows);
  auto check = [&](int64_t r0, int64_t r1) {
    SCOPED_TRACE("rows " + std::to_string(r0) + ".." + std::to_string(r1));
    std::vector<int32_t> offsets;
    const CompressedView s = row_slice(v, r0, r1, offsets);
    ASSERT_EQ(s.rows, r1 - r0);
    ASSERT_NO_THROW(validate_layout(s, "slice"));
    // A slice of a matrix without group offsets is a whole matrix (its dictionary was checked
    // with the container); one of a matrix with them keeps the bytes its first and last groups
    // share with their neighbours (layout-valid only).
    if (!traits.stores(Member::kGroupOffsets)) {
      ASSERT_NO_THROW(validate_codes(s, "slice"));
    }
    const std::vector<uint8_t> got = decoded(s);
    ASSERT_TRUE(std::equal(got.begin(), got.end(), symbols.begin() + r0 * v.cols));
  };
  if (v.rows <= 40) {
    for (int64_t r0 : starts) {
      for (int64_t r1 : ends) {
        if (r1 >= r0) check(r0, r1);
      }
    }
  } else {
    // Each unit of rows alone: every boundary as a start and as an end.
    for (size_t i = 0; i + 1 < ends.size(); ++i) check(ends[i], ends[i + 1]);
    check(0, v.rows);
  }
  for (int64_t r = 0; r <= v.rows; ++r) {
    if (r % unit == 0) continue;
    std::vector<int32_t> offsets;
    EXPECT_THROW(row_slice(v, r, v.rows, offsets), InvalidArgument) << "start " << r;
    if (r != v.rows) {
      EXPECT_THROW(row_slice(v, 0, r, offsets), InvalidArgument) << "end " << r;
    }
  }
}

// Every shape once (the writer validates each matrix completely, its dictionary included: the zero
// fractions are crossed with the shapes by EncodeRoundTrip).
TEST_P(Conformance, ContainerRoundTrip) {
  const CodecTraits& traits = GetParam();
  const std::vector<Case> cases = diagonal_cases();
  std::vector<TernaryMatrix> ts;
  std::vector<CompressedMatrix> ms;
  for (const Case& c : cases) {
    ts.push_back(make_ternary(c));
    ms.push_back(encode_as(ts.back(), traits.codec, c));
  }
  TempDir dir;
  const fs::path p = dir.path() / "model.safetensors";
  {
    ContainerWriter w(p);
    for (size_t i = 0; i < ms.size(); ++i)
      w.add_compressed("m" + std::to_string(i), ms[i].view(), DType::kBF16);
    w.finish();
  }
  const Container cont = Container::open(p, {.verify_checksums = true});
  EXPECT_TRUE(cont.mismatched_checksums().empty());
  ASSERT_EQ(cont.compressed().size(), ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    SCOPED_TRACE(case_name(cases[i]));
    const CompressedEntry* e = cont.find_compressed("m" + std::to_string(i));
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->original_shape, (std::vector<int64_t>{cases[i].rows, cases[i].cols}));
    EXPECT_EQ(e->original_dtype, DType::kBF16);
    ASSERT_TRUE(same_encoding(e->view, ms[i].view()));
    ASSERT_EQ(decoded(e->view), ts[i].symbols);
    check_row_slices(e->view, ts[i].symbols);
    if (HasFatalFailure()) return;
  }
}

// ---- 4. CPU kernels -----------------------------------------------------------------------------

// Normalised error sum((y - ref)^2) / sum(ref^2) allowed for an fp32 kernel against the double
// reference (tests/decoder_cpu/test_matmul.cpp: fp32 sums of k terms carry ~sqrt(k) * 2^-24
// relative error; 1e-9 leaves a wide margin while catching any misplaced or dropped symbol).
constexpr double kMaxNmse = 1e-9;

double nmse(const float* y, const float* ref, int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(y[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den == 0.0 ? num : num / den;  // an all-zero reference asks for (near) exact zeros
}

constexpr float kSentinel = -12345.678f;  // around and between outputs; must survive every call

// Every output of a y buffer (n tokens of `rows`, row stride ldy, 16 sentinels on both sides)
// equals want exactly (accumulated on y0 when given); everything else is still a sentinel.
::testing::AssertionResult exact_outputs(const std::vector<float>& buf, int64_t n, int64_t rows,
                                         int64_t ldy, const std::vector<double>& want,
                                         double scale = 1.0, const float* y0 = nullptr) {
  ldy = std::max<int64_t>(ldy, 1);  // matvec of no rows
  for (size_t i = 0; i < buf.size(); ++i) {
    const int64_t j = static_cast<int64_t>(i) - 16;
    const int64_t k = j >= 0 ? j / ldy : -1, r = j >= 0 ? j % ldy : -1;
    if (j >= 0 && k < n && r < rows) {
      const double w =
          scale * want[static_cast<size_t>(k * rows + r)] + (y0 ? y0[k * ldy + r] : 0.0f);
      if (buf[i] != static_cast<float>(w))
        return ::testing::AssertionFailure()
               << "token " << k << " row " << r << ": " << buf[i] << ", exactly " << w;
    } else if (buf[i] != kSentinel) {
      return ::testing::AssertionFailure() << "element " << j << " (outside y) overwritten";
    }
  }
  return ::testing::AssertionSuccess();
}

// The pass sizes and their neighbours (MatmulOptions, kMaxPassTokens = 32; 8 passes per decode).
constexpr int64_t kBatchSweep[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 64, 70};

// One case at every level: exact products on integer inputs with power-of-two levels (matvec, and
// matmul at 1, 3, 8 and 32 tokens, y = W x and y += W x), and float inputs with the matrix's own
// levels within the documented tolerances: kMaxNmse for the float paths; for the int8 path
// (matmul.h, MatmulOptions::int8_activations) half a quantization step per weight,
// sum_c |W[r][c]| * max|x| / 254, plus float rounding.
void check_cpu_case(const Case& c, const TernaryMatrix& t, const CompressedMatrix& m) {
  const int64_t rows = c.rows, cols = c.cols;
  CompressedMatrix exact = m;
  exact.levels = power_of_two_levels(rows);
  const int64_t n_max = 32, ldx = cols + 3, ldy = rows + 2;
  const std::vector<float> x = integer_inputs(n_max, cols, ldx, 127, seed_of(c) + 1);
  const std::vector<double> want =
      dense_products(t.symbols, exact.levels, rows, cols, x.data(), ldx, n_max);
  // matvec_ref gives the same exact products.
  std::vector<float> ref1(static_cast<size_t>(rows));
  matvec_ref(exact.view(), x.data(), ref1.data());
  for (int64_t r = 0; r < rows; ++r)
    ASSERT_EQ(ref1[static_cast<size_t>(r)], want[static_cast<size_t>(r)]) << "matvec_ref row " << r;
  std::vector<float> y0(static_cast<size_t>(n_max * ldy));
  for (size_t i = 0; i < y0.size(); ++i) y0[i] = static_cast<float>(static_cast<int>(i % 61) - 30);

  // Float inputs, the matrix's own levels: 4 tokens, against matvec_ref.
  const int64_t nf = 4;
  const std::vector<float> xf = normal_inputs(nf * cols, seed_of(c) + 2);
  std::vector<float> reff(static_cast<size_t>(nf * rows));
  for (int64_t k = 0; k < nf; ++k)
    matvec_ref(m.view(), xf.data() + k * cols, reff.data() + k * rows);
  std::vector<float> dense;  // for the int8 path's bound
  if (cpu::g4_int8_supported(cpu::SimdLevel::kAvx2)) {
    dense.resize(t.symbols.size());
    decode_ref(m.view(), dense.data());
  }

  for (cpu::SimdLevel level : cpu::supported_simd_levels()) {
    for (bool int8 : {false, true}) {
      if (int8 && !cpu::g4_int8_supported(level)) continue;
      SCOPED_TRACE(std::string(cpu::simd_level_name(level)) + (int8 ? " int8" : ""));
      cpu::MatmulOptions o;
      o.simd = level;
      o.int8_activations = int8;
      // One thread (starting OpenMP threads would cost more than most of these products), every
      // thread on the Switch shapes. Results do not depend on it (matmul.h).
      o.threads = rows * cols < (int64_t{1} << 20) ? 1 : 0;
      cpu::MatmulOptions acc = o;
      acc.accumulate = true;
      // matvec: y = W x, then y += W x on y0.
      std::vector<float> buf(static_cast<size_t>(rows + 32), kSentinel);
      cpu::matvec(exact.view(), x.data(), buf.data() + 16, o);
      ASSERT_TRUE(exact_outputs(buf, 1, rows, rows, want)) << "matvec";
      std::copy(y0.begin(), y0.begin() + rows, buf.begin() + 16);
      cpu::matvec(exact.view(), x.data(), buf.data() + 16, acc);
      ASSERT_TRUE(exact_outputs(buf, 1, rows, rows, want, 1.0, y0.data())) << "matvec accumulate";
      // matmul at 1, 3, 8 and 32 tokens, strided; 8 tokens accumulated on y0 too.
      for (int64_t n : {1, 3, 8, 32}) {
        std::vector<float> yb(static_cast<size_t>(n * ldy + 32), kSentinel);
        cpu::matmul(exact.view(), n, x.data(), ldx, yb.data() + 16, ldy, o);
        ASSERT_TRUE(exact_outputs(yb, n, rows, ldy, want)) << "matmul, " << n << " tokens";
        if (n == 8) {
          for (int64_t k = 0; k < n; ++k)
            std::copy(y0.begin() + k * ldy, y0.begin() + k * ldy + rows, yb.begin() + 16 + k * ldy);
          cpu::matmul(exact.view(), n, x.data(), ldx, yb.data() + 16, ldy, acc);
          ASSERT_TRUE(exact_outputs(yb, n, rows, ldy, want, 1.0, y0.data()))
              << "matmul accumulate, " << n << " tokens";
        }
      }
      // Float inputs: one token (the int8 path where there is one) and a batch (float).
      std::vector<float> yv(static_cast<size_t>(rows)), yb(static_cast<size_t>(nf * rows));
      cpu::matvec(m.view(), xf.data(), yv.data(), o);
      cpu::matmul(m.view(), nf, xf.data(), cols, yb.data(), rows, o);
      EXPECT_LE(nmse(yb.data(), reff.data(), nf * rows), kMaxNmse) << "float inputs, batch";
      if (!int8) {
        EXPECT_LE(nmse(yv.data(), reff.data(), rows), kMaxNmse) << "float inputs, one token";
      } else {
        float amax = 0.0f;
        for (int64_t k = 0; k < cols; ++k)
          amax = std::max(amax, std::fabs(xf[static_cast<size_t>(k)]));
        for (int64_t r = 0; r < rows; ++r) {
          double w_abs = 0.0, wx_abs = 0.0;
          for (int64_t k = 0; k < cols; ++k) {
            const double w = dense[static_cast<size_t>(r * cols + k)];
            w_abs += std::fabs(w);
            wx_abs += std::fabs(w * xf[static_cast<size_t>(k)]);
          }
          const double bound = w_abs * amax / 254.0 * (1.0 + 1e-6) + 1e-6 * wx_abs + 1e-30;
          ASSERT_LE(std::fabs(static_cast<double>(yv[static_cast<size_t>(r)]) -
                              reff[static_cast<size_t>(r)]),
                    bound)
              << "int8 matvec row " << r;
        }
      }
    }
  }
}

TEST_P(Conformance, CpuKernels) {
  const CodecTraits& traits = GetParam();
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(case_name(c));
    const TernaryMatrix t = make_ternary(c);
    check_cpu_case(c, t, encode_as(t, traits.codec, c));
    if (HasFatalFailure()) return;
  }
  // Every batch size around the passes, strided, y = W x then y += W x (twice the products).
  const Case c{45, 301, 0.885};
  SCOPED_TRACE(case_name(c));
  const TernaryMatrix t = make_ternary(c);
  CompressedMatrix m = encode_as(t, traits.codec, c);
  m.levels = power_of_two_levels(c.rows);
  const int64_t ldx = c.cols + 3, ldy = c.rows + 5, n_max = 70;
  const std::vector<float> x = integer_inputs(n_max, c.cols, ldx, 127, 45);
  const std::vector<double> want =
      dense_products(t.symbols, m.levels, c.rows, c.cols, x.data(), ldx, n_max);
  for (cpu::SimdLevel level : cpu::supported_simd_levels()) {
    for (int64_t n : kBatchSweep) {
      SCOPED_TRACE(std::string(cpu::simd_level_name(level)) + ", " + std::to_string(n) + " tokens");
      cpu::MatmulOptions o;
      o.simd = level;
      o.threads = 1;
      std::vector<float> buf(static_cast<size_t>(n * ldy + 32), kSentinel);
      cpu::matmul(m.view(), n, x.data(), ldx, buf.data() + 16, ldy, o);
      ASSERT_TRUE(exact_outputs(buf, n, c.rows, ldy, want));
      o.accumulate = true;
      cpu::matmul(m.view(), n, x.data(), ldx, buf.data() + 16, ldy, o);
      ASSERT_TRUE(exact_outputs(buf, n, c.rows, ldy, want, 2.0)) << "accumulate";
    }
  }
}

// ---- 5. the CUDA kernels, emulated --------------------------------------------------------------

constexpr DType kActTypes[] = {DType::kBF16, DType::kF16, DType::kF32};

// The fused kernel for n tokens of integer inputs in [-3, 3] (exact in every activation type) on a
// matrix with power-of-two levels: every output is the exact product rounded once to the output
// type (y += W x on integers with accumulate), and nothing outside y is written.
void check_fused_exact(const CompressedMatrix& exact, const std::vector<uint8_t>& symbols, DType t,
                       int64_t n, bool accumulate, int tokens_per_pass = 0,
                       cuda::emulated::Grid grid = {}) {
  SCOPED_TRACE(std::string(dtype_name(t)) + ", " + std::to_string(n) + " tokens" +
               (accumulate ? ", accumulate" : "") + ", per pass " +
               std::to_string(tokens_per_pass) + ", grid " + std::to_string(grid.x) + "," +
               std::to_string(grid.z));
  const int64_t rows = exact.rows, cols = exact.cols, ldx = cols + 2, ldy = rows + 3;
  const std::vector<float> xi =
      integer_inputs(n, cols, ldx, 3, static_cast<uint64_t>(n * 7 + cols));
  Acts x(t, xi.size());
  for (size_t i = 0; i < xi.size(); ++i) x.set(i, xi[i]);
  const std::vector<double> want =
      dense_products(symbols, exact.levels, rows, cols, xi.data(), ldx, n);
  // y0 of y += W x: small integers.
  auto y0 = [](int64_t k, int64_t r) { return static_cast<float>((k + r) % 9 - 4); };
  Acts y(t, static_cast<size_t>(n * ldy + 5));
  cuda::test::fill_sentinel(y);
  if (accumulate) {
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t r = 0; r < rows; ++r) y.set(static_cast<size_t>(k * ldy + r), y0(k, r));
    }
  }
  cuda::emulated::fused(cuda::emulated::host_matrix(exact.view()), t, x.data(), ldx, y.data(), ldy,
                        n, accumulate, tokens_per_pass, grid);
  Acts w(t, 1);
  for (size_t i = 0; i < y.size(); ++i) {
    const int64_t k = static_cast<int64_t>(i) / ldy, r = static_cast<int64_t>(i) % ldy;
    if (k < n && r < rows) {
      w.set(0, static_cast<float>(want[static_cast<size_t>(k * rows + r)] +
                                  (accumulate ? y0(k, r) : 0.0f)));
      ASSERT_EQ(y.bits(i), w.bits(0))
          << "token " << k << " row " << r << ": " << y.get(i) << ", exactly " << w.get(0);
    } else {
      ASSERT_TRUE(cuda::test::is_sentinel(y, i)) << "element " << i << " (outside y) overwritten";
    }
  }
}

// The fused kernel on float inputs with the matrix's own levels, within the emulated kernels'
// tolerance per output type (tests/decoder_cuda/test_util.h) of matvec_ref on `original`.
void check_fused_float(const CompressedMatrix& dev, const CompressedMatrix& original, DType t,
                       int64_t n) {
  SCOPED_TRACE(std::string(dtype_name(t)) + ", " + std::to_string(n) + " float tokens");
  const int64_t ldx = dev.cols, ldy = dev.rows;
  const Acts x = cuda::test::random_acts(t, static_cast<size_t>(std::max<int64_t>(n * ldx, 1)), 5);
  Acts y(t, static_cast<size_t>(std::max<int64_t>(n * ldy, 1)));
  cuda::emulated::fused(cuda::emulated::host_matrix(dev.view()), t, x.data(), ldx, y.data(), ldy, n,
                        false);
  std::vector<double> got, want;
  for (int64_t k = 0; k < n; ++k) {
    const std::vector<float> ref =
        cuda::test::ref_matvec(original, x, static_cast<size_t>(k * ldx));
    for (int64_t r = 0; r < dev.rows; ++r) {
      got.push_back(y.get(static_cast<size_t>(k * ldy + r)));
      want.push_back(ref[static_cast<size_t>(r)]);
    }
  }
  EXPECT_LE(cuda::test::nerr(got, want), cuda::test::tolerance(t));
}

// Decode to dense, rows [r0, r1): bit-exact with decode_ref of `original`, nothing else written.
void check_dense(const CompressedMatrix& dev, const CompressedMatrix& original, DType t, int64_t r0,
                 int64_t r1) {
  SCOPED_TRACE(std::string(dtype_name(t)) + " dense rows " + std::to_string(r0) + ".." +
               std::to_string(r1));
  const int64_t ld = dev.cols + 3;
  Acts out(t, static_cast<size_t>((r1 - r0) * ld + 4));
  cuda::test::fill_sentinel(out);
  if (dev.has_codes()) {
    cuda::emulated::decode_dense(cuda::emulated::host_matrix(dev.view()), r0, r1, t, out.data(),
                                 ld);
  } else {
    cuda::emulated::p5_decode_dense(dev.packed.data(), dev.levels.data(), dev.rows, dev.cols, r0,
                                    r1, t, out.data(), ld);
  }
  std::vector<float> ref(static_cast<size_t>(original.rows * original.cols));
  decode_ref(original.view(), ref.data());
  Acts w(t, 1);
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t r = r0 + static_cast<int64_t>(i) / ld, c = static_cast<int64_t>(i) % ld;
    if (r < r1 && c < dev.cols) {
      w.set(0, ref[static_cast<size_t>(r * dev.cols + c)]);
      ASSERT_EQ(out.bits(i), w.bits(0)) << "row " << r << " col " << c;
    } else {
      ASSERT_TRUE(cuda::test::is_sentinel(out, i)) << "element " << i << " overwritten";
    }
  }
}

TEST_P(Conformance, EmulatedCudaKernels) {
  const CodecTraits& traits = GetParam();
  for (const Case& c : kEmulatedCases) {
    SCOPED_TRACE(case_name(c));
    const TernaryMatrix t = make_ternary(c);
    const CompressedMatrix m = encode_as(t, traits.codec, c);
    // What the device runs: the matrix as stored, or its qmoe-v2 conversion (DeviceMatrix's).
    const CompressedMatrix dev =
        traits.gpu_native ? m : transcode(m.view(), {.codec = Codec::kV2, .threads = 1});
    ASSERT_TRUE(codec_traits(dev.codec).gpu_native);
    ASSERT_EQ(decoded(dev.view()), t.symbols);
    ASSERT_EQ(dev.levels, m.levels);
    if (dev.has_codes()) {
      CompressedMatrix exact = dev;
      exact.levels = power_of_two_levels(c.rows);
      if (traits.gpu_native) {
        for (DType a : kActTypes) {
          check_fused_exact(exact, t.symbols, a, 1, false);
          check_fused_exact(exact, t.symbols, a, 3, true);    // the 8-token kernel, 3 live
          check_fused_exact(exact, t.symbols, a, 13, false);  // the 32-token kernel
        }
        // More tokens than one pass, forced kernels, forced small grids (grid-stride loops).
        check_fused_exact(exact, t.symbols, DType::kF32, 40, false);
        check_fused_exact(exact, t.symbols, DType::kBF16, 5, false, 1, {1, 2});
        check_fused_exact(exact, t.symbols, DType::kF32, 17, true, 8, {1, 1});
        check_fused_float(dev, m, DType::kF32, 8);
        check_fused_float(dev, m, DType::kF16, 3);
        check_fused_float(dev, m, DType::kBF16, 1);
      } else {
        // The conversion feeds the same kernels as a stored qmoe-v2 matrix.
        check_fused_exact(exact, t.symbols, DType::kF32, 1, false);
        check_fused_exact(exact, t.symbols, DType::kBF16, 8, true);
        check_fused_float(dev, m, DType::kF32, 3);
      }
    }
    if (traits.gpu_native) {
      for (DType a : kActTypes) check_dense(dev, m, a, 0, c.rows);
    } else {
      check_dense(dev, m, DType::kF32, 0, c.rows);
    }
    check_dense(dev, m, DType::kBF16, c.rows / 3, c.rows - c.rows / 4);  // a tile of rows
    if (HasFatalFailure()) return;
  }
}

// ---- 6. transcode -------------------------------------------------------------------------------

// Every shape once (transcode() checks its input's dictionary each time: the zero fractions are
// crossed with the shapes by EncodeRoundTrip).
TEST_P(Conformance, Transcode) {
  const CodecTraits& traits = GetParam();
  for (const Case& c : diagonal_cases()) {
    SCOPED_TRACE(case_name(c));
    const TernaryMatrix t = make_ternary(c);
    const CompressedMatrix m = encode_as(t, traits.codec, c);
    for (const CodecTraits& other : kCodecs) {
      if (other.codec == traits.codec) continue;
      SCOPED_TRACE("to " + std::string(other.name) + " and back");
      const CompressedMatrix there = transcode(m.view(), encode_options(other.codec, c));
      // The same bytes as encoding the symbols in the other codec: the same symbols and levels.
      ASSERT_TRUE(same_encoding(there.view(), encode_as(t, other.codec, c).view()));
      ASSERT_EQ(there.levels, t.levels);
      const CompressedMatrix back = transcode(there.view(), encode_options(traits.codec, c));
      ASSERT_TRUE(same_encoding(back.view(), m.view()));
      // With the encoder's own choices too, on the larger matrices.
      if (c.rows * c.cols >= 4096) {
        ASSERT_TRUE(same_encoding(transcode(m.view(), {.codec = other.codec, .threads = 1}).view(),
                                  encode(t, {.codec = other.codec, .threads = 1}).view()));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, Conformance, ::testing::ValuesIn(kCodecs),
                         [](const ::testing::TestParamInfo<CodecTraits>& p) {
                           std::string name(p.param.name);
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace qmoe
