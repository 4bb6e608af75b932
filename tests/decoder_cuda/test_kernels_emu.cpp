// Every decoder_cuda kernel, run on the CPU through the CUDA emulation, against the reference
// decoder: decoded weights bit-exact, products within the named normalised-error tolerances.
// Arbitrary qmoe-v2 dictionaries and code streams, grids, grouped launches, empty shapes and bad
// arguments here; every codec over ragged shapes, every activation type and batch, in the
// conformance suite (tests/codec/test_conformance.cpp, EmulatedCudaKernels).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <string>
#include <utility>

#include "emu/runtime.h"
#include "qmoe/decoder_cuda/emulated.h"
#include "qmoe/format/error.h"
#include "test_util.h"

namespace qmoe::cuda::test {
namespace {

const DType kTypes[] = {DType::kBF16, DType::kF16, DType::kF32};

std::string name(DType t) {
  return std::string(dtype_name(t));
}

// Host pointers of a qmoe-v1 or qmoe-v2 matrix, with the entry words its codes index.
MatrixDev host_view(const CompressedMatrix& m) {
  return emulated::host_matrix(m.view());
}

const Codec kCodeCodecs[] = {Codec::kV1, Codec::kV2};

// Runs the fused kernel for n tokens and checks values and sentinels.
void check_fused(const CompressedMatrix& m, DType t, int64_t n, bool accumulate, int nb,
                 emulated::Grid grid, uint64_t seed) {
  SCOPED_TRACE(std::string(codec_name(m.codec)) + " " + std::to_string(m.rows) + "x" +
               std::to_string(m.cols) + " " + name(t) + " tokens " + std::to_string(n) + " nb " +
               std::to_string(nb) + (accumulate ? " accumulate" : "") + " grid " +
               std::to_string(grid.x) + "," + std::to_string(grid.z) + " seed " +
               std::to_string(seed));
  const int64_t ldx = m.cols + 2;
  const int64_t ldy = m.rows + 3;
  Acts x = random_acts(t, static_cast<size_t>(n * ldx + 1), seed);
  Acts y(t, static_cast<size_t>(n * ldy + 5));
  fill_sentinel(y);
  Acts y0 = random_acts(t, y.size(), seed + 1);
  if (accumulate) {
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t r = 0; r < m.rows; ++r) y.set(k * ldy + r, y0.get(k * ldy + r));
    }
  }
  emulated::fused(host_view(m), t, x.data(), ldx, y.data(), ldy, n, accumulate, nb, grid);
  std::vector<double> got, want;
  for (int64_t k = 0; k < n; ++k) {
    const std::vector<float> ref = ref_matvec(m, x, static_cast<size_t>(k * ldx));
    for (int64_t r = 0; r < m.rows; ++r) {
      got.push_back(y.get(k * ldy + r));
      want.push_back(static_cast<double>(ref[r]) + (accumulate ? y0.get(k * ldy + r) : 0.0));
    }
  }
  EXPECT_LE(nerr(got, want), tolerance(t));
  for (size_t i = 0; i < y.size(); ++i) {
    const int64_t k = static_cast<int64_t>(i) / ldy, r = static_cast<int64_t>(i) % ldy;
    const bool inside = k < n && r < m.rows;
    ASSERT_EQ(is_sentinel(y, i), !inside)
        << "element " << i << (inside ? " not written" : " overwritten");
  }
}

void check_dense(const CompressedMatrix& m, DType t, int64_t r0, int64_t r1);

// A well-formed qmoe-v2 dictionary unlike the encoder's: widths 1..63 at random, 0..3 non-zero
// symbols anywhere below the width (not within v2::kSpan columns), kinds at random.
std::shared_ptr<const FittedDictionary> arbitrary_dictionary(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> words(v2::kEntries);
  std::vector<int> cols(v2::kMaxWidth);
  for (uint32_t& e : words) {
    const int width = 1 + static_cast<int>(rng() % v2::kMaxWidth);
    const int k = std::min(width, static_cast<int>(rng() % 4));
    std::iota(cols.begin(), cols.begin() + width, 0);
    std::shuffle(cols.begin(), cols.begin() + width, rng);
    std::sort(cols.begin(), cols.begin() + k);
    e = static_cast<uint32_t>(width) << v2::kWidthShift;
    for (int j = 0; j < k; ++j) {
      e |= static_cast<uint32_t>(cols[j]) << (v2::kColBits * j);
      e |= 1u << ((rng() & 1) ? v2::kHighShift + j : v2::kLowShift + j);
    }
  }
  return make_v2_dictionary(std::move(words), "arbitrary dictionary");
}

// Rows of random codes over `dict` that decode to exactly `cols` columns: codes at random until
// the row is covered, the last one drawn again until its non-zero symbols lie inside the row (it
// may reach past the row's end over zeros, as the format allows).
CompressedMatrix arbitrary_v2_matrix(int64_t rows, int64_t cols,
                                     std::shared_ptr<const FittedDictionary> dict, uint64_t seed) {
  std::mt19937_64 rng(seed);
  CompressedMatrix m;
  m.codec = Codec::kV2;
  m.rows = rows;
  m.cols = cols;
  m.row_offsets.push_back(0);
  auto inside = [](uint32_t e, int64_t room) {
    for (int j = 0; j < v2::kSlots; ++j) {
      if (v2::slot_symbol(e, j) != 0 && v2::slot_col(e, j) >= room) return false;
    }
    return true;
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t pos = 0; pos < cols;) {
      uint16_t c = static_cast<uint16_t>(rng());
      while (!inside(dict->entries[c], cols - pos)) c = static_cast<uint16_t>(rng());
      m.codes.push_back(c);
      pos += v2::entry_width(dict->entries[c]);
    }
    m.row_offsets.push_back(static_cast<int32_t>(m.codes.size()));
    const float lo = -0.01f * static_cast<float>(1 + rng() % 100);
    const float hi = 0.01f * static_cast<float>(1 + rng() % 100);
    m.levels.push_back(float_to_bf16(lo));
    m.levels.push_back(float_to_bf16(hi));
  }
  m.dictionary = std::move(dict);
  return m;
}

TEST(FusedEmu, ArbitraryQmoeV2DictionaryAndCodeStreams) {
  // Code streams the encoder never writes: entries whose non-zero symbols are far apart, rows
  // whose last entry runs past the end, 8- and 32-token windows (1024 / 256 columns) crossed.
  const auto dict = arbitrary_dictionary(5);
  const int64_t shapes[][2] = {{5, 1}, {7, 63}, {9, 1030}, {3, 300}, {4, 2100}};
  uint64_t seed = 40;
  for (const auto& s : shapes) {
    const CompressedMatrix m = arbitrary_v2_matrix(s[0], s[1], dict, ++seed);
    ASSERT_NO_THROW(validate(m.view(), "arbitrary qmoe-v2 matrix"));
    for (DType t : kTypes) {
      check_fused(m, t, 1, false, 0, {}, ++seed);
      check_fused(m, t, 5, true, 0, {}, ++seed);
      check_fused(m, t, 20, false, 0, {}, ++seed);
    }
    for (DType t : kTypes) check_dense(m, t, 0, m.rows);
  }
}

TEST(FusedEmu, BitIdenticalForAnyGrid) {
  // Each row's summation order depends only on its code stream, never on the grid: results must
  // not change when blocks walk several row groups or token passes.
  for (Codec codec : kCodeCodecs) {
    const CompressedMatrix m = random_matrix(37, 700, 0.885, 21, codec);
    for (int nb : {1, 8}) {
      const int64_t n = 19, ldx = m.cols, ldy = m.rows;
      Acts x = random_acts(DType::kF32, static_cast<size_t>(n * ldx), 22);
      std::vector<Acts> outs;
      for (emulated::Grid g : {emulated::Grid{}, emulated::Grid{1, 1}, emulated::Grid{3, 2}}) {
        outs.emplace_back(DType::kF32, static_cast<size_t>(n * ldy));
        emulated::fused(host_view(m), DType::kF32, x.data(), ldx, outs.back().data(), ldy, n, false,
                        nb, g);
      }
      EXPECT_EQ(outs[0].bytes, outs[1].bytes) << codec_name(codec) << " nb " << nb;
      EXPECT_EQ(outs[0].bytes, outs[2].bytes) << codec_name(codec) << " nb " << nb;
    }
  }
}

TEST(FusedEmu, EmptyShapesAreNoOps) {
  const CompressedMatrix m = random_matrix(0, 5, 0.5, 1);
  Acts x(DType::kF32, 8), y(DType::kF32, 8);
  fill_sentinel(y);
  emulated::fused(host_view(m), DType::kF32, x.data(), 5, y.data(), 0, 1, false);
  const CompressedMatrix m2 = random_matrix(3, 4, 0.5, 2);
  emulated::fused(host_view(m2), DType::kF32, x.data(), 4, y.data(), 3, 0, false);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_TRUE(is_sentinel(y, i));
  // Zero columns: y = 0 (or unchanged with accumulate).
  const CompressedMatrix m3 = random_matrix(3, 0, 0.5, 3);
  emulated::fused(host_view(m3), DType::kF32, x.data(), 0, y.data(), 3, 2, false);
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(y.get(i), 0.0f);
}

TEST(FusedEmu, RejectsBadArguments) {
  const CompressedMatrix m = random_matrix(4, 10, 0.5, 1);
  Acts x(DType::kF32, 40), y(DType::kF32, 40);
  EXPECT_THROW(emulated::fused(host_view(m), DType::kU8, x.data(), 10, y.data(), 4, 1, false),
               InvalidArgument);
  EXPECT_THROW(emulated::fused(host_view(m), DType::kF32, x.data(), 9, y.data(), 4, 2, false),
               InvalidArgument);
  EXPECT_THROW(emulated::fused(host_view(m), DType::kF32, x.data(), 10, y.data(), 3, 2, false),
               InvalidArgument);
  EXPECT_THROW(emulated::fused(host_view(m), DType::kF32, x.data(), 10, y.data(), 4, 2, false, 4),
               InvalidArgument);
}

// ---- grouped MoE launch ------------------------------------------------------------------------

struct Routing {
  std::vector<int32_t> offsets, token_ids, out_ids;
  std::vector<float> scales;
};

// Top-1 routing of n_tokens tokens over n_experts experts with the given expert for each token.
Routing route(const std::vector<int>& expert_of, int n_experts, uint64_t seed) {
  Routing r;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.1f, 1.0f);
  r.offsets.assign(n_experts + 1, 0);
  for (int e : expert_of) ++r.offsets[e + 1];
  std::partial_sum(r.offsets.begin(), r.offsets.end(), r.offsets.begin());
  r.token_ids.resize(expert_of.size());
  std::vector<int32_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  for (size_t tk = 0; tk < expert_of.size(); ++tk)
    r.token_ids[fill[expert_of[tk]]++] = static_cast<int32_t>(tk);
  for (size_t i = 0; i < expert_of.size(); ++i) r.scales.push_back(u(rng));
  return r;
}

void check_grouped(const std::vector<CompressedMatrix>& experts, const Routing& rt,
                   int64_t n_tokens, DType t, bool use_scales, bool use_out_ids, bool accumulate,
                   int nb, emulated::Grid grid, uint64_t seed) {
  SCOPED_TRACE(name(t) + " nb " + std::to_string(nb) + (use_scales ? " scales" : "") +
               (use_out_ids ? " out_ids" : "") + (accumulate ? " accumulate" : "") + " seed " +
               std::to_string(seed));
  const int64_t cols = experts[0].cols;
  int64_t max_rows = 0;
  for (const auto& e : experts) max_rows = std::max(max_rows, e.rows);
  const int64_t ldx = cols + 1, ldy = max_rows + 2;
  const int64_t n_slots = static_cast<int64_t>(rt.token_ids.size());
  // Outputs: by token (top-1) or, with out_ids, reversed slot order into a separate row per slot.
  std::vector<int32_t> out_ids(rt.token_ids.size());
  for (int64_t s = 0; s < n_slots; ++s) out_ids[s] = static_cast<int32_t>(n_slots - 1 - s);
  const int64_t n_out = use_out_ids ? n_slots : n_tokens;
  Acts x = random_acts(t, static_cast<size_t>(n_tokens * ldx), seed);
  Acts y(t, static_cast<size_t>(n_out * ldy + 3));
  fill_sentinel(y);
  Acts y0 = random_acts(t, y.size(), seed + 1);
  std::vector<MatrixDev> views;
  for (const auto& e : experts) views.push_back(host_view(e));
  // Rows each output row receives: the expert of the slot writing it.
  std::vector<int64_t> rows_of(static_cast<size_t>(n_out), -1);
  std::vector<int> expert_of_slot(static_cast<size_t>(n_slots));
  for (size_t e = 0; e + 1 < rt.offsets.size(); ++e) {
    for (int32_t s = rt.offsets[e]; s < rt.offsets[e + 1]; ++s)
      expert_of_slot[s] = static_cast<int>(e);
  }
  for (int64_t s = 0; s < n_slots; ++s) {
    const int64_t o = use_out_ids ? out_ids[s] : rt.token_ids[s];
    rows_of[o] = experts[expert_of_slot[s]].rows;
    if (accumulate) {
      for (int64_t r = 0; r < rows_of[o]; ++r) y.set(o * ldy + r, y0.get(o * ldy + r));
    }
  }
  GroupedArgs g;
  g.experts_dev = views.data();
  g.num_experts = static_cast<int32_t>(experts.size());
  g.max_rows = static_cast<int32_t>(max_rows);
  g.cols = static_cast<int32_t>(cols);
  g.expert_offsets_dev = rt.offsets.data();
  g.token_ids_dev = rt.token_ids.data();
  g.out_ids_dev = use_out_ids ? out_ids.data() : nullptr;
  g.scales_dev = use_scales ? rt.scales.data() : nullptr;
  g.total_slots = n_slots;
  g.x_dev = x.data();
  g.ldx = ldx;
  g.y_dev = y.data();
  g.ldy = ldy;
  g.accumulate = accumulate;
  g.tokens_per_pass = nb;
  emulated::grouped(g, t, grid);
  std::vector<double> got, want;
  for (int64_t s = 0; s < n_slots; ++s) {
    const CompressedMatrix& m = experts[expert_of_slot[s]];
    const int64_t o = use_out_ids ? out_ids[s] : rt.token_ids[s];
    const std::vector<float> ref = ref_matvec(m, x, static_cast<size_t>(rt.token_ids[s] * ldx));
    const double sc = use_scales ? rt.scales[s] : 1.0;
    for (int64_t r = 0; r < m.rows; ++r) {
      got.push_back(y.get(o * ldy + r));
      want.push_back(sc * ref[r] + (accumulate ? y0.get(o * ldy + r) : 0.0));
    }
  }
  EXPECT_LE(nerr(got, want), tolerance(t));
  for (size_t i = 0; i < y.size(); ++i) {
    const int64_t o = static_cast<int64_t>(i) / ldy, r = static_cast<int64_t>(i) % ldy;
    const bool inside = o < n_out && rows_of[o] >= 0 && r < rows_of[o];
    ASSERT_EQ(is_sentinel(y, i), !inside)
        << "element " << i << (inside ? " not written" : " overwritten");
  }
}

std::vector<CompressedMatrix> make_experts(int n, int64_t max_rows, int64_t cols, uint64_t seed) {
  std::vector<CompressedMatrix> ex;
  for (int e = 0; e < n; ++e) {
    const int64_t rows =
        e % 3 == 2 ? max_rows - 5 : max_rows;  // some experts shorter than max_rows
    // qmoe-v1 and qmoe-v2 experts mixed; the qmoe-v2 ones with dictionaries for two sparsities.
    ex.push_back(random_matrix(rows, cols, e % 4 == 3 ? 0.5 : 0.885, seed + e,
                               e % 2 == 1 ? Codec::kV2 : Codec::kV1));
  }
  return ex;
}

TEST(GroupedEmu, SkewedRoutingOneExpertTakesAlmostAll) {
  const auto experts = make_experts(10, 21, 301, 50);
  std::vector<int> expert_of(37, 4);
  expert_of[5] = 7;
  expert_of[30] = 2;  // expert 2 is short (max_rows - 5 rows); most experts get nothing
  const Routing rt = route(expert_of, 10, 3);
  uint64_t seed = 100;
  for (DType t : kTypes) {
    check_grouped(experts, rt, 37, t, true, false, false, 0, {}, ++seed);
    check_grouped(experts, rt, 37, t, false, true, true, 0, {}, ++seed);
  }
  check_grouped(experts, rt, 37, DType::kF32, true, false, false, 1, {}, ++seed);
  check_grouped(experts, rt, 37, DType::kBF16, true, true, false, 8, {1, 2}, ++seed);
  check_grouped(experts, rt, 37, DType::kF16, false, false, true, 32, {2, 1}, ++seed);
}

TEST(GroupedEmu, UniformRoutingAndEmptyExperts) {
  const auto experts = make_experts(6, 16, 1030, 70);
  std::vector<int> expert_of;
  for (int tk = 0; tk < 20; ++tk) expert_of.push_back((tk * 7) % 5);  // expert 5 gets no tokens
  const Routing rt = route(expert_of, 6, 4);
  uint64_t seed = 200;
  for (DType t : kTypes) check_grouped(experts, rt, 20, t, true, false, false, 0, {}, ++seed);
  check_grouped(experts, rt, 20, DType::kF32, true, true, true, 8, {}, ++seed);
}

TEST(GroupedEmu, TopTwoRoutingAccumulatesAtomicallyInFp32) {
  // Every token goes to two experts and both add into the token's output row.
  const auto experts = make_experts(4, 12, 130, 90);
  const int n_tokens = 9;
  std::vector<int32_t> offsets{0}, token_ids;
  std::vector<float> scales;
  for (int e = 0; e < 4; ++e) {
    for (int tk = 0; tk < n_tokens; ++tk) {
      if (tk % 4 == e || (tk + 1) % 4 == e) {
        token_ids.push_back(tk);
        scales.push_back(0.25f + 0.1f * e);
      }
    }
    offsets.push_back(static_cast<int32_t>(token_ids.size()));
  }
  // All experts here have 12 rows except expert 2 (7 rows).
  const int64_t cols = 130, ldx = cols, ldy = 12;
  Acts x = random_acts(DType::kF32, n_tokens * ldx, 5);
  Acts y(DType::kF32, n_tokens * ldy);
  for (size_t i = 0; i < y.size(); ++i) y.set(i, 0.5f);
  std::vector<MatrixDev> views;
  for (const auto& e : experts) views.push_back(host_view(e));
  GroupedArgs g;
  g.experts_dev = views.data();
  g.num_experts = 4;
  g.max_rows = 12;
  g.cols = static_cast<int32_t>(cols);
  g.expert_offsets_dev = offsets.data();
  g.token_ids_dev = token_ids.data();
  g.scales_dev = scales.data();
  g.total_slots = static_cast<int64_t>(token_ids.size());
  g.x_dev = x.data();
  g.ldx = ldx;
  g.y_dev = y.data();
  g.ldy = ldy;
  g.accumulate = true;
  emulated::grouped(g, DType::kF32);
  std::vector<double> want(y.size(), 0.5);
  for (int e = 0; e < 4; ++e) {
    for (int32_t s = offsets[e]; s < offsets[e + 1]; ++s) {
      const auto ref = ref_matvec(experts[e], x, static_cast<size_t>(token_ids[s] * ldx));
      for (int64_t r = 0; r < experts[e].rows; ++r)
        want[token_ids[s] * ldy + r] += scales[s] * ref[r];
    }
  }
  std::vector<double> got(y.size());
  for (size_t i = 0; i < y.size(); ++i) got[i] = y.get(i);
  EXPECT_LE(nerr(got, want), kTolF32);
}

// ---- decode to dense
// -----------------------------------------------------------------------------

void check_dense(const CompressedMatrix& m, DType t, int64_t r0, int64_t r1) {
  SCOPED_TRACE(std::string(codec_name(m.codec)) + " " + name(t) + " rows " + std::to_string(r0) +
               ".." + std::to_string(r1));
  const int64_t ld = m.cols + 3;
  Acts out(t, static_cast<size_t>((r1 - r0) * ld + 4));
  fill_sentinel(out);
  if (m.codec != Codec::kP5) {
    emulated::decode_dense(host_view(m), r0, r1, t, out.data(), ld);
  } else {
    emulated::p5_decode_dense(m.packed.data(), m.levels.data(), m.rows, m.cols, r0, r1, t,
                              out.data(), ld);
  }
  std::vector<float> ref(static_cast<size_t>(m.rows * m.cols));
  decode_ref(m.view(), ref.data());
  Acts want(t, 1);
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t r = r0 + static_cast<int64_t>(i) / ld, c = static_cast<int64_t>(i) % ld;
    if (r < r1 && c < m.cols) {
      want.set(0, ref[r * m.cols + c]);
      ASSERT_EQ(out.bits(i), want.bits(0)) << "row " << r << " col " << c;  // bit-exact
    } else {
      ASSERT_TRUE(is_sentinel(out, i)) << "element " << i << " overwritten";
    }
  }
}

TEST(DenseEmu, RejectsBadRowRanges) {
  const CompressedMatrix m = random_matrix(4, 10, 0.5, 1);
  Acts out(DType::kBF16, 64);
  EXPECT_THROW(emulated::decode_dense(host_view(m), 2, 5, DType::kBF16, out.data(), 10),
               InvalidArgument);
  EXPECT_THROW(emulated::decode_dense(host_view(m), 0, 4, DType::kBF16, out.data(), 9),
               InvalidArgument);
}

// ---- codecs the kernels do not read
// -------------------------------------------------------------------------

// The CPU's codecs (qmoe-v3, qmoe-g4) are not read by the kernels: the raw paths, which hand out
// pointers into the caller's matrix, refuse them with a hint (DeviceMatrix converts them on
// upload, test_gpu.cpp); the same matrix transcoded to qmoe-v2 decodes bit-exactly.
TEST(CodecSupport, RawPathsRefuseTheCpuCodecsWithAHint) {
  EXPECT_TRUE(gpu_supports(Codec::kV1));
  EXPECT_TRUE(gpu_supports(Codec::kV2));
  EXPECT_TRUE(gpu_supports(Codec::kP5));
  EXPECT_FALSE(gpu_supports(Codec::kV3));
  EXPECT_FALSE(gpu_supports(Codec::kG4));
  for (Codec codec : {Codec::kV3, Codec::kG4}) {
    const std::string name(codec_name(codec));
    SCOPED_TRACE(name);
    const CompressedMatrix cpu = random_matrix(9, 70, 0.885, 11, codec);
    ASSERT_EQ(cpu.codec, codec);
    const std::pair<std::string, std::function<void()>> entries[] = {
        {"emulated::host_matrix", [&] { (void)emulated::host_matrix(cpu.view()); }},
        {"launch", [&] { require_gpu_codec(cpu.view(), "launch"); }}};
    for (const auto& [what, call] : entries) {
      SCOPED_TRACE(what);
      try {
        call();
        ADD_FAILURE() << "a " << name << " matrix was accepted";
      } catch (const InvalidArgument& e) {
        const std::string msg = e.what();
        EXPECT_EQ(msg.rfind(what + ": ", 0), 0u) << msg;
        EXPECT_NE(msg.find(name), std::string::npos) << msg;
        EXPECT_NE(msg.find("DeviceMatrix converts it"), std::string::npos) << msg;
        EXPECT_NE(msg.find("qmoe transcode --codec qmoe-v2"), std::string::npos) << msg;
      }
    }
    const CompressedMatrix v2 = transcode(cpu.view(), {.codec = Codec::kV2});
    ASSERT_EQ(v2.codec, Codec::kV2);
    std::vector<float> want(9 * 70), got(want.size(), -1.0f);
    decode_ref(cpu.view(), want.data());
    emulated::decode_dense(host_view(v2), 0, v2.rows, DType::kF32, got.data(), v2.cols);
    EXPECT_EQ(got, want);
  }
  // Supported codecs pass; qmoe-p5 has no codes for the code-stream kernels.
  EXPECT_NO_THROW(require_gpu_codec(random_matrix(3, 10, 0.5, 1, Codec::kP5).view(), "x"));
  EXPECT_THROW((void)emulated::host_matrix(random_matrix(3, 10, 0.5, 1, Codec::kP5).view()),
               InvalidArgument);
  // A malformed layout is refused before any pointer is handed out.
  CompressedMatrix bad = random_matrix(4, 30, 0.5, 2, Codec::kV2);
  bad.row_offsets.pop_back();
  EXPECT_THROW((void)emulated::host_matrix(bad.view()), FormatError);
}

}  // namespace
}  // namespace qmoe::cuda::test
