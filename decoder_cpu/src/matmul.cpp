// Dispatcher of the CPU kernels: argument checks, SIMD level selection, input transposition into
// passes of up to 32 tokens, and the OpenMP split over rows. Built for the baseline ISA; the
// kernels themselves live in kernels_<level>.cpp.
#include "qmoe/decoder_cpu/matmul.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "qmoe/format/cpu_env.h"
#include "qmoe/format/error.h"

namespace qmoe::cpu {
namespace {

using detail::kColPad;

// ---- levels -------------------------------------------------------------------------------------
bool cpu_runs(SimdLevel l) {
  switch (l) {
    case SimdLevel::kScalar:
      return true;
#if defined(QMOE_CPU_X86_KERNELS)
    case SimdLevel::kAvx2:
      return cpu_features().avx2;
    case SimdLevel::kAvx512:
      return cpu_features().avx512;
#else
    default:
      return false;
#endif
  }
  return false;
}

detail::RowsFn rows_fn(SimdLevel l) {
  switch (l) {
    case SimdLevel::kScalar:
      return detail::rows_fn_scalar();
#if defined(QMOE_CPU_X86_KERNELS)
    case SimdLevel::kAvx2:
      return detail::rows_fn_avx2();
    case SimdLevel::kAvx512:
      return detail::rows_fn_avx512();
#else
    default:
      return nullptr;
#endif
  }
  return nullptr;
}

// Whether the CPU runs the qmoe-g4 kernels of kernels_g4_vnni.cpp (the avx512 level's, plus
// VBMI, VBMI2, VNNI and GFNI).
bool cpu_runs_g4_vnni() {
#if defined(QMOE_CPU_X86_KERNELS)
  return cpu_features().g4_int8;
#else
  return false;
#endif
}

// -1 = not decided yet.
std::atomic<int> g_level{-1};
std::mutex g_level_mutex;

SimdLevel checked(SimdLevel l) {
  if (!simd_level_supported(l)) {
    throw InvalidArgument("SIMD level '" + std::string(simd_level_name(l)) +
                          "' is not supported by this CPU or build (best: " +
                          std::string(simd_level_name(best_simd_level())) + ")");
  }
  return l;
}

// ---- scratch ------------------------------------------------------------------------------------
// A growable 64-byte aligned buffer; one per thread for the lists, one per call for the inputs.
template <class T>
class Aligned {
 public:
  T* get(size_t n) {
    if (n > cap_) {
      const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
      mem_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!mem_) throw std::bad_alloc();
      cap_ = bytes / sizeof(T);
    }
    return mem_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> mem_;
  size_t cap_ = 0;
};

// ---- argument checks ----------------------------------------------------------------------------
// The codecs these kernels run. A switch over every enumerator, no default: a codec added to
// Codec (qmoe/format/codec.h) without kernels here is a compiler warning (-Wswitch), and a matrix
// of it is refused below rather than reaching another codec's kernels.
constexpr bool has_kernels(Codec c) {
  switch (c) {
    case Codec::kV1:
    case Codec::kV2:
    case Codec::kV3:
    case Codec::kG4:
    case Codec::kP5:
      return true;
  }
  return false;
}

void check_matrix(const CompressedView& w) {
  if (!has_kernels(w.codec)) {
    throw InvalidArgument(std::string(codec_name(w.codec)) +
                          " matrix: no CPU kernels for this codec; transcode it (qmoe transcode "
                          "--target cpu, or qmoe.transcode(m, target=\"cpu\"))");
  }
  if (w.rows < 0 || w.cols < 0) throw InvalidArgument("matrix has a negative shape");
  if (w.cols > (int64_t{1} << 30)) throw InvalidArgument("matrix has more than 2^30 columns");
  if (w.levels.size() != static_cast<size_t>(2 * w.rows)) {
    throw InvalidArgument("matrix levels hold " + std::to_string(w.levels.size()) +
                          " values, expected " + std::to_string(2 * w.rows));
  }
  if (w.has_codes()) {
    if (w.row_offsets.size() != static_cast<size_t>(w.rows + 1) || w.row_offsets[0] != 0 ||
        static_cast<size_t>(w.row_offsets[static_cast<size_t>(w.rows)]) != w.codes.size()) {
      throw InvalidArgument(std::string(codec_name(w.codec)) +
                            " matrix: row_offsets do not match rows and codes");
    }
    if (w.has_dictionary() && w.dictionary.size() != static_cast<size_t>(v2::kEntries)) {
      throw InvalidArgument(std::string(codec_name(w.codec)) +
                            " matrix: the dictionary does not hold 65536 entries");
    }
  } else if (w.codec == Codec::kP5) {
    if (w.packed.size() != static_cast<size_t>(w.rows * p5::row_bytes(w.cols))) {
      throw InvalidArgument("qmoe-p5 matrix: packed size does not match its shape");
    }
  } else if (w.codec == Codec::kG4) {
    const int64_t groups = g4::groups(w.rows);
    if (w.group_offsets.size() != static_cast<size_t>(2 * (groups + 1)) ||
        static_cast<uint64_t>(w.group_offsets[static_cast<size_t>(2 * groups)]) >
            2 * static_cast<uint64_t>(w.tokens.size()) ||
        static_cast<uint64_t>(w.group_offsets[static_cast<size_t>(2 * groups + 1)]) >
            8 * static_cast<uint64_t>(w.kinds.size())) {
      throw InvalidArgument("qmoe-g4 matrix: group_offsets do not match rows, tokens and kinds");
    }
  } else {
    throw InvalidArgument("unknown codec");
  }
}

// ---- the engine ---------------------------------------------------------------------------------
using detail::kMaxPasses;
using detail::kRowBlock;
static_assert(detail::kPassTokens == kMaxPassTokens);
constexpr int64_t kColBlock = 256;       // columns per transposition work item
constexpr double kSerialWork = 1 << 17;  // below this many weight x token products: one thread
constexpr int64_t kSerialPrepareFloats = 1 << 18;  // inputs up to 1 MiB are copied by one thread

thread_local Aligned<int32_t> t_lists;
thread_local Aligned<float> t_inputs;
thread_local Aligned<int8_t> t_xq;

// Pass::xq for a single-token pass: x rounded (half away from zero) to int8 at the scale
// 127 / max|x|, zero past `cols` (kG4XqPad bytes). False (nothing written) if x holds a NaN or an
// infinity, which only the float path carries through as the reference decoder does.
// Compiled for AVX2 where the x86 kernels are (it runs only at the avx2 and avx512 levels): 8
// lanes and vpmaxud, where the baseline ISA has 4 lanes and no unsigned max (a wo call with an
// empty kernel, timing only: 3.1 us before, 1.2 us after, on a Zen 5). Exact integer and IEEE
// operations (no contraction into FMA in ISO C++ mode), so any ISA gives the same bytes.
#if defined(QMOE_CPU_X86_KERNELS)
__attribute__((target("avx2")))
#endif
bool quantize_int8(const float* x, int64_t cols, int8_t* xq, float* inv) {
  // max |x| as the largest bit pattern without its sign: for finite values the patterns are ordered
  // as the values are, and infinities and NaNs lie above every finite one. One pass with no early
  // exit and integers only, so that the compiler vectorizes it.
  uint32_t top = 0;
  for (int64_t c = 0; c < cols; ++c) {
    top = std::max(top, std::bit_cast<uint32_t>(x[c]) & 0x7fffffffu);
  }
  if (top >= 0x7f800000u) return false;  // an infinity or a NaN
  const float amax = std::bit_cast<float>(top);
  const float s = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    // Round half away from zero; |x * s| <= 127 up to rounding, hence the clamp. The sign is put
    // back as (q ^ m) - m with m all ones for a negative x (-0 gives 0 either way).
    const float v = std::min(std::fabs(x[c]) * s + 0.5f, 127.0f);
    const int32_t q = static_cast<int32_t>(v);
    const int32_t m = std::bit_cast<int32_t>(x[c]) >> 31;
    xq[c] = static_cast<int8_t>((q ^ m) - m);
  }
  std::memset(xq + cols, 0, static_cast<size_t>(detail::kG4XqPad));
  *inv = amax / 127.0f;
  return true;
}

// One matrix and its tokens: for t < n, yout[t][r] (+)= scale[t] * (W xin[t])[r].
struct Item {
  const CompressedView* w;
  int64_t n;
  const float* const* xin;
  float* const* yout;
  const float* scale;
};

// A sweep over one matrix's codes for up to kMaxPasses passes of tokens.
struct Job {
  detail::RowsFn fn = nullptr;  // the level's kernels (qmoe-g4 at avx512: the VNNI copy)
  detail::Work work;
  detail::Pass passes[kMaxPasses];
  int64_t offsets[kMaxPasses];  // of each pass's inputs in the shared input buffer
  const float* const* src;      // the job's first token
  int64_t col_blocks = 0;
};

// Runs the items in one OpenMP region: first every job's inputs are transposed into passes, then
// the threads split the row blocks (kRowBlock rows; block b of every matrix goes to the same
// thread) and each runs the jobs in item order on its blocks. A given output element is therefore
// written by one thread, in item order, whatever the thread count: accumulation over items is
// race-free and bit-identical for any number of threads.
void run(std::span<const Item> items, bool accumulate, const MatmulOptions& opt) {
  const SimdLevel level = opt.simd ? checked(*opt.simd) : simd_level();
  const detail::RowsFn fn = rows_fn(level);
#if defined(QMOE_CPU_X86_KERNELS)
  const detail::RowsFn g4_fn =
      level == SimdLevel::kAvx512 && cpu_runs_g4_vnni() ? detail::rows_fn_g4_vnni() : fn;
#else
  const detail::RowsFn g4_fn = fn;
#endif
  const detail::Tables& tb = detail::tables();

  std::vector<Job> jobs;
  int64_t floats = 0, max_rows = 0, max_capacity = 0;
  double products = 0;
  for (const Item& it : items) {
    const CompressedView& w = *it.w;
    if (it.n <= 0 || w.rows == 0) continue;
    detail::Matrix m;
    m.codec = w.codec;
    m.rows = w.rows;
    m.cols = w.cols;
    m.codes = w.codes.data();
    m.row_offsets = w.row_offsets.data();
    m.packed = w.packed.data();
    m.levels = w.levels.data();
    if (w.codec == Codec::kV2) {
      const detail::V2Tables t = detail::v2_tables(w.dictionary.data(), w.dictionary_id);
      m.v2_entries = w.dictionary.data();
      m.v2_list = t.list;
      m.v2_perm = t.perm;
    }
    if (w.codec == Codec::kV3) {
      m.v3_entries = w.dictionary.data();
      if (it.n > 1) m.v3_list = detail::v3_list_table(w.dictionary.data(), w.dictionary_id);
    }
    if (w.codec == Codec::kG4) {
      m.g4_tokens = w.tokens.data();
      m.g4_token_bytes = static_cast<int64_t>(w.tokens.size());
      m.g4_kinds = w.kinds.data();
      m.g4_kind_bytes = static_cast<int64_t>(w.kinds.size());
      m.g4_offsets = w.group_offsets.data();
    }
    int64_t capacity = 0;
    if (w.has_codes() && it.n == 1) {
      // One token of qmoe-v1, v2 or v3 takes the slot kernels, which use no lists (rows() in
      // kernels_impl.h).
    } else if (w.codec == Codec::kG4) {
      capacity = 4 * ((w.cols + 64 + 7) / 8 * 8);  // 4 rows per region, 64 written past the end
    } else if (w.has_codes()) {
      int64_t max_codes = 0;
      for (int64_t r = 0; r < w.rows; ++r)
        max_codes = std::max<int64_t>(max_codes, w.row_offsets[r + 1] - w.row_offsets[r]);
      capacity = 3 * max_codes + 8;  // <= 3 symbols per codeword, 4 written per store
      // qmoe-v3: each list region holds one list per row of a pair.
      if (w.codec == Codec::kV3) capacity = 2 * ((capacity + 7) / 8 * 8);
    } else {
      capacity = w.cols + 8;  // up to 8 written per byte, at most 5 of them kept
    }
    capacity = (capacity + 7) / 8 * 8;  // keeps the staged results aligned
    max_capacity = std::max(max_capacity, capacity);
    max_rows = std::max(max_rows, w.rows);
    products +=
        static_cast<double>(w.rows) * static_cast<double>(w.cols) * static_cast<double>(it.n);
    const int64_t padded_cols = w.cols + kColPad;
    for (int64_t t0 = 0; t0 < it.n; t0 += kMaxPasses * kMaxPassTokens) {
      Job& job = jobs.emplace_back();
      job.fn = w.codec == Codec::kG4 ? g4_fn : fn;
      job.work.m = m;
      job.work.accumulate = accumulate;
      job.work.list_capacity = capacity;
      job.src = it.xin + t0;
      job.col_blocks = (padded_cols + kColBlock - 1) / kColBlock;
      // Passes of up to 32 tokens: 1 token stays a plain vector, more are padded to a multiple
      // of 8.
      int num_passes = 0;
      for (int64_t t = t0; t < it.n && num_passes < kMaxPasses; t += kMaxPassTokens) {
        detail::Pass& p = job.passes[num_passes];
        p.n = static_cast<int>(std::min(kMaxPassTokens, it.n - t));
        p.bp = p.n == 1 ? 1 : (p.n + 7) / 8 * 8;
        p.y = it.yout + t;
        p.scale = it.scale != nullptr ? it.scale + t : nullptr;
        job.offsets[num_passes++] = floats;
        floats += (padded_cols * p.bp + 15) / 16 * 16;  // keep every pass 64-byte aligned
      }
      job.work.num_passes = num_passes;
    }
  }
  if (jobs.empty()) return;

  // qmoe-g4 at one token at the avx2 and avx512 levels: int8 inputs (Pass::xq), one quantization
  // per call and token, before the rows are split, so results do not depend on the thread count.
  // Up to 2^24 columns: the kernels' int32 sums of a row (at most 127 per column) cannot overflow.
  auto g4_int8 = [&](const Job& job) {
    return job.work.m.codec == Codec::kG4 && job.passes[0].bp == 1 &&
           job.work.m.cols <= (int64_t{1} << 24);
  };
  if (level != SimdLevel::kScalar && opt.int8_activations) {
    int64_t bytes = 0;
    for (const Job& job : jobs) {
      if (g4_int8(job)) bytes += (job.work.m.cols + detail::kG4XqPad + 63) / 64 * 64;
    }
    if (bytes > 0) {
      int8_t* xq = t_xq.get(static_cast<size_t>(bytes));
      for (Job& job : jobs) {
        if (!g4_int8(job)) continue;
        const int64_t cols = job.work.m.cols;
        if (quantize_int8(job.src[0], cols, xq, &job.passes[0].xq_inv)) {
          job.passes[0].xq = xq;
          xq += (cols + detail::kG4XqPad + 63) / 64 * 64;
        }
      }
    }
  }

  float* inputs = t_inputs.get(static_cast<size_t>(std::max<int64_t>(floats, 1)));
  std::vector<int64_t> prep_start(jobs.size() + 1, 0);  // first transposition item of each job
  for (size_t j = 0; j < jobs.size(); ++j) {
    Job& job = jobs[j];
    for (int q = 0; q < job.work.num_passes; ++q) job.passes[q].xt = inputs + job.offsets[q];
    job.work.passes = job.passes;
    prep_start[j + 1] = prep_start[j] + job.work.num_passes * job.col_blocks;
  }
  // Inputs, column-major per pass: xt[c * bp + t]; zero past the last column and token.
  auto prepare = [&](const Job& job, int64_t item) {
    const int q = static_cast<int>(item / job.col_blocks);
    const int64_t cols = job.work.m.cols, padded_cols = cols + kColPad;
    const int64_t c0 = (item % job.col_blocks) * kColBlock;
    const int64_t c1 = std::min(padded_cols, c0 + kColBlock);
    const int64_t real_end = std::min(c1, cols);
    const detail::Pass& p = job.passes[q];
    if (p.xq != nullptr) return;  // int8 inputs: the kernels read those alone
    float* xt = inputs + job.offsets[q];
    const float* const* src = job.src + q * kMaxPassTokens;
    if (p.bp == 1) {
      if (real_end > c0)
        std::memcpy(xt + c0, src[0] + c0, static_cast<size_t>(real_end - c0) * sizeof(float));
      for (int64_t c = std::max(c0, real_end); c < c1; ++c) xt[c] = 0.0f;
    } else {
      for (int64_t c = c0; c < c1; ++c) {
        float* dst = xt + c * p.bp;
        if (c < cols) {
          for (int t = 0; t < p.n; ++t) dst[t] = src[t][c];
          for (int t = p.n; t < p.bp; ++t) dst[t] = 0.0f;
        } else {
          for (int t = 0; t < p.bp; ++t) dst[t] = 0.0f;
        }
      }
    }
  };
  auto prepare_flat = [&](int64_t item) {
    const size_t j = static_cast<size_t>(
        std::upper_bound(prep_start.begin(), prep_start.end(), item) - prep_start.begin() - 1);
    prepare(jobs[j], item - prep_start[j]);
  };
  const int64_t prep_items = prep_start.back();

  int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
  if (products < kSerialWork) threads = 1;
  // Small inputs are prepared by the calling thread: a barrier costs more than the copy, and
  // much more on a machine whose cores are oversubscribed.
  const bool parallel_prepare = threads > 1 && floats > kSerialPrepareFloats;
  if (!parallel_prepare) {
    for (int64_t item = 0; item < prep_items; ++item) prepare_flat(item);
  }
  const int64_t row_blocks = (max_rows + kRowBlock - 1) / kRowBlock;

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    if (parallel_prepare) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < prep_items; ++item) prepare_flat(item);
    }
    // Lists, then the staged results (64-byte aligned: the list capacity is rounded up).
    int32_t* scratch = t_lists.get(static_cast<size_t>(2 * max_capacity + detail::kStageFloats));
    // This thread's contiguous share of the row blocks, then every job over that share: each
    // matrix's codes are read as one sequential stream per thread.
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t b0 = row_blocks * id / nt, b1 = row_blocks * (id + 1) / nt;
    for (const Job& job : jobs) {
      const int64_t rows = job.work.m.rows;
      for (int64_t b = b0; b < b1 && b * kRowBlock < rows; ++b) {
        job.fn(job.work, tb, b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), scratch);
      }
    }
  }
}

}  // namespace

std::string_view simd_level_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::kScalar:
      return "scalar";
    case SimdLevel::kAvx2:
      return "avx2";
    case SimdLevel::kAvx512:
      return "avx512";
  }
  return "unknown";
}

std::optional<SimdLevel> simd_level_from_name(std::string_view s) {
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (s == simd_level_name(l)) return l;
  }
  return std::nullopt;
}

bool simd_level_supported(SimdLevel l) {
  return rows_fn(l) != nullptr && cpu_runs(l);
}

std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> out;
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (simd_level_supported(l)) out.push_back(l);
  }
  return out;
}

SimdLevel best_simd_level() {
  return supported_simd_levels().back();
}

SimdLevel simd_level() {
  const int cur = g_level.load(std::memory_order_acquire);
  if (cur >= 0) return static_cast<SimdLevel>(cur);
  std::lock_guard<std::mutex> lock(g_level_mutex);
  if (g_level.load(std::memory_order_relaxed) < 0) {
    SimdLevel l = best_simd_level();
    if (const auto requested = requested_cpu_simd()) l = checked(*simd_level_from_name(*requested));
    g_level.store(static_cast<int>(l), std::memory_order_release);
  }
  return static_cast<SimdLevel>(g_level.load(std::memory_order_relaxed));
}

void set_simd_level(SimdLevel l) {
  g_level.store(static_cast<int>(checked(l)), std::memory_order_release);
  set_cpu_simd(simd_level_name(l));  // the GEMM of core (gptq, switch) follows it too
}

bool g4_vnni_supported() {
  return cpu_runs_g4_vnni();
}

bool g4_int8_supported(SimdLevel l) {
  return l != SimdLevel::kScalar && simd_level_supported(l);
}

void matvec(const CompressedView& w, const float* x, float* y, const MatmulOptions& opt) {
  check_matrix(w);
  if (w.rows > 0 && y == nullptr) throw InvalidArgument("matvec: y is null");
  if (w.cols > 0 && x == nullptr) throw InvalidArgument("matvec: x is null");
  const Item item{&w, 1, &x, &y, nullptr};
  run({&item, 1}, opt.accumulate, opt);
}

void matmul(const CompressedView& w, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy,
            const MatmulOptions& opt) {
  check_matrix(w);
  if (n < 0) throw InvalidArgument("matmul: negative token count");
  if (n == 0) return;
  if (ldx < w.cols || ldy < w.rows) {
    throw InvalidArgument("matmul: strides ldx=" + std::to_string(ldx) +
                          ", ldy=" + std::to_string(ldy) + " are smaller than the matrix width " +
                          std::to_string(w.cols) + " / height " + std::to_string(w.rows));
  }
  if ((w.rows > 0 && y == nullptr) || (w.cols > 0 && x == nullptr))
    throw InvalidArgument("matmul: null x or y");
  std::vector<const float*> xin(static_cast<size_t>(n));
  std::vector<float*> yout(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    xin[static_cast<size_t>(t)] = x + t * ldx;
    yout[static_cast<size_t>(t)] = y + t * ldy;
  }
  const Item item{&w, n, xin.data(), yout.data(), nullptr};
  run({&item, 1}, opt.accumulate, opt);
}

void grouped_matmul(std::span<const ExpertBatch> items, const float* x, int64_t x_rows, int64_t ldx,
                    float* y, int64_t y_rows, int64_t ldy, const MatmulOptions& opt) {
  if (x_rows < 0 || y_rows < 0) throw InvalidArgument("grouped_matmul: negative row count");
  // Check everything before writing anything.
  for (size_t e = 0; e < items.size(); ++e) {
    const ExpertBatch& it = items[e];
    const std::string who = "grouped_matmul: item " + std::to_string(e) + ": ";
    check_matrix(it.weight);
    const size_t n = it.in_rows.size();
    if (!it.out_rows.empty() && it.out_rows.size() != n)
      throw InvalidArgument(who + "out_rows and in_rows differ in size");
    if (!it.scale.empty() && it.scale.size() != n)
      throw InvalidArgument(who + "scale and in_rows differ in size");
    if (n == 0) continue;
    if (ldx < it.weight.cols || ldy < it.weight.rows)
      throw InvalidArgument(who + "ldx or ldy smaller than the matrix");
    if ((it.weight.cols > 0 && x == nullptr) || (it.weight.rows > 0 && y == nullptr)) {
      throw InvalidArgument(who + "null x or y");
    }
    for (size_t i = 0; i < n; ++i) {
      if (it.in_rows[i] < 0 || it.in_rows[i] >= x_rows) {
        throw InvalidArgument(who + "in_rows[" + std::to_string(i) +
                              "] = " + std::to_string(it.in_rows[i]) + " is outside 0.." +
                              std::to_string(x_rows - 1));
      }
      const int32_t o = it.out_rows.empty() ? it.in_rows[i] : it.out_rows[i];
      if (o < 0 || o >= y_rows) {
        throw InvalidArgument(who + "output row " + std::to_string(o) + " is outside 0.." +
                              std::to_string(y_rows - 1));
      }
    }
  }
  size_t total = 0;
  for (const ExpertBatch& it : items) total += it.in_rows.size();
  std::vector<const float*> xin(total);
  std::vector<float*> yout(total);
  std::vector<Item> work;
  work.reserve(items.size());
  size_t k = 0;
  for (const ExpertBatch& it : items) {
    const size_t n = it.in_rows.size();
    if (n == 0) continue;
    for (size_t i = 0; i < n; ++i) {
      xin[k + i] = x + static_cast<int64_t>(it.in_rows[i]) * ldx;
      yout[k + i] =
          y + static_cast<int64_t>(it.out_rows.empty() ? it.in_rows[i] : it.out_rows[i]) * ldy;
    }
    work.push_back({&it.weight, static_cast<int64_t>(n), xin.data() + k, yout.data() + k,
                    it.scale.empty() ? nullptr : it.scale.data()});
    k += n;
  }
  run(work, opt.accumulate, opt);
}

}  // namespace qmoe::cpu
