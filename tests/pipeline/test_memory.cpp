// `qmoe compress --max-memory`: on a checkpoint several times larger than the cap, the peak
// resident memory of the process (ru_maxrss, i.e. VmHWM, mapped file pages included) stays under it.
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
  for (const char* threads : {"1", "4"}) {
    const auto r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out").string(), "--shard-size", "32M",
                            "--max-memory", "64MiB", "--threads", threads});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("peak resident memory"), std::string::npos) << r.output;
    std::printf("threads %s: checkpoint %lld bytes, cap %lld, peak resident %lld bytes, %.2f s\n", threads,
                static_cast<long long>(g.total_bytes), static_cast<long long>(cap), static_cast<long long>(r.max_rss),
                r.seconds);
    EXPECT_LE(r.max_rss, cap) << r.output;
  }
}

}  // namespace
}  // namespace qmoe::test
