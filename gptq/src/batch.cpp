// Many matrices at once. The outer level is plain std::threads, each running gptq_quantize()
// with its own OpenMP team for the inner level, so no nested OpenMP settings are needed. A
// matrix starts only when its workspace fits under the memory limit beside those in flight.
#include <algorithm>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

#include <omp.h>

#include "qmoe/gptq/gptq.h"

namespace qmoe {

std::vector<GptqResult> gptq_quantize_batch(std::span<const GptqProblem> problems,
                                            const GptqOptions& opt, const GptqBatchOptions& batch) {
  const int64_t count = static_cast<int64_t>(problems.size());
  std::vector<GptqResult> results(problems.size());
  if (count == 0) return results;
  const int threads = batch.threads > 0 ? batch.threads : omp_get_max_threads();
  int inner = batch.threads_per_matrix;
  if (inner <= 0) inner = count >= threads ? 1 : static_cast<int>(threads / count);
  inner = std::clamp(inner, 1, threads);
  const int outer = static_cast<int>(std::min<int64_t>(std::max(1, threads / inner), count));

  GptqOptions one = opt;
  one.threads = inner;
  std::vector<int64_t> need(problems.size(), 0);
  for (int64_t i = 0; i < count; ++i) {
    const auto& p = problems[i];
    need[i] = p.rows >= 0 && p.cols >= 0 ? gptq_workspace_bytes(p.rows, p.cols, one, inner) : 0;
  }

  std::mutex mu;
  std::condition_variable cv;
  int64_t next = 0;    // next problem to start (problems start in order)
  int64_t in_use = 0;  // workspace bytes of the matrices in flight
  int64_t in_flight = 0;
  auto worker = [&] {
    for (;;) {
      int64_t i;
      {
        std::unique_lock lock(mu);
        if (next >= count) return;
        i = next++;
        // Wait until it fits; a matrix too large for the limit waits until it runs alone.
        cv.wait(lock, [&] {
          return batch.memory_limit_bytes <= 0 || in_flight == 0 ||
                 in_use + need[i] <= batch.memory_limit_bytes;
        });
        in_use += need[i];
        ++in_flight;
      }
      const auto& p = problems[i];
      try {
        results[i] = gptq_quantize(p.w, p.rows, p.cols, p.h, one);
      } catch (const std::exception& e) {
        results[i] = GptqResult{};
        results[i].status = GptqStatus::kFailed;
        results[i].reason = e.what();
      }
      {
        std::lock_guard lock(mu);
        in_use -= need[i];
        --in_flight;
      }
      cv.notify_all();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(outer - 1));
  for (int t = 1; t < outer; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return results;
}

}  // namespace qmoe
