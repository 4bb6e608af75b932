// The work directory under failures: a damaged work file is redone rather than trusted, a run that
// fails leaves nothing beside the output unless it finished work it names for --resume, and two
// runs never share one work directory.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>

#include "pipeline_test_util.h"
#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"

namespace qmoe::test {
namespace {

sw::GenerateOptions small_model() {
  sw::GenerateOptions o = sw::generate_preset("tiny");
  o.vocab_size = 300;
  o.num_experts = 4;
  return o;
}

// Overwrites `n` bytes of tensor `name` of a safetensors file at byte `at` of its data.
void patch_tensor(const fs::path& file, const std::string& name, int64_t at, const void* bytes,
                  size_t n) {
  int64_t offset = 0;
  {
    const SafetensorsFile f = SafetensorsFile::open(file);
    const TensorInfo* t = f.find(name);
    ASSERT_NE(t, nullptr) << name;
    // The data section starts after the 8-byte length and the header.
    std::string head = read_file(file).substr(0, 8);
    uint64_t hlen = 0;
    std::memcpy(&hlen, head.data(), 8);
    offset = 8 + static_cast<int64_t>(hlen) + t->begin + at;
  }
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(offset);
  f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(n));
}

// Stops a run (from its progress callback) once `after` matrices are finished.
struct Stop {};

TEST(WorkDir, DamagedWorkFilesAreRedoneNotTrusted) {
  TempDir t("damaged");
  sw::generate_checkpoint(t / "ckpt", small_model());
  sw::CompressOptions ref;
  ref.threads = 1;
  sw::compress_checkpoint(t / "ckpt", t / "ref.safetensors", ref);
  const auto want = container_bytes(t / "ref.safetensors");

  const fs::path out = t / "out.safetensors";
  sw::CompressOptions opt;
  opt.threads = 1;
  opt.progress = [](const sw::CompressProgress& p) {
    if (p.done - p.resumed >= 6) throw Stop{};
  };
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, opt), Stop);
  const fs::path work = sw::work_dir_for(out);
  ASSERT_TRUE(fs::exists(work / "m0000001.safetensors"));
  int64_t finished = 0;
  for (const auto& e : fs::directory_iterator(work))
    finished += e.path().extension() == ".safetensors" ? 1 : 0;
  // One bit of a level (always a valid level) and one byte of the statistics' metadata.
  const uint8_t flip = 0x01;
  patch_tensor(work / "m0000000.safetensors", "levels", 1, &flip, 1);
  {
    std::string s = read_file(work / "m0000001.safetensors");
    const auto at = s.find("\"zero_fraction\":\"0.");
    ASSERT_NE(at, std::string::npos);
    s[at + 19] = s[at + 19] == '9' ? '8' : '9';
    write_file(work / "m0000001.safetensors", s);
  }
  std::vector<std::string> notes;
  sw::CompressOptions again;
  again.threads = 1;
  again.resume = true;
  again.note = [&](const std::string& n) { notes.push_back(n); };
  const sw::CompressSummary s = sw::compress_checkpoint(t / "ckpt", out, again);
  EXPECT_EQ(diff(container_bytes(out), want), "");
  EXPECT_EQ(s.resumed_matrices, finished - 2);  // the two damaged files were redone
  int damaged = 0;
  for (const auto& n : notes) damaged += n.find("damaged") != std::string::npos ? 1 : 0;
  EXPECT_EQ(damaged, 2);
}

TEST(WorkDir, FailedRunLeavesNothingUnlessItFinishedWork) {
  TempDir t("failed");
  sw::generate_checkpoint(t / "ckpt", small_model());
  // A NaN in the first expert matrix of the processing order: nothing is finished before it.
  const fs::path model = t / "ckpt" / "model.safetensors";
  const float nan = std::numeric_limits<float>::quiet_NaN();
  patch_tensor(model, "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight", 0, &nan, 4);
  const fs::path out = t / "out.safetensors";
  sw::CompressOptions opt;
  opt.threads = 1;
  try {
    sw::compress_checkpoint(t / "ckpt", out, opt);
    FAIL() << "a NaN weight was accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("expert_0.wi.weight"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(sw::work_dir_for(out)));
  for (const auto& e : fs::directory_iterator(t.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();

  // A NaN in the last matrix: the finished ones stay, and the error says where.
  patch_tensor(model, "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight", 0,
               std::array<float, 1>{0.0f}.data(), 4);
  patch_tensor(model, "decoder.block.3.layer.2.mlp.experts.expert_3.wo.weight", 0, &nan, 4);
  try {
    sw::compress_checkpoint(t / "ckpt", out, opt);
    FAIL() << "a NaN weight was accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(sw::work_dir_for(out).string() + " for --resume"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(fs::exists(sw::work_dir_for(out) / "run.json"));
}

TEST(WorkDir, TwoRunsNeverShareAWorkDirectory) {
  TempDir t("lock");
  sw::generate_checkpoint(t / "ckpt", small_model());
  const fs::path out = t / "out.safetensors";
  std::mutex mu;
  std::condition_variable cv;
  bool first_running = false, second_done = false;
  std::thread first([&] {
    sw::CompressOptions opt;
    opt.threads = 1;
    opt.progress = [&](const sw::CompressProgress&) {
      std::unique_lock lk(mu);
      first_running = true;
      cv.notify_all();
      cv.wait(lk, [&] { return second_done; });
    };
    sw::compress_checkpoint(t / "ckpt", out, opt);
  });
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return first_running; });
  }
  for (const bool resume : {false, true}) {
    sw::CompressOptions opt;
    opt.resume = resume;
    try {
      sw::compress_checkpoint(t / "ckpt", out, opt);
      ADD_FAILURE() << "a second run shared the work directory";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("is in use by qmoe compress, pid"), std::string::npos)
          << e.what();
    }
  }
  {
    std::lock_guard lk(mu);
    second_done = true;
  }
  cv.notify_all();
  first.join();
  EXPECT_TRUE(fs::exists(out));
  EXPECT_FALSE(fs::exists(sw::work_dir_for(out)));
}

}  // namespace
}  // namespace qmoe::test
