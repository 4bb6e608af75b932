// libFuzzer target: arbitrary bytes as an encoded matrix (CompressedView). validate() must accept
// or throw FormatError; decoding a view that validate() accepted must succeed, and the three
// reference entry points (symbols, dense, matvec) must agree. The CPU kernels (decoder_cpu, every
// SIMD level this machine runs; one token and the batch paths) and the CUDA kernels' source under
// the CPU emulation (fused products for 1 and 3 tokens, decode-to-dense bit-exact; qmoe-v1 and
// qmoe-v2) must then agree with the reference within fp32 summation error: valid code streams need
// not be the encoder's greedy parse.
//
// Input layout: byte 0 bit 0 = codec (0 v1, 1 p5), bit 2 = qmoe-v2 instead of v1, bit 4 = qmoe-v3
// instead of v1 / v2, bit 1 = row offsets raw (1) or built from per-row code counts (0, mostly
// monotone, reaches deeper; for qmoe-v3 the counts of odd rows are taken as 0); byte 1 =
// rows (0..15); bytes 2-3 = cols (0..1023); then 2*rows bf16 levels; then for v1 and v2 the row
// offsets (rows+1 int32 raw, or rows count bytes) and the codes (uint16) from the rest; for p5 the
// packed bytes from the rest. A v2 matrix uses a fixed dictionary of pseudo-random well-formed
// entries (every width 1..63, 0..3 slots below the width), not the encoder's: with byte 0 bit 3
// set, one whose slots lie within 32 columns like the encoder's (the AVX-512 permute kernel),
// else one with slots anywhere (the broadcast kernels). A v3 matrix likewise uses pseudo-random
// well-formed v3 entries (widths 1..63, 0..3 slots, any symbol bits a slot may hold). With byte 0
// bit 7 set (and bit 0 clear) the matrix is qmoe-g4: after the levels, the group offsets (bit 1:
// 2*(G+1) int32 raw; else G token-count bytes, the kind offsets then counted from the tokens,
// which reaches deeper), the tokens (ceil(T/2) bytes, T the last token offset) and the kind bits
// from the rest. The qmoe-g4 int8 single-token kernel is checked against its own bound (a rounding
// of x to 127 steps of max |x| per weight) besides the float paths. The CUDA kernels
// do not take qmoe-v3 or qmoe-g4.
//
// Malformed dictionaries: with byte 0 bit 5 set (v2 and v3), byte 4 is a count k and the next
// 6 k bytes patch k dictionary entries (u16 entry index, u32 word, little endian) before the
// levels; with bit 6 also set the matrix keeps the id of the unpatched dictionary. validate()
// must refuse malformed entries and a stale id; decode_ref() without validation must not crash;
// a patched dictionary that validate() accepts goes through every kernel like any other.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <utility>
#include <vector>

#include "qmoe/decoder_cpu/matmul.h"
#include "qmoe/decoder_cuda/emulated.h"
#include "qmoe/format/error.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/reference.h"

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::vector<uint32_t> make_v2_dictionary(bool windowed) {
  std::vector<uint32_t> out(qmoe::v2::kEntries);
  for (uint32_t i = 0; i < out.size(); ++i) {
    const uint64_t h = splitmix64(i);
    const int width = 1 + static_cast<int>(h % qmoe::v2::kMaxWidth);
    // Slots go in a stretch of `span` columns starting at `start` (the whole entry, or at most
    // v2::kSpan columns of it).
    const int span = windowed ? std::min(width, qmoe::v2::kSpan) : width;
    const int start = static_cast<int>((h >> 56) % static_cast<uint64_t>(width - span + 1));
    const int slots = std::min(span, static_cast<int>((h >> 8) % 4));
    uint32_t e = static_cast<uint32_t>(width) << qmoe::v2::kWidthShift;
    int col = -1;
    for (int j = 0; j < slots; ++j) {
      // Increasing columns, leaving room for the remaining slots.
      const int room = span - (slots - j) - col;
      col += 1 + static_cast<int>((h >> (16 + 8 * j)) % static_cast<uint64_t>(room));
      e |= static_cast<uint32_t>(start + col) << (qmoe::v2::kColBits * j);
      e |= 1u << (((h >> (48 + j)) & 1) ? qmoe::v2::kHighShift + j : qmoe::v2::kLowShift + j);
    }
    out[i] = e;
  }
  return out;
}

std::vector<uint32_t> make_v3_dictionary() {
  std::vector<uint32_t> out(qmoe::v3::kEntries);
  // The 8 non-zero symbol pairs a slot may hold, as kind bits relative to slot j's row-0 low bit
  // (row 0 low 0, high 3; row 1 low 6, high 9), at most one per row.
  constexpr uint32_t kPairs[8] = {1u,           1u << 3,      1u << 6,           1u << 9,
                                  1u | 1u << 6, 1u | 1u << 9, 1u << 3 | 1u << 6, 1u << 3 | 1u << 9};
  for (uint32_t i = 0; i < out.size(); ++i) {
    const uint64_t h = splitmix64(i ^ 0x5a5a5a5aull);
    const int width = 1 + static_cast<int>(h % qmoe::v3::kMaxWidth);
    uint32_t e = static_cast<uint32_t>(width) << qmoe::v3::kWidthShift;
    const int first = static_cast<int>((h >> 8) % static_cast<uint64_t>(std::min(width, 32)));
    // Slot columns first + d, 0 = d_0 < d_1 < d_2 <= 15, all below the width.
    const int room = std::min(width - first, qmoe::v3::kSpan);
    const int slots = std::min(room, static_cast<int>((h >> 16) % 4));
    int d = 0;
    for (int j = 0; j < slots; ++j) {
      if (j > 0) {
        d += 1 +
             static_cast<int>((h >> (20 + 6 * j)) % static_cast<uint64_t>(room - d - (slots - j)));
        e |= static_cast<uint32_t>(d) << (4 * (j - 1));
      }
      e |= kPairs[(h >> (40 + 3 * j)) & 7] << (qmoe::v3::kSymShift + j);
    }
    if (slots > 0) e |= static_cast<uint32_t>(first) << qmoe::v3::kFirstShift;
    out[i] = e;
  }
  return out;
}

struct Reader {
  const uint8_t* p;
  size_t n;
  template <class T>
  std::vector<T> take(size_t count) {
    const size_t bytes = std::min(n, count * sizeof(T)) / sizeof(T) * sizeof(T);
    std::vector<T> v(bytes / sizeof(T));
    if (bytes > 0) std::memcpy(v.data(), p, bytes);
    p += bytes;
    n -= bytes;
    return v;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  Reader in{data + 4, size - 4};
  // Dictionary patches (v2, v3), taken before the matrix.
  std::vector<std::pair<uint16_t, uint32_t>> patches;
  if ((data[0] & 32) != 0 && in.n > 0) {
    const auto count = in.take<uint8_t>(1);
    for (size_t k = 0; k < count[0] && in.n >= 6; ++k) {
      const auto idx = in.take<uint16_t>(1);
      const auto word = in.take<uint32_t>(1);
      patches.emplace_back(idx[0], word[0]);
    }
  }
  qmoe::CompressedView v;
  v.codec = (data[0] & 1)     ? qmoe::Codec::kP5
            : (data[0] & 128) ? qmoe::Codec::kG4
            : (data[0] & 16)  ? qmoe::Codec::kV3
            : (data[0] & 4)   ? qmoe::Codec::kV2
                              : qmoe::Codec::kV1;
  v.rows = data[1] & 15;
  v.cols = (data[2] | (data[3] << 8)) & 1023;
  const auto levels = in.take<uint16_t>(static_cast<size_t>(2 * v.rows));
  std::vector<int32_t> offsets;
  std::vector<uint16_t> codes;
  std::vector<uint8_t> packed, toks, kind_bits;
  std::vector<int32_t> group_offsets;
  if (v.codec == qmoe::Codec::kG4) {
    const int64_t groups = qmoe::g4::groups(v.rows);
    if (data[0] & 2) {
      group_offsets = in.take<int32_t>(static_cast<size_t>(2 * (groups + 1)));
      // The token bytes the last offset asks for, as far as the input goes.
      const int64_t t_total = group_offsets.size() == static_cast<size_t>(2 * (groups + 1))
                                  ? std::max<int64_t>(group_offsets[2 * groups], 0)
                                  : 0;
      toks = in.take<uint8_t>(static_cast<size_t>((t_total + 1) / 2));
    } else {
      const auto counts = in.take<uint8_t>(static_cast<size_t>(groups));
      int64_t t_total = 0;
      for (uint8_t c : counts) t_total += c;
      toks = in.take<uint8_t>(static_cast<size_t>((t_total + 1) / 2));
      // Kind offsets: the real (non-escape) tokens of each group, as far as the tokens go.
      int64_t t = 0, k = 0;
      group_offsets = {0, 0};
      for (uint8_t c : counts) {
        for (int i = 0; i < c; ++i, ++t) {
          const size_t b = static_cast<size_t>(t / 2);
          if (b < toks.size()) k += ((toks[b] >> (4 * (t & 1))) & 15) != 15;
        }
        group_offsets.push_back(static_cast<int32_t>(t));
        group_offsets.push_back(static_cast<int32_t>(k));
      }
    }
    kind_bits = in.take<uint8_t>(in.n);
  } else if (v.has_codes()) {
    if (data[0] & 2) {
      offsets = in.take<int32_t>(static_cast<size_t>(v.rows + 1));
    } else {
      const auto counts = in.take<uint8_t>(static_cast<size_t>(v.rows));
      offsets.push_back(0);
      for (size_t r = 0; r < counts.size(); ++r) {
        const bool empty = v.codec == qmoe::Codec::kV3 && r % 2 == 1;
        offsets.push_back(offsets.back() + (empty ? 0 : counts[r]));
      }
    }
    codes = in.take<uint16_t>(in.n / 2);
  } else {
    packed = in.take<uint8_t>(in.n);
  }
  v.levels = levels;
  v.row_offsets = offsets;
  v.codes = codes;
  v.packed = packed;
  v.tokens = toks;
  v.kinds = kind_bits;
  v.group_offsets = group_offsets;
  std::vector<uint32_t> patched;  // a patched copy of the dictionary, when there are patches
  auto use_dictionary = [&](const std::vector<uint32_t>& dict, uint64_t id) {
    if (patches.empty()) {
      v.dictionary = dict;
      v.dictionary_id = id;
      return;
    }
    patched = dict;
    for (const auto& [i, word] : patches) patched[i] = word;
    v.dictionary = patched;
    v.dictionary_id = (data[0] & 64) != 0 ? id : qmoe::v2_dictionary_id(patched);
  };
  if (v.codec == qmoe::Codec::kV2) {
    static const std::vector<uint32_t> dict[2] = {make_v2_dictionary(false),
                                                  make_v2_dictionary(true)};
    static const uint64_t id[2] = {qmoe::v2_dictionary_id(dict[0]),
                                   qmoe::v2_dictionary_id(dict[1])};
    const int which = (data[0] >> 3) & 1;
    use_dictionary(dict[which], id[which]);
  }
  if (v.codec == qmoe::Codec::kV3) {
    static const std::vector<uint32_t> dict = make_v3_dictionary();
    static const uint64_t id = qmoe::v2_dictionary_id(dict);
    use_dictionary(dict, id);
  }

  const size_t n = static_cast<size_t>(v.rows * v.cols);
  std::vector<float> dense(n);
  // Decoding without validation must be safe too: it throws on malformed streams.
  try {
    qmoe::decode_ref(v, dense.data());
  } catch (const qmoe::FormatError&) {
  }
  try {
    qmoe::validate(v, "fuzz");
  } catch (const qmoe::FormatError&) {
    return 0;
  }
  std::vector<uint8_t> symbols(n);
  qmoe::decode_symbols_ref(v, symbols.data());
  qmoe::decode_ref(v, dense.data());
  std::vector<float> x(static_cast<size_t>(v.cols), 1.0f), y(static_cast<size_t>(v.rows));
  qmoe::matvec_ref(v, x.data(), y.data());
  for (int64_t r = 0; r < v.rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < v.cols; ++c) {
      const size_t i = static_cast<size_t>(r * v.cols + c);
      if (symbols[i] > 2) __builtin_trap();
      const float want = qmoe::symbol_value(symbols[i], qmoe::bf16_to_float(v.levels[2 * r]),
                                            qmoe::bf16_to_float(v.levels[2 * r + 1]));
      if (dense[i] != want) __builtin_trap();
      sum += want;
    }
    if (static_cast<float>(sum) != y[r]) __builtin_trap();
  }

  // The kernels cache tables derived from each dictionary they see (per id, for the life of the
  // process): distinct patched dictionaries beyond the first kMaxPatched of a run only go through
  // the reference checks above, so that the cache stays within the fuzzer's memory limit.
  if (!patches.empty()) {
    constexpr size_t kMaxPatched = 64;
    static std::set<uint64_t> seen;
    if (seen.count(v.dictionary_id) == 0) {
      if (seen.size() >= kMaxPatched) return 0;
      seen.insert(v.dictionary_id);
    }
  }

  // The CPU kernels against the reference, for 1, 3 and 9 tokens (one-token kernels, then the
  // list path with one and with two 8-token vectors). Per output, the allowed error is fp32
  // summation error over the row's terms: 2^-12 * (|lo| + |hi|) * sum |x| (cols < 1024).
  const int64_t max_n = 9;
  std::vector<float> xs(static_cast<size_t>(max_n * v.cols));
  for (size_t i = 0; i < xs.size(); ++i)
    xs[i] = static_cast<float>(static_cast<int>((i * 2654435761u) % 17) - 8) / 8.0f;
  std::vector<float> ref(static_cast<size_t>(max_n * v.rows)), got(ref.size());
  for (int64_t t = 0; t < max_n; ++t)
    qmoe::matvec_ref(v, xs.data() + t * v.cols, ref.data() + t * v.rows);
  auto check = [&](int64_t tokens) {
    for (int64_t t = 0; t < tokens; ++t) {
      double xabs = 0;
      for (int64_t c = 0; c < v.cols; ++c)
        xabs += std::fabs(xs[static_cast<size_t>(t * v.cols + c)]);
      for (int64_t r = 0; r < v.rows; ++r) {
        const double lo = qmoe::bf16_to_float(v.levels[2 * r]);
        const double hi = qmoe::bf16_to_float(v.levels[2 * r + 1]);
        const double bound = std::ldexp((std::fabs(lo) + std::fabs(hi)) * xabs, -12);
        const size_t i = static_cast<size_t>(t * v.rows + r);
        if (!std::isfinite(bound) || !std::isfinite(ref[i])) continue;  // huge levels
        // Levels near the float maximum: a float partial sum may overflow where the reference's
        // double sum does not (its terms cancel later). Partial sums stay below
        // (|lo| + |hi|) * sum |x|, so below half the float maximum none can.
        if ((std::fabs(lo) + std::fabs(hi)) * xabs > 0.5 * FLT_MAX) continue;
        if (!(std::fabs(static_cast<double>(got[i]) - ref[i]) <= bound)) __builtin_trap();
      }
    }
  };
  // qmoe-g4's int8 single-token kernel: x rounded to 127 steps of max |x| (error at most half a
  // step per weight, sum_c |w_rc| * max|x| / 254), plus fp32 summation error.
  auto check_int8 = [&] {
    double amax = 0;
    for (int64_t c = 0; c < v.cols; ++c)
      amax = std::max(amax, std::fabs(double{xs[static_cast<size_t>(c)]}));
    for (int64_t r = 0; r < v.rows; ++r) {
      double w_abs = 0, wx_abs = 0;
      for (int64_t c = 0; c < v.cols; ++c) {
        const double w = dense[static_cast<size_t>(r * v.cols + c)];
        w_abs += std::fabs(w);
        wx_abs += std::fabs(w * xs[static_cast<size_t>(c)]);
      }
      const double bound = w_abs * amax / 254.0 * (1.0 + 1e-6) + std::ldexp(wx_abs, -12);
      const size_t i = static_cast<size_t>(r);
      if (!std::isfinite(bound) || !std::isfinite(ref[i])) continue;  // huge levels
      if (!(std::fabs(static_cast<double>(got[i]) - ref[i]) <= bound)) __builtin_trap();
    }
  };
  for (qmoe::cpu::SimdLevel level : qmoe::cpu::supported_simd_levels()) {
    for (bool int8 : {false, true}) {
      if (int8 && v.codec != qmoe::Codec::kG4) continue;
      qmoe::cpu::MatmulOptions opt;
      opt.threads = 1;
      opt.simd = level;
      opt.int8_activations = int8;
      for (int64_t tokens : {1, 3, 9}) {
        std::fill(got.begin(), got.end(), 0.0f);
        qmoe::cpu::matmul(v, tokens, xs.data(), v.cols, got.data(), v.rows, opt);
        if (int8 && tokens == 1)
          check_int8();
        else
          check(tokens);
      }
    }
  }

  if (!v.has_codes() || v.codec == qmoe::Codec::kV3 || v.rows == 0) return 0;  // (and qmoe-g4)
  const qmoe::cuda::MatrixDev md{
      v.codes.data(),
      v.row_offsets.data(),
      v.levels.data(),
      v.codec == qmoe::Codec::kV1 ? qmoe::v1_entry_words() : v.dictionary.data(),
      static_cast<int32_t>(v.rows),
      static_cast<int32_t>(v.cols)};
  std::vector<float> gpu_dense(n, -1.0f);
  qmoe::cuda::emulated::decode_dense(md, 0, v.rows, qmoe::DType::kF32, gpu_dense.data(), v.cols);
  if (n > 0 && std::memcmp(gpu_dense.data(), dense.data(), n * sizeof(float)) != 0)
    __builtin_trap();
  for (int64_t tokens : {1, 3}) {
    std::fill(got.begin(), got.end(), 0.0f);
    qmoe::cuda::emulated::fused(md, qmoe::DType::kF32, xs.data(), v.cols, got.data(), v.rows,
                                tokens, false);
    check(tokens);
  }
  return 0;
}
