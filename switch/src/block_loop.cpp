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
#include <nlohmann/json.hpp>

#include "qmoe/core/memory.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/error.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/comm.h"
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

// Byte buffers of the exchange.
void put_bytes(std::vector<std::byte>& out, const void* p, size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}

// Reads from a received buffer, in the order put_bytes() wrote.
struct Reader {
  const std::vector<std::byte>& buf;
  size_t at = 0;
  void get(void* p, size_t n) {
    if (at + n > buf.size()) throw Error("compress: a message between processes is truncated");
    std::memcpy(p, buf.data() + at, n);
    at += n;
  }
};

// The kept tokens of every expert this process owns in one sparse block, from every process: their
// layer-normed inputs in the global token order (process 0's tokens first, each process's in row
// order), and which of them count for Hessians. Exchanged once per block in rounds of experts of
// bounded size, kept in memory or, when they would take more than half of what the memory cap
// leaves, in an unlinked scratch file read back per expert. The forward pass never runs twice.
class ExpertTokens {
 public:
  ExpertTokens() = default;
  ExpertTokens(const ExpertTokens&) = delete;
  ExpertTokens& operator=(const ExpertTokens&) = delete;
  ~ExpertTokens() { release(); }

  // Collective. `round_bytes`: most bytes of rows moved in one round.
  void gather(const SequentialRunner& run, const Partition& part, int64_t block_index, Comm& comm,
              int64_t room, const std::filesystem::path& dir, int64_t round_bytes) {
    const RowMatrix& x = run.ff_input();
    d_ = x.cols();
    const int64_t E = run.num_experts();
    const int R = comm.size(), me = comm.rank();
    // Every process's kept count per expert.
    std::string mine(static_cast<size_t>(E) * sizeof(int64_t), '\0');
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n =
          static_cast<int64_t>(run.routing().tokens_of[static_cast<size_t>(e)].size());
      std::memcpy(mine.data() + e * sizeof(int64_t), &n, sizeof n);
    }
    const std::vector<std::string> all = comm.allgather(mine);
    counts_.assign(static_cast<size_t>(R), std::vector<int64_t>(static_cast<size_t>(E)));
    for (int r = 0; r < R; ++r)
      std::memcpy(counts_[static_cast<size_t>(r)].data(), all[static_cast<size_t>(r)].data(),
                  static_cast<size_t>(E) * sizeof(int64_t));
    owned_.assign(static_cast<size_t>(E), 0);
    rows_.assign(static_cast<size_t>(E), 0);
    counted_.assign(static_cast<size_t>(E), {});
    mem_.assign(static_cast<size_t>(E), RowMatrix());
    offset_.assign(static_cast<size_t>(E), 0);
    int64_t total = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (part.owner(block_index, e) != me) continue;
      owned_[static_cast<size_t>(e)] = 1;
      for (int r = 0; r < R; ++r)
        rows_[static_cast<size_t>(e)] += counts_[static_cast<size_t>(r)][static_cast<size_t>(e)];
      total += rows_[static_cast<size_t>(e)] * d_ * static_cast<int64_t>(sizeof(float));
    }
    spilled_ = total > room / 2;
    std::exception_ptr open_failed;
    if (spilled_) {
      try {
        open_scratch(dir);
      } catch (...) {
        open_failed = std::current_exception();
      }
    }
    int64_t file_at = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (!owned_[static_cast<size_t>(e)]) continue;
      counted_[static_cast<size_t>(e)].reserve(static_cast<size_t>(rows_[static_cast<size_t>(e)]));
      if (spilled_) {
        offset_[static_cast<size_t>(e)] = file_at;
        file_at += rows_[static_cast<size_t>(e)] * d_ * static_cast<int64_t>(sizeof(float));
      } else {
        mem_[static_cast<size_t>(e)].resize(rows_[static_cast<size_t>(e)], d_);
      }
    }
    // Rounds of consecutive experts, the same on every process (from the global counts).
    std::vector<int64_t> filled(static_cast<size_t>(E), 0);
    std::exception_ptr failed = open_failed;
    for (int64_t e0 = 0; e0 < E;) {
      int64_t e1 = e0, bytes = 0;
      do {
        int64_t all_rows = 0;
        for (int r = 0; r < R; ++r)
          all_rows += counts_[static_cast<size_t>(r)][static_cast<size_t>(e1)];
        bytes += all_rows * d_ * static_cast<int64_t>(sizeof(float));
        ++e1;
      } while (e1 < E && bytes < round_bytes);
      std::vector<std::vector<std::byte>> send(static_cast<size_t>(R));
      for (int64_t e = e0; e < e1; ++e) {
        const auto& toks = run.routing().tokens_of[static_cast<size_t>(e)];
        auto& out = send[static_cast<size_t>(part.owner(block_index, e))];
        for (int64_t t : toks) {
          const uint8_t c = run.counts(t) ? 1 : 0;
          put_bytes(out, &c, 1);
        }
        for (int64_t t : toks)
          put_bytes(out, x.row(t).data(), static_cast<size_t>(d_) * sizeof(float));
      }
      for (int r = 0; r < R; ++r)
        if (r != me) bytes_sent_ += static_cast<int64_t>(send[static_cast<size_t>(r)].size());
      const auto recv = comm.exchange(std::move(send));
      std::vector<float> tmp;
      for (int r = 0; r < R; ++r) {
        Reader in{recv[static_cast<size_t>(r)]};
        for (int64_t e = e0; e < e1; ++e) {
          if (!owned_[static_cast<size_t>(e)]) continue;
          const int64_t n = counts_[static_cast<size_t>(r)][static_cast<size_t>(e)];
          auto& flags = counted_[static_cast<size_t>(e)];
          for (int64_t i = 0; i < n; ++i) {
            uint8_t c = 0;
            in.get(&c, 1);
            flags.push_back(c);
          }
          const int64_t at = filled[static_cast<size_t>(e)];
          const size_t nb = static_cast<size_t>(n * d_) * sizeof(float);
          if (spilled_) {
            tmp.resize(static_cast<size_t>(n * d_));
            in.get(tmp.data(), nb);
            // A failed write is reported after the last round (every process takes part in all).
            try {
              if (!failed)
                write_all(tmp.data(), static_cast<int64_t>(nb),
                          offset_[static_cast<size_t>(e)] +
                              at * d_ * static_cast<int64_t>(sizeof(float)));
            } catch (...) {
              failed = std::current_exception();
            }
          } else if (n > 0) {
            in.get(mem_[static_cast<size_t>(e)].row(at).data(), nb);
          }
          filled[static_cast<size_t>(e)] += n;
        }
      }
      e0 = e1;
    }
    if (failed) std::rethrow_exception(failed);
  }

  bool spilled() const { return spilled_; }
  int64_t bytes_sent() const { return bytes_sent_; }
  bool owns(int64_t e) const { return owned_[static_cast<size_t>(e)] != 0; }
  int64_t rows(int64_t e) const { return rows_[static_cast<size_t>(e)]; }
  // Of expert e's rows, the ones each process sent (in rank order).
  int64_t rows_from(int rank, int64_t e) const {
    return counts_[static_cast<size_t>(rank)][static_cast<size_t>(e)];
  }
  // Rows whose tokens count for Hessians, at most `cap` (0: all).
  int64_t counted_rows(int64_t e, int64_t cap) const {
    int64_t n = 0;
    for (uint8_t c : counted_[static_cast<size_t>(e)]) n += c;
    return cap > 0 ? std::min(n, cap) : n;
  }

  // Expert e's rows (rows(e) x d floats): in memory, or read back into `buf`.
  const float* all(int64_t e, std::vector<float>& buf) const {
    if (!spilled_) return mem_[static_cast<size_t>(e)].data();
    const int64_t n = rows(e);
    buf.resize(static_cast<size_t>(n * d_));
    read_all(buf.data(), n * d_ * static_cast<int64_t>(sizeof(float)),
             offset_[static_cast<size_t>(e)]);
    return buf.data();
  }
  // The first min(cap, counted) counted rows of expert e, in order: a prefix of all() when no
  // token before them is excluded, else compacted into `buf`. `n` receives their number.
  const float* counted(int64_t e, int64_t cap, std::vector<float>& buf, int64_t& n) const {
    const auto& flags = counted_[static_cast<size_t>(e)];
    n = counted_rows(e, cap);
    int64_t prefix = 0;
    while (prefix < static_cast<int64_t>(flags.size()) && flags[static_cast<size_t>(prefix)])
      ++prefix;
    if (prefix >= n) return all(e, buf);
    std::vector<float> whole;
    const float* src = all(e, whole);
    buf.resize(static_cast<size_t>(n * d_));
    int64_t k = 0;
    for (size_t i = 0; i < flags.size() && k < n; ++i)
      if (flags[i]) std::copy_n(src + static_cast<int64_t>(i) * d_, d_, buf.data() + (k++) * d_);
    return buf.data();
  }

  // Frees the memory and the scratch file.
  void release() {
    std::vector<RowMatrix>().swap(mem_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int64_t d_ = 0;
  std::vector<std::vector<int64_t>> counts_;  // [rank][expert] kept tokens
  std::vector<char> owned_;
  std::vector<int64_t> rows_, offset_;
  std::vector<std::vector<uint8_t>> counted_;
  std::vector<RowMatrix> mem_;
  bool spilled_ = false;
  int fd_ = -1;
  int64_t bytes_sent_ = 0;

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

  void read_all(float* data, int64_t bytes, int64_t at) const {
    auto* p = reinterpret_cast<char*>(data);
    int64_t done = 0;
    while (done < bytes) {
      const ssize_t r = ::pread(fd_, p + done, static_cast<size_t>(bytes - done), at + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw Error("compress: cannot read back the spilled expert inputs: " +
                    std::string(r < 0 ? std::strerror(errno) : "short read"));
      done += r;
    }
  }
};

// The owners' expert outputs back to the processes of the tokens: y receives, for every local
// token routed to an expert, its expert's output. Collective; the same rounds of experts as the
// gather (outputs[e] holds rows(e) x d floats for every owned expert e, empty otherwise).
int64_t outputs_to_tokens(const SequentialRunner& run, const ExpertTokens& tokens,
                          const Partition& part, int64_t block_index, Comm& comm,
                          const std::function<void(int64_t e, RowMatrix& out)>& compute,
                          int64_t round_bytes, RowMatrix& y) {
  int64_t sent = 0;
  const int64_t E = run.num_experts();
  const int R = comm.size(), me = comm.rank();
  const int64_t d = run.hidden().cols();
  y.resize(run.stack_tokens(), d);
  std::exception_ptr failed;
  for (int64_t e0 = 0; e0 < E;) {
    int64_t e1 = e0, bytes = 0;
    do {
      int64_t all_rows = 0;
      for (int r = 0; r < R; ++r) all_rows += tokens.rows_from(r, e1);
      bytes += all_rows * d * static_cast<int64_t>(sizeof(float));
      ++e1;
    } while (e1 < E && bytes < round_bytes);
    std::vector<std::vector<std::byte>> send(static_cast<size_t>(R));
    RowMatrix out;
    for (int64_t e = e0; e < e1; ++e) {
      if (part.owner(block_index, e) != me || tokens.rows(e) == 0) continue;
      // A failure still sends rows of the right size, so that every process gets through the
      // exchange; the caller then stops them all together.
      try {
        if (!failed) compute(e, out);
      } catch (...) {
        failed = std::current_exception();
      }
      if (failed) out.setZero(tokens.rows(e), d);
      int64_t row = 0;
      for (int r = 0; r < R; ++r) {
        const int64_t n = tokens.rows_from(r, e);
        if (n > 0)
          put_bytes(send[static_cast<size_t>(r)], out.data() + row * d,
                    static_cast<size_t>(n * d) * sizeof(float));
        row += n;
      }
    }
    for (int r = 0; r < R; ++r)
      if (r != me) sent += static_cast<int64_t>(send[static_cast<size_t>(r)].size());
    const auto recv = comm.exchange(std::move(send));
    for (int r = 0; r < R; ++r) {
      Reader in{recv[static_cast<size_t>(r)]};
      for (int64_t e = e0; e < e1; ++e) {
        if (part.owner(block_index, e) != r) continue;
        for (int64_t t : run.routing().tokens_of[static_cast<size_t>(e)])
          in.get(y.row(t).data(), static_cast<size_t>(d) * sizeof(float));
      }
    }
    e0 = e1;
  }
  if (failed) std::rethrow_exception(failed);
  return sent;
}

}  // namespace

std::vector<LoopReport> gather_reports(Comm& comm, const LoopReport& mine) {
  auto phase = [](const PhaseStats& p) {
    return nlohmann::json{p.seconds, p.cpu_seconds, p.flops, p.thread_seconds};
  };
  const nlohmann::json j = {
      phase(mine.load),   phase(mine.forward), phase(mine.hessians), phase(mine.gptq),
      phase(mine.encode), phase(mine.write),   mine.blocks,          mine.matrices,
      mine.resumed,       mine.forward_tokens, mine.hessian_tokens,  mine.threads,
      mine.memory_budget, mine.spilled_blocks, mine.peak_in_flight,  mine.seconds,
      mine.bytes_sent,    mine.routed_tokens,  phase(mine.outputs),  mine.peak_rss,
      mine.memory_needed, mine.over_cap_blocks};
  std::vector<LoopReport> out;
  for (const std::string& text : comm.allgather(j.dump())) {
    const nlohmann::json v = nlohmann::json::parse(text);
    LoopReport r;
    PhaseStats* phases[] = {&r.load, &r.forward, &r.hessians, &r.gptq, &r.encode, &r.write};
    for (size_t i = 0; i < 6; ++i) {
      phases[i]->seconds = v[i][0];
      phases[i]->cpu_seconds = v[i][1];
      phases[i]->flops = v[i][2];
      phases[i]->thread_seconds = v[i][3];
    }
    r.blocks = v[6];
    r.matrices = v[7];
    r.resumed = v[8];
    r.forward_tokens = v[9];
    r.hessian_tokens = v[10];
    r.threads = v[11];
    r.memory_budget = v[12];
    r.spilled_blocks = v[13];
    r.peak_in_flight = v[14];
    r.seconds = v[15];
    r.bytes_sent = v[16];
    r.routed_tokens = v[17];
    r.outputs.seconds = v[18][0];
    r.outputs.cpu_seconds = v[18][1];
    r.outputs.flops = v[18][2];
    r.outputs.thread_seconds = v[18][3];
    r.peak_rss = v[19];
    r.memory_needed = v[20];
    r.over_cap_blocks = v[21];
    out.push_back(r);
  }
  return out;
}

LoopReport combine(std::span<const LoopReport> reports) {
  LoopReport c;
  for (const LoopReport& r : reports) {
    const std::pair<PhaseStats*, const PhaseStats*> phases[] = {
        {&c.load, &r.load},      {&c.forward, &r.forward}, {&c.hessians, &r.hessians},
        {&c.gptq, &r.gptq},      {&c.encode, &r.encode},   {&c.write, &r.write},
        {&c.outputs, &r.outputs}};
    for (auto [to, from] : phases) {
      // Thread-seconds add up; wall seconds of the processes' own threads overlap.
      to->seconds =
          from->thread_seconds ? to->seconds + from->seconds : std::max(to->seconds, from->seconds);
      to->cpu_seconds += from->cpu_seconds;
      to->flops += from->flops;
      to->thread_seconds = from->thread_seconds;
    }
    c.blocks = std::max(c.blocks, r.blocks);
    c.matrices += r.matrices;
    c.resumed += r.resumed;
    c.forward_tokens += r.forward_tokens;
    c.hessian_tokens += r.hessian_tokens;
    c.threads += r.threads;
    if (r.memory_budget > 0)
      c.memory_budget =
          c.memory_budget > 0 ? std::min(c.memory_budget, r.memory_budget) : r.memory_budget;
    c.spilled_blocks += r.spilled_blocks;
    c.peak_in_flight = std::max(c.peak_in_flight, r.peak_in_flight);
    c.peak_rss = std::max(c.peak_rss, r.peak_rss);
    c.memory_needed = std::max(c.memory_needed, r.memory_needed);
    c.over_cap_blocks = std::max(c.over_cap_blocks, r.over_cap_blocks);
    c.seconds = std::max(c.seconds, r.seconds);
    c.bytes_sent += r.bytes_sent;
    c.routed_tokens += r.routed_tokens;
  }
  return c;
}

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
  {
    GptqOptions g;
    g.grid = opt.grid;
    g.percdamp = opt.percdamp;
    g.blocksize = opt.blocksize;
    g.ternary = opt.ternary;
    gptq_validate_options(g, opt.rate);
  }
  // Rate control: each matrix's target (the same for every process: from all the matrices).
  // Scope "all": what matrices that cannot reach their target leave unspent (their size below it
  // by more than the tolerance, times their weights) is spread over the weights of the blocks
  // still to do, whose targets rise by it; every process gathers the sizes of each block's
  // matrices, so all compute the same targets (and a resumed run, from the stored matrices).
  std::vector<double> rate_target;
  const bool rate_carry = opt.rate.enabled() && opt.rate.scope == RateScope::kAll;
  double rate_unspent = 0;  // bits not yet given to a later block
  int64_t weights_left = 0;
  if (opt.rate.enabled()) {
    std::vector<std::pair<int64_t, int64_t>> shapes;
    for (const auto& m : experts) {
      shapes.emplace_back(m.rows, m.cols);
      weights_left += m.numel();
    }
    rate_target = rate_targets(shapes, opt.rate);
  }
  std::vector<double> achieved(experts.size(), 0.0);  // bits per weight, for rate_carry
  const auto t_start = Clock::now();
  const bool gptq = opt.hessians || opt.calibration;
  const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
  // The forward's parallel regions and products run on the loop's threads too (the calling
  // thread's OpenMP setting, restored on the way out).
  struct OmpThreads {
    int saved = omp_get_max_threads();
    explicit OmpThreads(int n) { omp_set_num_threads(n); }
    OmpThreads(const OmpThreads&) = delete;
    OmpThreads& operator=(const OmpThreads&) = delete;
    ~OmpThreads() { omp_set_num_threads(saved); }
  } omp_threads(threads);
  const std::vector<BlockWork> blocks = group_by_block(experts);
  Comm& comm = opt.comm ? *opt.comm : *local_comm();
  const int me = comm.rank();
  Partition part;
  part.ranks = comm.size();
  part.pairs = opt.calibration ? opt.calibration->num_pairs() : 0;
  const int64_t enc_blocks_total = src.layout().encoder.num_blocks;
  auto block_index = [&](Stack s, int64_t b) {
    return s == Stack::kEncoder ? b : enc_blocks_total + b;
  };

  LoopReport rep;
  rep.threads = threads;
  PhaseAccumulator acc;
  acc.report = &rep;
  Pool pool(threads);

  // This process's matrices (its experts), and which of them are finished already.
  std::vector<char> mine(experts.size(), 0), have(experts.size(), 0);
  int64_t owned_total = 0;
  for (size_t i = 0; i < experts.size(); ++i) {
    const Stack s = experts[i].stack == "decoder" ? Stack::kDecoder : Stack::kEncoder;
    mine[i] = part.owner(block_index(s, experts[i].block), experts[i].expert) == me ? 1 : 0;
    if (!mine[i]) continue;
    ++owned_total;
    have[i] = store.has(experts[i]) ? 1 : 0;
    rep.resumed += have[i];
  }
  std::atomic<int64_t> finished{0};

  // Calibration: the model without its blocks, and the runner over this process's pairs.
  std::optional<SwitchModel> shell;
  std::unique_ptr<SequentialRunner> run;
  SeqOffsets enc_seqs, dec_seqs;
  int64_t total_tokens = 0, enc_tokens_all = 0, dec_tokens_all = 0;
  if (opt.calibration) {
    if (src.is_container())
      throw FormatError(error_context(
          src.path().string(), "", "calibration needs the original checkpoint, not a container"));
    // The runner holds a reference to the model: it must not move after this.
    shell.emplace(SwitchModel::shell(source));
    const TokenPairs local = opt.calibration->slice(part.pair_begin(me), part.pair_end(me));
    run = std::make_unique<SequentialRunner>(*shell, local, opt.calib);
    enc_seqs = encoder_seqs(local);
    dec_seqs = decoder_seqs(local);
    enc_tokens_all = static_cast<int64_t>(opt.calibration->encoder_ids.size());
    dec_tokens_all = static_cast<int64_t>(opt.calibration->decoder_targets.size());
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
  // Most bytes of expert inputs moved in one round of the exchange.
  const int64_t round_bytes = int64_t{64} << 20;

  auto tick = [&](const std::string& phase, const std::string& block) {
    if (!opt.progress) return;
    LoopProgress p;
    p.phase = phase;
    p.block = block;
    p.done = rep.resumed + finished.load();
    p.total = owned_total;
    p.resumed = rep.resumed;
    p.tokens = rep.forward_tokens;
    p.total_tokens = total_tokens;
    p.seconds = since(t_start);
    opt.progress(p);
  };

  // Moves the runner through block (s, b) up to its feed-forward layer's routing.
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
    const SeqOffsets& seqs = s == Stack::kEncoder ? enc_seqs : dec_seqs;
    rep.forward.flops +=
        block_forward_flops(src.config(), s, sparse, src.layout().num_experts, seqs, enc_seqs);
    // A block with work computes its experts' outputs later, counted under outputs.
    if (work && sparse)
      rep.forward.flops -= 4.0 * static_cast<double>(seqs.num_tokens()) *
                           static_cast<double>(src.config().d_model) *
                           static_cast<double>(src.config().d_ff);
    rep.forward.seconds += since(t1);
    rep.forward.cpu_seconds += process_cpu() - c1;
  };

  for (const BlockWork& bw : blocks) {
    const std::string key = block_key(bw.stack, bw.block);
    const int64_t bi = block_index(bw.stack, bw.block);
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
      std::exception_ptr err;
      try {
        forward_block(bw.stack, bw.block, &bw);
        if (!run->sparse())
          throw FormatError(
              error_context(src.path().string(), "", key + " has experts but no router"));
      } catch (...) {
        err = std::current_exception();
      }
      agree(comm, err, key);
    }
    ++rep.blocks;

    // This process's matrices of the block still to do.
    std::vector<size_t> todo;
    for (size_t i : bw.matrices)
      if (mine[i] && !have[i]) todo.push_back(i);
    // The block's share of what earlier blocks left unspent.
    int64_t block_weights = 0;
    for (size_t i : bw.matrices) block_weights += experts[i].numel();
    if (rate_carry && rate_unspent > 0) {
      const double raise = rate_unspent / static_cast<double>(weights_left);
      for (size_t i : bw.matrices) rate_target[i] += raise;
      rate_unspent -= raise * static_cast<double>(block_weights);
    }
    weights_left -= block_weights;

    // Each owned expert's kept tokens from every process, once; QMoE's per-expert token cap over
    // the stack's tokens of all processes.
    ExpertTokens tokens;
    int64_t cap = 0;
    if (run) {
      const auto t0 = Clock::now();
      const double c0 = process_cpu();
      const int64_t total = bw.stack == Stack::kEncoder ? enc_tokens_all : dec_tokens_all;
      cap = opt.token_cap_multiplier > 0 && total > 0
                ? expert_token_cap(total, run->num_experts(), opt.token_cap_multiplier)
                : 0;
      const int64_t room = opt.max_memory > 0 ? opt.max_memory - resident_bytes() - kReserve
                                              : std::numeric_limits<int64_t>::max();
      tokens.gather(*run, part, bi, comm, room, opt.scratch_dir, round_bytes);
      rep.spilled_blocks += tokens.spilled() ? 1 : 0;
      acc.add(&LoopReport::hessians, since(t0) * threads, (process_cpu() - c0), 0);
    }

    // Memory estimates, and the budget: what the cap leaves now (the calibration state and the
    // expert inputs are resident already).
    std::vector<int64_t> estimate(todo.size());
    for (size_t j = 0; j < todo.size(); ++j) {
      const ExpertMatrix& m = experts[todo[j]];
      const int64_t n = run ? tokens.counted_rows(m.expert, cap) : 0;
      estimate[j] = expert_memory_estimate(m, gptq, n) +
                    (run && tokens.spilled() ? tokens.rows(m.expert) * m.cols * 4 : 0);
    }
    int64_t budget = std::numeric_limits<int64_t>::max();
    if (opt.max_memory > 0) {
      const int64_t resident = resident_bytes();
      budget = std::max<int64_t>(opt.max_memory - resident - kReserve, 1);
      rep.memory_budget = rep.memory_budget > 0 ? std::min(rep.memory_budget, budget) : budget;
      // What the block needs at the least: what is resident and its largest matrix alone.
      const int64_t largest =
          estimate.empty() ? 0 : *std::max_element(estimate.begin(), estimate.end());
      rep.memory_needed = std::max(rep.memory_needed, resident + kReserve + largest);
      if (largest > budget) ++rep.over_cap_blocks;
    }
    if (!todo.empty()) prefetch_pages(src.stored(experts[todo.front()].name).bytes);

    auto job = [&](size_t j, int inside) {
      const ExpertMatrix& m = experts[todo[j]];
      if (j + 1 < todo.size()) prefetch_pages(src.stored(experts[todo[j + 1]].name).bytes);
      CompressedMatrix cm;
      MatrixStats stats;
      try {
        const SwitchSource::Stored st = src.stored(m.name);
        if (!gptq && opt.ternary.is_default() && !opt.rate.enabled()) {
          auto t0 = Clock::now();
          double c0 = thread_cpu();
          const TernaryMatrix t = ternarize_rtn(st.bytes.data(), st.dtype, m.rows, m.cols);
          release_pages(st.bytes);
          acc.add(&LoopReport::gptq, since(t0), thread_cpu() - c0, 0);
          t0 = Clock::now();
          c0 = thread_cpu();
          cm =
              encode(t, EncodeOptions{.codec = opt.codec, .target = opt.target, .threads = inside});
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
          int64_t tokens_used = 0;
          double hflops = 0;
          if (opt.hessians) {
            h = opt.hessians->hessian(m, tokens_used);
          } else if (gptq) {
            // The counted tokens (at most the cap), in the global order.
            thread_local std::vector<float> buf;
            const int64_t d_in = src.config().d_model;
            int64_t xn = 0;
            const float* xp = tokens.counted(m.expert, cap, buf, xn);
            HessianAccumulator a(m.cols, cap);
            if (m.which == "wi") {
              a.add(xp, xn, d_in, inside);
            } else {
              // wo's inputs: ReLU(wi x) with the original wi.
              const std::string wi_name = SwitchNames::expert(m.stack, m.block, m.expert, "wi");
              const FloatTensor wi = src.dense(wi_name, {m.cols, m.rows});
              RowMatrix hidden(xn, m.cols);
              linear_forward(Eigen::Map<const RowMatrix>(wi.data, m.cols, m.rows), xp, xn,
                             hidden.data(), /*relu=*/true);
              hflops += 2.0 * static_cast<double>(xn) * static_cast<double>(m.rows) *
                        static_cast<double>(m.cols);
              a.add(hidden.data(), hidden.rows(), 0, inside);
              // wi's pages were read again here: back to the page cache, or every wi of every
              // block would stay resident (and count against --max-memory).
              release_pages(src.stored(wi_name).bytes);
            }
            tokens_used = a.tokens();
            hflops += hessian_flops(m.cols, tokens_used);
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
          g.ternary = opt.ternary;
          g.threads = inside;
          const EncodeOptions eo{.codec = opt.codec, .target = opt.target, .threads = inside};
          const float* hp = h.empty() ? nullptr : h.data();
          if (opt.rate.enabled()) {
            // Rate control: every try is GPTQ and an encoding (counted as GPTQ).
            RateControl rc = opt.rate;
            rc.target_bits = rate_target[todo[j]];
            rc.accept_below = true;
            qmoe::CompressResult c = compress_matrix(w.data, m.rows, m.cols, hp, g, eo, rc);
            // Read in place or widened from them: the mapped pages are done with either way.
            release_pages(st.bytes);
            acc.add(&LoopReport::gptq, since(t0), thread_cpu() - c0,
                    hp ? c.rate_steps * gptq_flops(m.rows, m.cols, opt.blocksize) : 0.0);
            cm = std::move(c.matrix);
            achieved[todo[j]] = cm.view().bits_per_weight();
            stats.zero_fraction = c.zero_fraction;
            stats.loss = c.loss;
            stats.output_loss = c.output_loss;
            stats.fallback = c.status != GptqStatus::kOk;
            stats.below_target = c.below_target;
          } else {
            GptqResult r = gptq_quantize(w.data, m.rows, m.cols, hp, g);
            release_pages(st.bytes);
            acc.add(&LoopReport::gptq, since(t0), thread_cpu() - c0,
                    hp ? gptq_flops(m.rows, m.cols, opt.blocksize) : 0.0);
            t0 = Clock::now();
            c0 = thread_cpu();
            cm = encode(r.ternary, eo);
            acc.add(&LoopReport::encode, since(t0), thread_cpu() - c0, 0);
            stats.zero_fraction = r.ternary.zero_fraction();
            stats.loss = r.loss;
            stats.output_loss = r.output_loss;
            stats.fallback = r.status != GptqStatus::kOk;
          }
          stats.tokens = tokens_used;
          if (!gptq)
            stats = MatrixStats{.zero_fraction = stats.zero_fraction,
                                .below_target = stats.below_target};
          {
            std::lock_guard lk(acc.mu);
            rep.hessian_tokens += tokens_used;
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
    std::exception_ptr failed;
    try {
      pool.run(todo.size(), estimate, budget, job, [&] { tick("experts", key); });
    } catch (...) {
      failed = std::current_exception();
    }
    // Every process stops here if one failed (its error reported by it alone).
    agree(comm, failed, key);
    {
      std::lock_guard lk(acc.mu);
      rep.matrices += static_cast<int64_t>(todo.size());
    }
    if (rate_carry) {
      // Every process's sizes of the block's matrices (its own: computed here, or read back when
      // resumed), as (index, bits per weight) records; then the block's unspent bits, summed in
      // the matrices' order.
      std::string mine_sizes;
      for (size_t i : bw.matrices) {
        if (!mine[i]) continue;
        if (have[i]) achieved[i] = store.load(experts[i]).view.bits_per_weight();
        const uint64_t index = i;
        mine_sizes.append(reinterpret_cast<const char*>(&index), sizeof index);
        mine_sizes.append(reinterpret_cast<const char*>(&achieved[i]), sizeof(double));
      }
      for (const std::string& from : comm.allgather(mine_sizes)) {
        for (size_t at = 0; at + 16 <= from.size(); at += 16) {
          uint64_t index = 0;
          std::memcpy(&index, from.data() + at, 8);
          if (index >= achieved.size())
            throw InvalidArgument("compress: a process sent the size of an unknown matrix");
          std::memcpy(&achieved[index], from.data() + at + 8, 8);
        }
      }
      for (size_t i : bw.matrices) {
        const double short_by = rate_target[i] - achieved[i];
        if (short_by > opt.rate.tolerance)
          rate_unspent += short_by * static_cast<double>(experts[i].numel());
      }
    }

    if (run) {
      // The block's output for every kept token, from its expert's owner: the compressed expert
      // (sequential) or the original.
      const auto t0 = Clock::now();
      const double c0 = process_cpu();
      const SwitchConfig& c = src.config();
      auto compute = [&](int64_t e, RowMatrix& out) {
        const ExpertMatrix* wi = nullptr;
        const ExpertMatrix* wo = nullptr;
        for (size_t i : bw.matrices)
          if (experts[i].expert == e) (experts[i].which == "wi" ? wi : wo) = &experts[i];
        if (!wi || !wo)
          throw InvalidArgument("compress: " + key + " expert " + std::to_string(e) +
                                " is not among the matrices to compress");
        std::shared_ptr<const ExpertMlp> mlp;
        if (opt.sequential) {
          StoredMatrix a = store.load(*wi), b = store.load(*wo);
          auto owner =
              std::make_shared<std::pair<std::shared_ptr<const void>, std::shared_ptr<const void>>>(
                  std::move(a.owner), std::move(b.owner));
          mlp = std::make_shared<CompressedExpert>(a.view, b.view, owner);
        } else {
          Linear li, lo;
          li.t = src.dense(wi->name, {c.d_ff, c.d_model});
          li.out = c.d_ff, li.in = c.d_model;
          lo.t = src.dense(wo->name, {c.d_model, c.d_ff});
          lo.out = c.d_model, lo.in = c.d_ff;
          mlp = std::make_shared<DenseExpert>(std::move(li), std::move(lo));
        }
        thread_local std::vector<float> buf;
        const int64_t n = tokens.rows(e);
        const float* xp = tokens.all(e, buf);
        out.resize(n, c.d_model);
        mlp->forward(xp, n, nullptr, out.data());
        rep.outputs.flops += 4.0 * static_cast<double>(n) * static_cast<double>(c.d_model) *
                             static_cast<double>(c.d_ff);
      };
      // The expert inputs are gathered (copied) by now: the FF input's memory takes the outputs.
      RowMatrix y = run->take_ff_input();
      std::exception_ptr err;
      rep.bytes_sent += tokens.bytes_sent();
      for (const auto& toks : run->routing().tokens_of)
        rep.routed_tokens += static_cast<int64_t>(toks.size());
      try {
        rep.bytes_sent += outputs_to_tokens(*run, tokens, part, bi, comm, compute, round_bytes, y);
      } catch (const PeerFailed&) {
        throw;
      } catch (...) {
        err = std::current_exception();
      }
      tokens.release();
      agree(comm, err, key);
      run->end_block_outputs(y);
      rep.outputs.seconds += since(t0);
      rep.outputs.cpu_seconds += process_cpu() - c0;
      rep.forward_tokens += (bw.stack == Stack::kEncoder ? enc_seqs : dec_seqs).num_tokens();
      shell->release_block(bw.stack, bw.block);
    }
    tick("experts", key);
  }
  rep.peak_in_flight = pool.peak();
  rep.seconds = since(t_start);
  rep.peak_rss = peak_resident_bytes();
  return rep;
}

}  // namespace qmoe::sw
