// The block loop split across processes gives the bytes of one process: R ranks simulated by R
// threads of this process, each calling compress_checkpoint() with a sw::Comm over shared memory
// (the MPI one is tested by tests/mpi with mpirun; this one also runs under the sanitizers).
// Calibrated GPTQ, Hessians from a file, round to nearest; uneven splits (3 ranks over 4 experts
// and 48 pairs); a rank that fails stops them all, its error reported by it alone.
#include <gtest/gtest.h>

#include <barrier>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <thread>

#include "pipeline_test_util.h"
#include "qmoe/format/error.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/comm.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"

namespace qmoe::test {
namespace {

// Ranks as threads: every collective is a rendezvous on a barrier.
class Shared {
 public:
  explicit Shared(int n)
      : n_(n), bar_(n), mail_(static_cast<size_t>(n * n)), gather_(static_cast<size_t>(n)) {}
  int size() const { return n_; }
  std::vector<std::vector<std::byte>> exchange(int me, std::vector<std::vector<std::byte>> send) {
    for (int r = 0; r < n_; ++r)
      mail_[static_cast<size_t>(r * n_ + me)] = std::move(send[static_cast<size_t>(r)]);
    bar_.arrive_and_wait();
    std::vector<std::vector<std::byte>> recv(static_cast<size_t>(n_));
    for (int r = 0; r < n_; ++r)
      recv[static_cast<size_t>(r)] = std::move(mail_[static_cast<size_t>(me * n_ + r)]);
    bar_.arrive_and_wait();
    return recv;
  }
  std::vector<std::string> allgather(int me, const std::string& v) {
    gather_[static_cast<size_t>(me)] = v;
    bar_.arrive_and_wait();
    std::vector<std::string> out = gather_;
    bar_.arrive_and_wait();
    return out;
  }

 private:
  int n_;
  std::barrier<> bar_;
  std::vector<std::vector<std::byte>> mail_;  // [to * n + from]
  std::vector<std::string> gather_;
};

class ThreadComm final : public sw::Comm {
 public:
  ThreadComm(std::shared_ptr<Shared> s, int rank) : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return s_->size(); }
  std::string describe() const override { return std::to_string(size()) + " threads"; }
  std::vector<std::vector<std::byte>> exchange(std::vector<std::vector<std::byte>> send) override {
    return s_->exchange(rank_, std::move(send));
  }
  std::vector<std::string> allgather(const std::string& v) override {
    return s_->allgather(rank_, v);
  }

 private:
  std::shared_ptr<Shared> s_;
  int rank_;
};

// Runs compress_checkpoint on `ranks` threads; returns each rank's error message ("" when none).
std::vector<std::string> run_ranks(int ranks, const fs::path& ckpt, const fs::path& out,
                                   const std::function<void(sw::CompressOptions&)>& set) {
  auto shared = std::make_shared<Shared>(ranks);
  std::vector<std::string> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      sw::CompressOptions opt;
      opt.threads = 1;
      opt.comm = std::make_shared<ThreadComm>(shared, r);
      set(opt);
      try {
        sw::compress_checkpoint(ckpt, out, opt);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

// Edits float32 tensor `name` (rows x cols, row-major) of a single-file checkpoint in place.
void edit_f32(const fs::path& ckpt, const std::string& name,
              const std::function<void(float*, int64_t, int64_t)>& edit) {
  const fs::path p = ckpt / "model.safetensors";
  std::string bytes = read_file(p);
  int64_t at = 0, rows = 0, cols = 0;
  {
    const SafetensorsFile f = SafetensorsFile::open(p);
    const TensorInfo* ti = f.find(name);
    ASSERT_NE(ti, nullptr) << name;
    ASSERT_EQ(ti->dtype, DType::kF32) << name;
    ASSERT_EQ(ti->shape.size(), 2u) << name;
    uint64_t hlen = 0;
    std::memcpy(&hlen, bytes.data(), 8);
    at = 8 + static_cast<int64_t>(hlen) + ti->begin;
    rows = ti->shape[0];
    cols = ti->shape[1];
  }
  std::vector<float> w(static_cast<size_t>(rows * cols));
  std::memcpy(w.data(), bytes.data() + at, w.size() * sizeof(float));
  edit(w.data(), rows, cols);
  std::memcpy(bytes.data() + at, w.data(), w.size() * sizeof(float));
  write_file(p, bytes);
}

sw::GenerateOptions model() {
  sw::GenerateOptions o = sw::generate_preset("tiny");
  o.vocab_size = 300;
  o.num_experts = 4;
  return o;
}

TEST(Ranks, SameBytesForAnyNumberOfRanks) {
  TempDir t("ranks");
  sw::generate_checkpoint(t / "ckpt", model());
  sw::GenerateTokensOptions to;
  to.vocab_size = 300;
  to.pairs = 48;
  to.encoder_length = 40;
  to.decoder_length = 12;
  sw::generate_tokens(to).save(t / "calib.safetensors");
  // Hessians from a file too (expert 3 saw nothing: rounded to nearest).
  {
    const auto src = sw::SwitchSource::open(t / "ckpt");
    std::map<std::string, HessianAccumulator> acc;
    std::mt19937_64 rng(3);
    std::normal_distribution<float> nd;
    for (const auto& n : src->names()) {
      if (n.find(".mlp.experts.") == std::string::npos) continue;
      const int64_t d = src->dense(n).shape[1];
      const int64_t tokens = n.find("expert_3") != std::string::npos ? 0 : 3 * d;
      std::vector<float> x(static_cast<size_t>(tokens * d));
      for (float& v : x) v = nd(rng);
      HessianAccumulator a(d);
      if (tokens) a.add(x.data(), tokens);
      acc.emplace(n.substr(0, n.size() - 7), std::move(a));
    }
    write_hessians(t / "h.safetensors", acc);
  }
  const std::vector<std::pair<std::string, std::function<void(sw::CompressOptions&)>>> modes = {
      {"calibration", [&](sw::CompressOptions& o) { o.calib_tokens = t / "calib.safetensors"; }},
      {"calibration, one pass",
       [&](sw::CompressOptions& o) {
         o.calib_tokens = t / "calib.safetensors";
         o.sequential = false;
       }},
      {"hessian file", [&](sw::CompressOptions&) {}},  // provider set below
      {"round to nearest", [](sw::CompressOptions&) {}},
  };
  for (const auto& [name, set] : modes) {
    SCOPED_TRACE(name);
    std::unique_ptr<sw::HessianProvider> prov;
    auto with = [&](sw::CompressOptions& o) {
      set(o);
      if (name == "hessian file") {
        // One provider per rank: open_hessian_file() maps the file; each rank reads its own.
        static thread_local std::unique_ptr<sw::HessianProvider> p;
        p = sw::open_hessian_file(t / "h.safetensors");
        o.hessians = p.get();
      }
    };
    const fs::path ref = t / ("ref_" + std::to_string(name.size()) + ".safetensors");
    ASSERT_EQ(run_ranks(1, t / "ckpt", ref, with), std::vector<std::string>{""});
    for (int ranks : {2, 3}) {
      SCOPED_TRACE(std::to_string(ranks) + " ranks");
      const fs::path out = t / ("out_" + std::to_string(ranks) + ".safetensors");
      const auto errors = run_ranks(ranks, t / "ckpt", out, with);
      for (const auto& e : errors) EXPECT_EQ(e, "");
      EXPECT_EQ(diff(container_bytes(ref), container_bytes(out)), "");
      fs::remove(out);
    }
  }
}

TEST(Ranks, AFailingRankStopsThemAll) {
  TempDir t("ranks_fail");
  sw::generate_checkpoint(t / "ckpt", model());
  // A NaN in expert 1 of encoder block 1 (block index 1): owned by rank (1 + 1) mod 3 = 2.
  edit_f32(t / "ckpt", "encoder.block.1.layer.1.mlp.experts.expert_1.wi.weight",
           [](float* w, int64_t, int64_t) { w[0] = std::numeric_limits<float>::quiet_NaN(); });
  const auto errors = run_ranks(3, t / "ckpt", t / "out.safetensors", [](sw::CompressOptions&) {});
  EXPECT_NE(errors[2].find("non-finite"), std::string::npos) << errors[2];
  for (int r : {0, 1})
    EXPECT_NE(
        errors[static_cast<size_t>(r)].find("stopped: process 2 of 3 failed in encoder.block.1"),
        std::string::npos)
        << errors[static_cast<size_t>(r)];
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
  // The lead (rank 0) kept the work directory only if it holds finished matrices, and said so.
  const bool kept = fs::exists(sw::work_dir_for(t / "out.safetensors"));
  EXPECT_EQ(kept, errors[0].find("for --resume") != std::string::npos) << errors[0];
}

// Rate control over all the experts (scope "all") where a matrix of the loop's first block cannot
// reach its share: every row of expert 0's wi in encoder block 1 holds +1e6 and -1e6, so that
// round to nearest (levels at the row's min and max) leaves those two alone at any threshold the
// search tries, and the matrix stays at about 1.5 bits per weight where its share is about 2.2.
// The later blocks' targets rise by what it does not spend, so the mean lands on the target, with
// the same bytes for any number of ranks and threads.
TEST(Ranks, RateScopeAllSpendsWhatAMatrixCannot) {
  TempDir t("ranks_rate");
  sw::generate_checkpoint(t / "ckpt", model());
  edit_f32(t / "ckpt", "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight",
           [](float* w, int64_t rows, int64_t cols) {
             for (int64_t r = 0; r < rows; ++r) {
               w[r * cols] = 1e6f;
               w[r * cols + 1] = -1e6f;
             }
           });
  const double target = 1.8;
  auto with = [&](int threads) {
    return [=](sw::CompressOptions& o) {
      o.threads = threads;
      o.codec = Codec::kV2;
      o.rate.target_bits = target;
      o.rate.scope = RateScope::kAll;
    };
  };
  const fs::path ref = t / "ref.safetensors";
  ASSERT_EQ(run_ranks(1, t / "ckpt", ref, with(1)), std::vector<std::string>{""});
  const Container c = Container::open(ref);
  double bits = 0, weights = 0;
  std::map<std::string, double> size;  // bits per weight by tensor name
  for (const auto& e : c.compressed()) {
    const double n = static_cast<double>(e.view.rows) * static_cast<double>(e.view.cols);
    bits += e.view.bits_per_weight() * n;
    weights += n;
    size[e.name] = e.view.bits_per_weight();
  }
  auto wi = [&](const std::string& block, int expert) {
    const std::string name = block + ".mlp.experts.expert_" + std::to_string(expert) + ".wi.weight";
    EXPECT_EQ(size.count(name), 1u) << name;
    return size[name];
  };
  // The edited matrix stayed far below the other wi matrices of its block (their share), and the wi
  // matrices of the blocks after it took more than that share.
  EXPECT_LT(wi("encoder.block.1.layer.1", 0), wi("encoder.block.1.layer.1", 1) - 0.5);
  EXPECT_GT(wi("encoder.block.3.layer.1", 1), wi("encoder.block.1.layer.1", 1) + 0.01);
  EXPECT_GT(wi("decoder.block.3.layer.2", 1), wi("encoder.block.1.layer.1", 1) + 0.01);
  // Without the raise, the mean would be short by about 0.02 here.
  EXPECT_NEAR(bits / weights, target, 2 * sw::CompressOptions{}.rate.tolerance);
  for (int ranks : {2, 3}) {
    SCOPED_TRACE(std::to_string(ranks) + " ranks");
    const fs::path out = t / ("out_" + std::to_string(ranks) + ".safetensors");
    const auto errors = run_ranks(ranks, t / "ckpt", out, with(ranks == 2 ? 2 : 1));
    for (const auto& e : errors) EXPECT_EQ(e, "");
    EXPECT_EQ(diff(container_bytes(ref), container_bytes(out)), "");
  }
  // Stopped after the first blocks and resumed: the sizes of the stored matrices give the same
  // raise, so the same bytes.
  struct Stop {};
  sw::CompressOptions stop;
  with(2)(stop);
  stop.progress = [](const sw::CompressProgress& p) {
    if (p.phase == "compress" && p.done >= 12) throw Stop{};
  };
  const fs::path out = t / "resumed.safetensors";
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, stop), Stop);
  ASSERT_TRUE(fs::exists(sw::work_dir_for(out)));
  sw::CompressOptions again;
  with(1)(again);
  again.resume = true;
  const sw::CompressSummary r = sw::compress_checkpoint(t / "ckpt", out, again);
  EXPECT_GE(r.loop.resumed, 8);
  EXPECT_EQ(diff(container_bytes(ref), container_bytes(out)), "");
}

}  // namespace
}  // namespace qmoe::test
