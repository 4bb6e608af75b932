// The block loop of compression (qmoe/switch/block_loop.h): blocks in order; per block the stages
// load -> forward -> gather -> (Hessians -> GPTQ -> encode -> write, per matrix, on the pool)
// -> recompute -> release.
#include "qmoe/switch/block_loop.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <thread>

#include <omp.h>

#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/forward.h"

namespace qmoe::sw {
namespace {

using Clock = std::chrono::steady_clock;

// Resident memory kept out of the budget for the matrices in flight: thread stacks, allocator
// slack, the writer's buffers.
constexpr int64_t kReserve = int64_t{24} << 20;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double cpu_clock(clockid_t which) {
  timespec ts{};
  ::clock_gettime(which, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
// CPU time of this thread (the pool's jobs run single-threaded or in their own OpenMP teams) and
// of the process (the forward's parallel loops use every thread; nothing else runs then).
double thread_cpu() {
  return cpu_clock(CLOCK_THREAD_CPUTIME_ID);
}
double process_cpu() {
  return cpu_clock(CLOCK_PROCESS_CPUTIME_ID);
}

// Hands the pages of a mapped range back to the page cache: the mapping is read-only and backed by
// the file, so touching them again just faults them back in. Keeps resident memory at what is in
// flight rather than everything read so far.
void release_pages(std::span<const std::byte> b) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto p = reinterpret_cast<uintptr_t>(b.data());
  const uintptr_t a = (p + page - 1) / page * page, e = (p + b.size()) / page * page;
  if (e > a) ::madvise(reinterpret_cast<void*>(a), e - a, MADV_DONTNEED);
}

// Starts reading a range from disk in the background (not resident until touched).
void prefetch_pages(std::span<const std::byte> b) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data()) / page * page;
  const uintptr_t e = reinterpret_cast<uintptr_t>(b.data()) + b.size();
  if (e > p) ::madvise(reinterpret_cast<void*>(p), e - p, MADV_WILLNEED);
}

// ---- the pool of workers -----------------------------------------------------------------------

// Runs jobs on `threads` workers; a job is admitted only while the estimated memory of the jobs in
// flight stays within the budget (one runs alone if it needs more by itself). The calling thread
// ticks progress about 5 times a second; an exception from a job or from tick stops the pool: no
// new job starts, those in flight finish, and the first exception is rethrown.
class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {}

  // job(i, threads_inside) for i < n, each admitted with estimate[i] bytes within `budget`.
  void run(size_t n, const std::vector<int64_t>& estimate, int64_t budget,
           const std::function<void(size_t, int)>& job, const std::function<void()>& tick) {
    budget_ = budget;
    next_ = 0;
    in_use_ = 0;
    stop_ = false;
    error_ = nullptr;
    const int nworkers = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads_), n));
    if (nworkers == 0) return;
    // Threads inside one job when there are fewer jobs than threads (the bytes do not depend on
    // it: Hessians, GPTQ and encode are bit-identical for any thread count).
    const int inside = std::max(1, threads_ / nworkers);
    std::vector<std::thread> pool;
    active_ = nworkers;
    for (int k = 0; k < nworkers; ++k) {
      pool.emplace_back([&, inside] {
        for (;;) {
          size_t i;
          int64_t need;
          {
            std::unique_lock lk(mu_);
            cv_.wait(lk, [&] {
              return stop_ || next_ >= n || in_use_ == 0 || in_use_ + estimate[next_] <= budget_;
            });
            if (stop_ || next_ >= n) break;
            i = next_++;
            need = estimate[i];
            in_use_ += need;
            peak_ = std::max(peak_, in_use_);
          }
          try {
            job(i, inside);
          } catch (...) {
            std::lock_guard lk(mu_);
            if (!error_) error_ = std::current_exception();
            stop_ = true;
          }
          {
            std::lock_guard lk(mu_);
            in_use_ -= need;
          }
          cv_.notify_all();
        }
        {
          std::lock_guard lk(mu_);
          --active_;
        }
        done_cv_.notify_all();
        cv_.notify_all();
      });
    }
    {
      std::unique_lock lk(mu_);
      while (active_ > 0) {
        done_cv_.wait_for(lk, std::chrono::milliseconds(200));
        if (!tick || stop_) continue;
        lk.unlock();
        std::exception_ptr thrown;
        try {
          tick();
        } catch (...) {
          thrown = std::current_exception();
        }
        lk.lock();
        if (thrown) {
          if (!error_) error_ = thrown;
          stop_ = true;
          cv_.notify_all();
        }
      }
    }
    for (auto& t : pool) t.join();
    if (error_) std::rethrow_exception(error_);
  }

  int64_t peak() const { return peak_; }

 private:
  int threads_;
  int64_t budget_ = 0;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  size_t next_ = 0;
  int64_t in_use_ = 0, peak_ = 0;
  int active_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// ---- blocks and their matrices -----------------------------------------------------------------

struct BlockWork {
  Stack stack = Stack::kEncoder;
  int64_t block = 0;
  std::vector<size_t> matrices;  // indices into the experts, wi before wo per expert
};

std::vector<BlockWork> group_by_block(std::span<const ExpertMatrix> experts) {
  std::map<std::pair<int, int64_t>, BlockWork> m;
  for (size_t i = 0; i < experts.size(); ++i) {
    const Stack s = experts[i].stack == "decoder" ? Stack::kDecoder : Stack::kEncoder;
    BlockWork& b = m[{s == Stack::kEncoder ? 0 : 1, experts[i].block}];
    b.stack = s;
    b.block = experts[i].block;
    b.matrices.push_back(i);
  }
  std::vector<BlockWork> out;
  for (auto& [k, b] : m) out.push_back(std::move(b));
  return out;
}

std::string block_key(Stack s, int64_t b) {
  return std::string(stack_name(s)) + ".block." + std::to_string(b);
}

// Thread-safe sums of per-job phase times and work.
struct PhaseAccumulator {
  std::mutex mu;
  LoopReport* report = nullptr;
  void add(PhaseStats LoopReport::*phase, double seconds, double cpu, double flops) {
    std::lock_guard lk(mu);
    PhaseStats& p = report->*phase;
    p.seconds += seconds;
    p.cpu_seconds += cpu;
    p.flops += flops;
    p.thread_seconds = true;
  }
};

int64_t current_rss_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t size = 0, rss = 0;
  f >> size >> rss;
  return rss * ::sysconf(_SC_PAGESIZE);
}

// The counted inputs of a block's experts (at most `cap` rows each, the rows the Hessians use),
// gathered once per block: in memory, or written to an unlinked scratch file and read back by each
// job when they would take more than half of what the memory cap leaves. The forward pass is never
// run again for a group of experts.
class RoutedInputs {
 public:
  RoutedInputs() = default;
  RoutedInputs(const RoutedInputs&) = delete;
  RoutedInputs& operator=(const RoutedInputs&) = delete;
  ~RoutedInputs() {
    if (fd_ >= 0) ::close(fd_);
  }

  // Rows each needed expert will have (to size the decision before gathering).
  static int64_t bytes(const SequentialRunner& run, int64_t cap, const std::vector<char>& need) {
    int64_t b = 0;
    for (size_t e = 0; e < need.size(); ++e)
      if (need[e]) {
        int64_t n = static_cast<int64_t>(run.counted_tokens(static_cast<int64_t>(e)).size());
        if (cap > 0) n = std::min(n, cap);
        b += n * run.ff_input().cols() * static_cast<int64_t>(sizeof(float));
      }
    return b;
  }

  void gather(const SequentialRunner& run, int64_t cap, const std::vector<char>& need, bool spill,
              const std::filesystem::path& dir) {
    const RowMatrix& x = run.ff_input();
    const int64_t d = x.cols();
    rows_.assign(need.size(), 0);
    offset_.assign(need.size(), 0);
    mem_.assign(need.size(), RowMatrix());
    spilled_ = spill;
    if (spill) open_scratch(dir);
    std::vector<float> buf;
    int64_t at = 0;
    for (size_t e = 0; e < need.size(); ++e) {
      if (!need[e]) continue;
      const auto toks = run.counted_tokens(static_cast<int64_t>(e));
      int64_t n = static_cast<int64_t>(toks.size());
      if (cap > 0) n = std::min(n, cap);
      rows_[e] = n;
      if (!spill) {
        mem_[e].resize(n, d);
        for (int64_t i = 0; i < n; ++i) mem_[e].row(i) = x.row(toks[static_cast<size_t>(i)]);
        continue;
      }
      offset_[e] = at;
      buf.resize(static_cast<size_t>(n * d));
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(x.row(toks[static_cast<size_t>(i)]).data(), d, buf.data() + i * d);
      write_all(buf.data(), static_cast<int64_t>(buf.size() * sizeof(float)), at);
      at += static_cast<int64_t>(buf.size() * sizeof(float));
    }
  }

  bool spilled() const { return spilled_; }
  int64_t rows(int64_t e) const { return rows_[static_cast<size_t>(e)]; }

  // Frees the memory and the scratch file.
  void release() {
    std::vector<RowMatrix>().swap(mem_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // Expert e's rows (rows(e) x d floats): in memory, or read back into `buf`.
  const float* get(int64_t e, int64_t d, std::vector<float>& buf) const {
    if (!spilled_) return mem_[static_cast<size_t>(e)].data();
    const int64_t n = rows(e);
    buf.resize(static_cast<size_t>(n * d));
    const int64_t want = n * d * static_cast<int64_t>(sizeof(float));
    int64_t done = 0;
    auto* p = reinterpret_cast<char*>(buf.data());
    while (done < want) {
      const ssize_t r = ::pread(fd_, p + done, static_cast<size_t>(want - done),
                                offset_[static_cast<size_t>(e)] + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw Error("compress: cannot read back the spilled expert inputs: " +
                    std::string(r < 0 ? std::strerror(errno) : "short read"));
      done += r;
    }
    return buf.data();
  }

 private:
  std::vector<int64_t> rows_, offset_;
  std::vector<RowMatrix> mem_;
  bool spilled_ = false;
  int fd_ = -1;

  void open_scratch(const std::filesystem::path& dir) {
    const std::filesystem::path d = dir.empty() ? std::filesystem::temp_directory_path() : dir;
    // An unlinked file: gone with the process, whatever way it ends.
    fd_ = ::open(d.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ < 0) {
      std::string tmpl = (d / "qmoe-routed.XXXXXX").string();
      fd_ = ::mkostemp(tmpl.data(), O_CLOEXEC);
      if (fd_ >= 0) ::unlink(tmpl.c_str());
    }
    if (fd_ < 0)
      throw Error(d.string() +
                  ": cannot create a scratch file for the expert inputs: " + std::strerror(errno));
  }

  void write_all(const float* data, int64_t bytes, int64_t at) {
    const auto* p = reinterpret_cast<const char*>(data);
    int64_t done = 0;
    while (done < bytes) {
      const ssize_t w = ::pwrite(fd_, p + done, static_cast<size_t>(bytes - done), at + done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0)
        throw Error("compress: cannot write the spilled expert inputs: " +
                    std::string(w < 0 ? std::strerror(errno) : "no space"));
      done += w;
    }
  }
};

}  // namespace

StoredMatrix MemoryExpertStore::load(const ExpertMatrix& m) {
  std::lock_guard lk(mu_);
  const Entry& e = entries_.at(m.name);
  return {e.matrix->view(), e.matrix};
}

void MemoryExpertStore::store(const ExpertMatrix& m, const CompressedMatrix& cm,
                              const MatrixStats& s) {
  auto p = std::make_shared<const CompressedMatrix>(cm);
  std::lock_guard lk(mu_);
  entries_[m.name] = Entry{std::move(p), s};
}

const MemoryExpertStore::Entry& MemoryExpertStore::at(const std::string& name) const {
  std::lock_guard lk(mu_);
  return entries_.at(name);
}

size_t MemoryExpertStore::size() const {
  std::lock_guard lk(mu_);
  return entries_.size();
}

int64_t expert_memory_estimate(const ExpertMatrix& m, bool gptq, int64_t calib_tokens) {
  const int64_t n = m.numel();
  // Input pages + symbols (1 byte/weight) + codes (v1 at worst ~1 byte/weight) + the work file.
  int64_t b = n * dtype_size(m.dtype) + n + n + n / 4 + 4 * m.rows;
  if (gptq) {
    // float32 copy of W, the Hessian (float, plus its float64 sums or the float64 pages of the
    // file it is read from), and GPTQ's own scratch (its factor of H, working rows).
    b += 4 * n + 12 * m.cols * m.cols;
    b += gptq_workspace_bytes(m.rows, m.cols, GptqOptions{}, 1);
    // Calibration: the hidden activations ReLU(wi x) of wo's tokens, and wi's float copy.
    if (calib_tokens > 0 && m.which == "wo") b += 4 * calib_tokens * m.cols + 4 * n;
  }
  return b;
}

LoopReport run_block_loop(const std::shared_ptr<const SwitchSource>& source,
                          std::span<const ExpertMatrix> experts, const LoopOptions& opt,
                          ExpertStore& store) {
  const SwitchSource& src = *source;
  if (opt.hessians && opt.calibration)
    throw InvalidArgument("compress: Hessians from a file and from calibration exclude each other");
  if (opt.threads < 0) throw InvalidArgument("compress: threads must be >= 0");
  if (!gptq_grid_is_ternary(opt.grid))
    throw InvalidArgument("compress: the GPTQ grid must be ternary");
  const auto t_start = Clock::now();
  const bool gptq = opt.hessians || opt.calibration;
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
  const std::vector<BlockWork> blocks = group_by_block(experts);

  LoopReport rep;
  rep.threads = threads;
  PhaseAccumulator acc;
  acc.report = &rep;
  Pool pool(threads);

  // What is finished already.
  std::vector<char> have(experts.size(), 0);
  for (size_t i = 0; i < experts.size(); ++i) have[i] = store.has(experts[i]) ? 1 : 0;
  for (char h : have) rep.resumed += h;
  std::atomic<int64_t> finished{0};

  // Calibration: the model without its blocks, and the runner over the pairs.
  std::optional<SwitchModel> shell;
  std::unique_ptr<SequentialRunner> run;
  SeqOffsets enc_seqs, dec_seqs;
  int64_t total_tokens = 0;
  if (opt.calibration) {
    if (src.is_container())
      throw FormatError(error_context(
          src.path().string(), "", "calibration needs the original checkpoint, not a container"));
    // The runner holds a reference to the model: it must not move after this.
    shell.emplace(SwitchModel::shell(source));
    run = std::make_unique<SequentialRunner>(*shell, *opt.calibration, opt.calib);
    enc_seqs = encoder_seqs(*opt.calibration);
    dec_seqs = decoder_seqs(*opt.calibration);
    // Every block up to the last one with expert matrices.
    if (!blocks.empty()) {
      const BlockWork& last = blocks.back();
      const auto& lay = src.layout();
      const int64_t enc_blocks =
          last.stack == Stack::kEncoder ? last.block + 1 : lay.encoder.num_blocks;
      const int64_t dec_blocks = last.stack == Stack::kDecoder ? last.block + 1 : 0;
      total_tokens = enc_blocks * enc_seqs.num_tokens() + dec_blocks * dec_seqs.num_tokens();
    }
  }

  auto tick = [&](const std::string& phase, const std::string& block) {
    if (!opt.progress) return;
    LoopProgress p;
    p.phase = phase;
    p.block = block;
    p.done = rep.resumed + finished.load();
    p.total = static_cast<int64_t>(experts.size());
    p.resumed = rep.resumed;
    p.tokens = rep.forward_tokens;
    p.total_tokens = total_tokens;
    p.seconds = since(t_start);
    opt.progress(p);
  };

  // Moves the runner through block (s, b) without expert work: attention and a dense or original
  // sparse feed-forward layer.
  auto forward_block = [&](Stack s, int64_t b, const BlockWork* work) {
    const auto t0 = Clock::now();
    const double c0 = process_cpu();
    shell->load_block(s, b, LoadOptions{.compressed_experts = true, .dense_experts = !work});
    rep.load.seconds += since(t0);
    rep.load.cpu_seconds += process_cpu() - c0;
    const auto t1 = Clock::now();
    const double c1 = process_cpu();
    run->begin_block();
    const bool sparse = run->sparse();
    rep.forward.flops += block_forward_flops(src.config(), s, sparse, src.layout().num_experts,
                                             s == Stack::kEncoder ? enc_seqs : dec_seqs, enc_seqs);
    rep.forward.seconds += since(t1);
    rep.forward.cpu_seconds += process_cpu() - c1;
  };

  for (const BlockWork& bw : blocks) {
    const std::string key = block_key(bw.stack, bw.block);
    // Calibration: run the blocks before this one (dense ones, or sparse ones without work here).
    if (run) {
      while (!run->done() && (run->stack() != bw.stack || run->block() < bw.block)) {
        const Stack s = run->stack();
        const int64_t b = run->block();
        tick("forward", block_key(s, b));
        forward_block(s, b, nullptr);
        const auto t2 = Clock::now();
        const double c2 = process_cpu();
        run->end_block();
        rep.forward.seconds += since(t2);
        rep.forward.cpu_seconds += process_cpu() - c2;
        rep.forward_tokens += (s == Stack::kEncoder ? enc_seqs : dec_seqs).num_tokens();
        shell->release_block(s, b);
        ++rep.blocks;
      }
      if (run->done() || run->stack() != bw.stack || run->block() != bw.block)
        throw InvalidArgument("compress: " + key + " is behind the calibration runner");
      tick("forward", key);
      forward_block(bw.stack, bw.block, &bw);
      if (!run->sparse())
        throw FormatError(
            error_context(src.path().string(), "", key + " has experts but no router"));
    }
    ++rep.blocks;

    // Gather each expert's counted inputs once, and QMoE's per-expert token cap.
    // The block's matrices still to do.
    std::vector<size_t> todo;
    for (size_t i : bw.matrices)
      if (!have[i]) todo.push_back(i);

    // Gather each expert's counted inputs once (only experts with work left), and QMoE's
    // per-expert token cap.
    RoutedInputs routed;
    int64_t cap = 0;
    if (run) {
      const auto t0 = Clock::now();
      const double c0 = process_cpu();
      const int64_t total = run->stack_tokens();
      cap = opt.token_cap_multiplier > 0 && total > 0
                ? expert_token_cap(total, run->num_experts(), opt.token_cap_multiplier)
                : 0;
      std::vector<char> need(static_cast<size_t>(run->num_experts()), 0);
      for (size_t i : todo) need[static_cast<size_t>(experts[i].expert)] = 1;
      const int64_t room = opt.max_memory > 0 ? opt.max_memory - current_rss_bytes() - kReserve
                                              : std::numeric_limits<int64_t>::max();
      const bool spill = RoutedInputs::bytes(*run, cap, need) > room / 2;
      routed.gather(*run, cap, need, spill, opt.scratch_dir);
      rep.spilled_blocks += spill ? 1 : 0;
      acc.add(&LoopReport::hessians, since(t0) * threads, (process_cpu() - c0), 0);
    }

    // Memory estimates, and the budget: what the cap leaves now (the calibration state and the
    // routed inputs are resident already).
    std::vector<int64_t> estimate(todo.size());
    for (size_t j = 0; j < todo.size(); ++j) {
      const ExpertMatrix& m = experts[todo[j]];
      const int64_t n = run ? routed.rows(m.expert) : 0;
      estimate[j] = expert_memory_estimate(m, gptq, n) + (routed.spilled() ? n * m.cols * 4 : 0);
    }
    int64_t budget = std::numeric_limits<int64_t>::max();
    if (opt.max_memory > 0) {
      budget = std::max<int64_t>(opt.max_memory - current_rss_bytes() - kReserve, 1);
      rep.memory_budget = rep.memory_budget > 0 ? std::min(rep.memory_budget, budget) : budget;
    }
    if (!todo.empty()) {
      const auto& first = experts[todo.front()];
      const SwitchSource::Stored st = src.stored(first.name);
      prefetch_pages(st.bytes);
    }

    auto job = [&](size_t j, int inside) {
      const ExpertMatrix& m = experts[todo[j]];
      if (j + 1 < todo.size()) prefetch_pages(src.stored(experts[todo[j + 1]].name).bytes);
      CompressedMatrix cm;
      MatrixStats stats;
      try {
        const SwitchSource::Stored st = src.stored(m.name);
        if (!gptq) {
          auto t0 = Clock::now();
          double c0 = thread_cpu();
          const TernaryMatrix t = ternarize_rtn(st.bytes.data(), st.dtype, m.rows, m.cols);
          release_pages(st.bytes);
          acc.add(&LoopReport::gptq, since(t0), thread_cpu() - c0, 0);
          t0 = Clock::now();
          c0 = thread_cpu();
          cm = encode(t, EncodeOptions{.codec = opt.codec, .threads = inside});
          acc.add(&LoopReport::encode, since(t0), thread_cpu() - c0, 0);
          stats.zero_fraction = t.zero_fraction();
        } else {
          auto t0 = Clock::now();
          double c0 = thread_cpu();
          const FloatTensor w = src.dense(m.name, {m.rows, m.cols});
          acc.add(&LoopReport::load, since(t0), thread_cpu() - c0, 0);
          t0 = Clock::now();
          c0 = thread_cpu();
          std::vector<float> h;
          int64_t tokens = 0;
          double hflops = 0;
          if (opt.hessians) {
            h = opt.hessians->hessian(m, tokens);
          } else {
            thread_local std::vector<float> readback;
            const int64_t d_in = src.config().d_model;
            const int64_t xn = routed.rows(m.expert);
            const float* xp = routed.get(m.expert, d_in, readback);
            const Eigen::Map<const RowMatrix> x(xp, xn, d_in);
            HessianAccumulator a(m.cols, cap);
            if (m.which == "wi") {
              a.add(x.data(), x.rows(), 0, inside);
            } else {
              // wo's inputs: ReLU(wi x) with the original wi, for every counted token.
              const std::string wi_name = SwitchNames::expert(m.stack, m.block, m.expert, "wi");
              // Only the tokens the cap keeps: a row's product does not depend on the others.
              const FloatTensor wi = src.dense(wi_name, {m.cols, m.rows});
              const int64_t use = cap > 0 ? std::min<int64_t>(x.rows(), cap) : x.rows();
              RowMatrix hidden(use, m.cols);
              linear_forward(Eigen::Map<const RowMatrix>(wi.data, m.cols, m.rows), x.data(), use,
                             hidden.data(), /*relu=*/true);
              hflops += 2.0 * static_cast<double>(use) * static_cast<double>(m.rows) *
                        static_cast<double>(m.cols);
              a.add(hidden.data(), hidden.rows(), 0, inside);
            }
            tokens = a.tokens();
            hflops += hessian_flops(m.cols, tokens);
            h = a.hessian();
          }
          acc.add(&LoopReport::hessians, since(t0), thread_cpu() - c0, hflops);
          t0 = Clock::now();
          c0 = thread_cpu();
          GptqOptions g;
          g.grid = opt.grid;
          g.percdamp = opt.percdamp;
          g.blocksize = opt.blocksize;
          g.actorder = opt.actorder;
          g.threads = inside;
          GptqResult r = gptq_quantize(w.data, m.rows, m.cols, h.empty() ? nullptr : h.data(), g);
          if (w.owned.empty()) release_pages(st.bytes);
          acc.add(&LoopReport::gptq, since(t0), thread_cpu() - c0,
                  h.empty() ? 0.0 : gptq_flops(m.rows, m.cols, opt.blocksize));
          t0 = Clock::now();
          c0 = thread_cpu();
          cm = encode(r.ternary, EncodeOptions{.codec = opt.codec, .threads = inside});
          acc.add(&LoopReport::encode, since(t0), thread_cpu() - c0, 0);
          stats.zero_fraction = r.ternary.zero_fraction();
          stats.loss = r.loss;
          stats.output_loss = r.output_loss;
          stats.tokens = tokens;
          stats.fallback = r.status != GptqStatus::kOk;
          {
            std::lock_guard lk(acc.mu);
            rep.hessian_tokens += tokens;
          }
        }
      } catch (const FormatError&) {
        throw;
      } catch (const std::exception& e) {
        throw FormatError(error_context(m.file, m.name, e.what()));
      }
      const auto t0 = Clock::now();
      const double c0 = thread_cpu();
      store.store(m, cm, stats);
      acc.add(&LoopReport::write, since(t0), thread_cpu() - c0, 0);
      finished.fetch_add(1);
    };
    pool.run(todo.size(), estimate, budget, job, [&] { tick("experts", key); });
    {
      std::lock_guard lk(acc.mu);
      rep.matrices += static_cast<int64_t>(todo.size());
    }
    routed.release();

    if (run) {
      // Recompute the block's output with its compressed experts (sequential) or its originals.
      const auto t0 = Clock::now();
      const double c0 = process_cpu();
      const SwitchConfig& c = src.config();
      const int64_t E = run->num_experts();
      std::vector<std::shared_ptr<const ExpertMlp>> mlps(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        const ExpertMatrix* wi = nullptr;
        const ExpertMatrix* wo = nullptr;
        for (size_t i : bw.matrices)
          if (experts[i].expert == e) (experts[i].which == "wi" ? wi : wo) = &experts[i];
        if (!wi || !wo)
          throw InvalidArgument("compress: " + key + " expert " + std::to_string(e) +
                                " is not among the matrices to compress");
        if (opt.sequential) {
          StoredMatrix a = store.load(*wi), b = store.load(*wo);
          auto owner =
              std::make_shared<std::pair<std::shared_ptr<const void>, std::shared_ptr<const void>>>(
                  std::move(a.owner), std::move(b.owner));
          mlps[static_cast<size_t>(e)] = std::make_shared<CompressedExpert>(a.view, b.view, owner);
        } else {
          Linear li, lo;
          li.t = src.dense(wi->name, {c.d_ff, c.d_model});
          li.out = c.d_ff, li.in = c.d_model;
          lo.t = src.dense(wo->name, {c.d_model, c.d_ff});
          lo.out = c.d_model, lo.in = c.d_ff;
          mlps[static_cast<size_t>(e)] =
              std::make_shared<DenseExpert>(std::move(li), std::move(lo));
        }
      }
      run->end_block(mlps);
      rep.forward.seconds += since(t0);
      rep.forward.cpu_seconds += process_cpu() - c0;
      rep.forward_tokens += (bw.stack == Stack::kEncoder ? enc_seqs : dec_seqs).num_tokens();
      shell->release_block(bw.stack, bw.block);
    }
    tick("experts", key);
  }
  rep.peak_in_flight = pool.peak();
  rep.seconds = since(t_start);
  return rep;
}

}  // namespace qmoe::sw
