// Calibrated compression against committed fingerprints: a generated checkpoint, calibration token
// pairs drawn from a fixed-seed mt19937 stream (its raw output is specified by the C++ standard),
// GPTQ with Hessians from the sequential calibration, compressed with 1, 2 and 3 threads. The
// container's size and XXH3-64 must equal those in tests/pipeline/golden/calibrated.json (which
// also holds the hash of every tensor and metadata value, so that a mismatch names what changed):
// a change that alters what the pipeline computes shows here. After a deliberate change of the
// numbers, rewrite the file with QMOE_WRITE_GOLDEN=1 and say why in the commit.
#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstdlib>
#include <random>

#include <nlohmann/json.hpp>

#include "pipeline_test_util.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"
#include "qmoe/switch/tokens.h"

namespace qmoe::test {
namespace {

using nlohmann::json;

const fs::path kGolden = fs::path(QMOE_SOURCE_DIR) / "tests/pipeline/golden/calibrated.json";

sw::GenerateOptions golden_model() {
  sw::GenerateOptions o = sw::generate_preset("tiny");  // d_model 64, d_ff 256, 4 + 4 blocks
  o.vocab_size = 300;
  o.num_experts = 4;
  return o;
}

// 48 pairs of 40 encoder + 12 decoder tokens; every tenth target ignored (-100).
sw::TokenPairs golden_tokens(int64_t vocab) {
  std::mt19937 rng(20261207);
  sw::TokenPairs p;
  for (int i = 0; i < 48; ++i) {
    std::vector<int32_t> enc(40), dec(12);
    for (auto& t : enc) t = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
    for (size_t j = 0; j < dec.size(); ++j)
      dec[j] =
          (i + j) % 10 == 9 ? -100 : static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
    p.add(enc, dec);
  }
  return p;
}

std::string hash(const void* p, size_t n) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(XXH3_64bits(p, n)));
  return buf;
}

json fingerprint(const fs::path& file) {
  const std::string bytes = read_file(file);
  json j = {{"bytes", bytes.size()}, {"xxh3", hash(bytes.data(), bytes.size())}};
  const SafetensorsFile f = SafetensorsFile::open(file);
  for (const auto& t : f.tensors()) {
    const auto b = f.bytes(t);
    j["tensors"][t.name] = hash(b.data(), b.size());
  }
  for (const auto& [k, v] : f.metadata()) j["metadata"][k] = hash(v.data(), v.size());
  return j;
}

// How many tensors and metadata values differ (or exist on one side only), and the first few.
std::string differences(const json& want, const json& got) {
  std::vector<std::string> d;
  for (const char* part : {"tensors", "metadata"}) {
    for (const auto& [k, v] : want[part].items())
      if (!got[part].contains(k) || got[part][k] != v) d.push_back(std::string(part) + " " + k);
    for (const auto& [k, v] : got[part].items())
      if (!want[part].contains(k)) d.push_back(std::string(part) + " " + k + " (new)");
  }
  std::string r = std::to_string(d.size()) + " entries:";
  for (size_t i = 0; i < d.size() && i < 6; ++i) r += " " + d[i] + ";";
  return r + (d.size() > 6 ? " ..." : "");
}

TEST(Golden, CalibratedGptqContainerIsByteIdenticalForAnyThreadCount) {
  TempDir tmp("golden");
  const fs::path ckpt = tmp / "ckpt", tokens = tmp / "tokens.safetensors";
  sw::generate_checkpoint(ckpt, golden_model());
  golden_tokens(golden_model().vocab_size).save(tokens);
  bool write = std::getenv("QMOE_WRITE_GOLDEN") != nullptr;
  // Threads 1, 2, 3; then 2 threads under a memory cap so small that every block keeps its routed
  // expert inputs in a scratch file and runs one matrix at a time.
  for (const auto& [threads, max_memory] : {std::pair{1, int64_t{0}}, std::pair{2, int64_t{0}},
                                            std::pair{3, int64_t{0}}, std::pair{2, int64_t{1}}}) {
    SCOPED_TRACE("threads " + std::to_string(threads) + " max_memory " +
                 std::to_string(max_memory));
    const fs::path out =
        tmp / ("out" + std::to_string(threads) + "_" + std::to_string(max_memory) + ".safetensors");
    sw::CompressOptions opt;
    opt.threads = threads;
    opt.max_memory = max_memory;
    opt.calib_tokens = tokens;
    const sw::CompressSummary s = sw::compress_checkpoint(ckpt, out, opt);
    EXPECT_EQ(s.quantizer, "gptq");
    EXPECT_EQ(s.fallback_matrices, 0);  // every expert saw calibration tokens
    EXPECT_EQ(s.loop.spilled_blocks, max_memory > 0 ? 4 : 0);
    const json got = fingerprint(out);
    if (write) {
      write_file(kGolden, got.dump(1) + "\n");
      write = false;
      continue;
    }
    ASSERT_TRUE(fs::exists(kGolden)) << kGolden;
    const json want = json::parse(read_file(kGolden));
    EXPECT_EQ(got["xxh3"], want["xxh3"]) << "differs in: " << differences(want, got);
    EXPECT_EQ(got["bytes"], want["bytes"]);
  }
}

}  // namespace
}  // namespace qmoe::test
