// `qmoe compress --max-memory`: on a checkpoint several times larger than the cap, the peak
// resident memory of the process (ru_maxrss, i.e. VmHWM, mapped file pages included) stays under
// it, and the bytes are those of a run without a cap.
#include <gtest/gtest.h>

#include "pipeline_test_util.h"
#include "qmoe/switch/generate.h"

namespace qmoe::test {
namespace {

TEST(PipelineMemory, PeakStaysUnderTheCap) {
  TempDir t("memory");
  sw::GenerateOptions o = sw::generate_preset("small");  // d_model 512, d_ff 2048
  o.num_layers = o.num_decoder_layers = 4;
  o.num_experts = 16;
  const auto g = sw::generate_checkpoint(t / "ckpt", o);
  const int64_t cap = int64_t{64} << 20;
  ASSERT_GT(g.total_bytes, 8 * cap) << "the checkpoint must be several times larger than the cap";
  // The capped runs come first: a child's ru_maxrss starts from the parent's resident size at
  // fork, so this process must still be small when it spawns them.
  for (const char* threads : {"1", "4"}) {
    const auto r = run_cli({"compress", (t / "ckpt").string(), "-o",
                            (t / ("out" + std::string(threads))).string(), "--shard-size", "32M",
                            "--max-memory", "64MiB", "--threads", threads});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("peak resident memory"), std::string::npos) << r.output;
    std::printf("threads %s: checkpoint %lld bytes, cap %lld, peak resident %lld bytes, %.2f s\n",
                threads, static_cast<long long>(g.total_bytes), static_cast<long long>(cap),
                static_cast<long long>(r.max_rss), r.seconds);
    EXPECT_LE(r.max_rss, cap) << r.output;
  }
  const auto free_run = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "free").string(),
                                 "--shard-size", "32M", "--threads", "2"});
  ASSERT_EQ(free_run.exit_code, 0) << free_run.output;
  const auto want = container_bytes(t / "free");
  for (const char* threads : {"1", "4"})
    EXPECT_EQ(diff(container_bytes(t / ("out" + std::string(threads))), want), "")
        << "the cap and the thread count must not change the bytes (threads " << threads << ")";
}

}  // namespace
}  // namespace qmoe::test
