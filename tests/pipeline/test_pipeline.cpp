// `qmoe compress` end to end: synth -> compress -> verify -> inspect -> decode -> compare with
// the ternarized originals; passthrough bytes; determinism across threads and memory caps; resume
// after SIGKILL at random points; every bad input; Hessians (GPTQ).
#include <gtest/gtest.h>
#include <sys/statvfs.h>

#include <cstring>
#include <functional>
#include <random>
#include <regex>

#include <nlohmann/json.hpp>

#include "pipeline_test_util.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/gptq/gptq.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/checkpoint.h"
#include "qmoe/switch/compress.h"
#include "qmoe/switch/generate.h"

namespace qmoe::test {
namespace {

using nlohmann::json;

sw::GenerateOptions tiny(DType dt = DType::kF32) {
  sw::GenerateOptions o = sw::generate_preset("tiny");
  o.vocab_size = 300;
  o.num_experts = 4;
  o.dtype = dt;
  return o;
}

// Every expert of `out` decodes to exactly the round-to-nearest ternarization of the checkpoint's
// tensor, and every other tensor is byte-identical to the checkpoint's.
void expect_faithful(const fs::path& ckpt, const fs::path& out) {
  const Container c = Container::open(out, {.verify_checksums = true});
  EXPECT_TRUE(c.mismatched_checksums().empty());
  const auto src = sw::SwitchSource::open(ckpt);
  // The stored tensors of the checkpoint (aliases resolved by storing only real tensors).
  std::map<std::string, std::pair<SafetensorsFile, const TensorInfo*>> stored;
  std::vector<SafetensorsFile> files;
  for (const auto& e : fs::directory_iterator(ckpt))
    if (e.path().extension() == ".safetensors") files.push_back(SafetensorsFile::open(e.path()));
  for (const auto& f : files)
    for (const auto& t : f.tensors()) stored.emplace(t.name, std::make_pair(f, &t));
  int64_t experts = 0, dense = 0;
  for (const auto& [name, ft] : stored) {
    const auto& [file, info] = ft;
    if (name.find(".mlp.experts.") != std::string::npos) {
      const CompressedEntry* e = c.find_compressed(name);
      ASSERT_NE(e, nullptr) << name;
      EXPECT_EQ(e->original_shape, info->shape) << name;
      EXPECT_EQ(e->original_dtype, info->dtype) << name;
      const TernaryMatrix want =
          ternarize_rtn(file.bytes(*info).data(), info->dtype, info->shape[0], info->shape[1]);
      std::vector<uint8_t> sym(want.symbols.size());
      decode_symbols_ref(e->view, sym.data());
      EXPECT_EQ(sym, want.symbols) << name;
      EXPECT_TRUE(std::equal(want.levels.begin(), want.levels.end(), e->view.levels.begin()))
          << name;
      std::vector<float> dense_out(sym.size());
      decode_ref(e->view, dense_out.data());
      EXPECT_EQ(dense_out, want.to_dense()) << name;
      ++experts;
    } else {
      const DenseEntry* d = c.find_dense(name);
      ASSERT_NE(d, nullptr) << name;
      EXPECT_EQ(d->dtype, info->dtype) << name;
      EXPECT_EQ(d->shape, info->shape) << name;
      const auto want = file.bytes(*info);
      ASSERT_EQ(d->bytes.size(), want.size()) << name;
      EXPECT_EQ(std::memcmp(d->bytes.data(), want.data(), want.size()), 0) << name;
      ++dense;
    }
  }
  EXPECT_EQ(static_cast<size_t>(experts), c.compressed().size());
  EXPECT_GT(experts, 0);
  EXPECT_GT(dense, 0);
  // The container is itself a model the Switch reader understands, with the same layout.
  const auto back = sw::SwitchSource::open(out);
  EXPECT_EQ(back->layout().num_experts, src->layout().num_experts);
  EXPECT_EQ(back->layout().encoder.sparse, src->layout().encoder.sparse);
  EXPECT_EQ(back->layout().decoder.sparse, src->layout().decoder.sparse);
  EXPECT_EQ(c.metadata().at("config.json"), read_file(ckpt / "config.json"));
}

TEST(Pipeline, EndToEndSingleFileF32) {
  TempDir t("e2e");
  const auto g = sw::generate_checkpoint(t / "ckpt", tiny());
  EXPECT_EQ(g.expert_matrices, 2 * 2 * 2 * 4);  // 2 stacks x 2 sparse blocks x 4 experts x {wi, wo}
  sw::CompressOptions opt;
  opt.threads = 2;
  const auto s = sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
  EXPECT_EQ(s.quantizer, "rtn");
  EXPECT_EQ(s.expert_matrices, g.expert_matrices);
  EXPECT_EQ(s.input_bytes, g.total_bytes);
  EXPECT_EQ(s.blocks.size(), 4u);
  EXPECT_GT(s.mean_zero_fraction, 0.7);
  expect_faithful(t / "ckpt", t / "out.safetensors");
  const Container c = Container::open(t / "out.safetensors");
  EXPECT_EQ(c.metadata().at("quantizer"), "rtn");
  EXPECT_EQ(c.metadata().at("source.bytes"), std::to_string(g.total_bytes));
  EXPECT_TRUE(c.metadata().count("compress.stats.encoder.block.1"));
  EXPECT_FALSE(fs::exists(sw::work_dir_for(t / "out.safetensors")));
}

TEST(Pipeline, ShardedBf16AllSparseWithTiedAliases) {
  TempDir t("sharded");
  auto o = tiny(DType::kBF16);
  o.sparse_step = 1;
  o.shard_size = 300 << 10;
  o.misleading_config = true;
  sw::generate_checkpoint(t / "ckpt", o);
  const json idx = json::parse(read_file(t / "ckpt" / "model.safetensors.index.json"));
  ASSERT_TRUE(
      idx["weight_map"].contains("lm_head.weight"));  // alias entries as the conversion bot writes
  sw::CompressOptions opt;
  opt.shard_size = 200 << 10;
  const auto s = sw::compress_checkpoint(t / "ckpt", t / "out", opt);
  EXPECT_EQ(s.expert_matrices, 2 * 4 * 4 * 2);  // every block sparse despite the config
  EXPECT_GT(s.files.size(), 2u);
  expect_faithful(t / "ckpt", t / "out");
  const Container c = Container::open(t / "out");
  EXPECT_EQ(c.find_dense("lm_head.weight"), nullptr);  // aliases are not duplicated
  EXPECT_NE(c.find_dense("shared.weight"), nullptr);
}

TEST(Pipeline, SameBytesForAnyThreadsAndMemoryCap) {
  TempDir t("determinism");
  sw::generate_checkpoint(t / "ckpt", tiny());
  sw::CompressOptions a;
  a.threads = 1;
  sw::compress_checkpoint(t / "ckpt", t / "a.safetensors", a);
  sw::CompressOptions b;
  b.threads = 3;
  b.max_memory = 1;  // far below anything: one matrix at a time
  const sw::CompressSummary sb = sw::compress_checkpoint(t / "ckpt", t / "b.safetensors", b);
  EXPECT_EQ(read_file(t / "a.safetensors"), read_file(t / "b.safetensors"));
  // The cap could not be kept: every block with work says so, with what it needed at the least
  // (more than what was resident at the end, which the largest matrix came on top of).
  EXPECT_EQ(sb.loop.over_cap_blocks, 4);
  EXPECT_GT(sb.loop.memory_needed, 1);
  EXPECT_GT(sb.loop.peak_rss, 0);
  EXPECT_EQ(sw::compress_checkpoint(t / "ckpt", t / "c.safetensors", a).loop.over_cap_blocks, 0);
}

// A progress callback that throws stops the run: the exception comes out of compress_checkpoint,
// nothing is under the output name, no temporary file is left, and a resumed run writes the same
// bytes as an uninterrupted one.
TEST(Pipeline, ProgressThatThrowsStopsTheRun) {
  TempDir t("stop");
  auto o = tiny();
  o.num_experts = 8;
  sw::generate_checkpoint(t / "ckpt", o);
  sw::CompressOptions ref;
  ref.threads = 2;
  sw::compress_checkpoint(t / "ckpt", t / "ref.safetensors", ref);
  const auto want = container_bytes(t / "ref.safetensors");
  for (const char* phase : {"compress", "assemble"}) {
    SCOPED_TRACE(phase);
    const fs::path out = t / (std::string(phase) + ".safetensors");
    struct Stop {};
    int calls = 0;
    sw::CompressOptions opt;
    opt.threads = 2;
    opt.progress = [&](const sw::CompressProgress& p) {
      if (p.phase != phase) return;
      ++calls;
      throw Stop{};
    };
    EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, opt), Stop);
    EXPECT_EQ(calls, 1);
    EXPECT_FALSE(fs::exists(out));
    for (const auto& e : fs::directory_iterator(t.path))
      EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
    sw::CompressOptions again;
    again.resume = true;
    sw::compress_checkpoint(t / "ckpt", out, again);
    EXPECT_EQ(diff(container_bytes(out), want), "");
    EXPECT_FALSE(fs::exists(sw::work_dir_for(out)));
  }
}

TEST(Pipeline, CastBf16AndForcedCodec) {
  TempDir t("cast");
  sw::generate_checkpoint(t / "ckpt", tiny());
  sw::CompressOptions opt;
  opt.cast_bf16 = true;
  opt.codec = Codec::kP5;
  sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
  const Container c = Container::open(t / "out.safetensors");
  for (const auto& e : c.compressed()) EXPECT_EQ(e.view.codec, Codec::kP5) << e.name;
  const auto src = SafetensorsFile::open(t / "ckpt" / "model.safetensors");
  for (const auto& d : c.dense()) {
    if (d.name.rfind("qmoe.", 0) == 0) continue;
    const TensorInfo* in = src.find(d.name);
    ASSERT_NE(in, nullptr) << d.name;
    EXPECT_EQ(d.dtype, DType::kBF16) << d.name;
    const auto inb = src.as<float>(*in, DType::kF32);
    uint16_t h;
    std::memcpy(&h, d.bytes.data(), 2);
    EXPECT_EQ(h, float_to_bf16(inb[0])) << d.name;
  }
}

// qmoe-v2 / qmoe-v3 through the pipeline: every expert matrix in the codec, each file holding the
// dictionaries its matrices use (counted once each in the summary's bytes); a run stopped after its
// matrices are done and resumed (the work files rebuild their dictionaries) writes the same bytes
// as an uninterrupted one.
void codec_stop_and_resume(Codec codec) {
  TempDir t(std::string(codec_name(codec)));
  auto o = tiny();
  o.num_experts = 8;
  sw::generate_checkpoint(t / "ckpt", o);
  sw::CompressOptions ref;
  ref.codec = codec;
  ref.threads = 2;
  const auto sum = sw::compress_checkpoint(t / "ckpt", t / "ref.safetensors", ref);
  EXPECT_EQ(sum.matrices_of(codec), sum.expert_matrices);
  const Container c = Container::open(t / "ref.safetensors", {.verify_checksums = true});
  std::set<uint64_t> ids;
  int64_t bytes = 0;
  for (const auto& e : c.compressed()) {
    EXPECT_EQ(e.view.codec, codec) << e.name;
    ids.insert(e.view.dictionary_id);
    bytes += e.view.compressed_bytes();
  }
  EXPECT_FALSE(ids.empty());
  EXPECT_EQ(sum.expert_compressed_bytes,
            bytes + static_cast<int64_t>(ids.size()) * v2::kTableBytes);
  const auto want = container_bytes(t / "ref.safetensors");

  struct Stop {};
  int calls = 0;
  sw::CompressOptions opt = ref;
  opt.progress = [&](const sw::CompressProgress& p) {
    if (p.phase == "assemble" && ++calls == 1) throw Stop{};  // every matrix is in a work file
  };
  const fs::path out = t / "out.safetensors";
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, opt), Stop);
  EXPECT_TRUE(fs::exists(sw::work_dir_for(out)));
  sw::CompressOptions again = ref;
  again.resume = true;
  const auto resumed = sw::compress_checkpoint(t / "ckpt", out, again);
  EXPECT_EQ(resumed.resumed_matrices, resumed.expert_matrices);
  EXPECT_EQ(diff(container_bytes(out), want), "");
}

TEST(Pipeline, QmoeV2StopAndResume) {
  codec_stop_and_resume(Codec::kV2);
}

TEST(Pipeline, QmoeV3StopAndResume) {
  codec_stop_and_resume(Codec::kV3);
}

// --target cpu through the pipeline: the automatic codec is qmoe-g4 (or qmoe-p5 where smaller;
// the tiny model has matrices of both kinds), the target is recorded in the container, and a run
// stopped after its matrices are done and resumed (the work files hold the qmoe-g4 streams) writes
// the same bytes as an uninterrupted one.
TEST(Pipeline, TargetCpuStopAndResume) {
  TempDir t("target-cpu");
  auto o = tiny();
  o.num_experts = 8;
  sw::generate_checkpoint(t / "ckpt", o);
  sw::CompressOptions ref;
  ref.target = Target::kCpu;
  ref.threads = 2;
  const auto sum = sw::compress_checkpoint(t / "ckpt", t / "ref.safetensors", ref);
  EXPECT_GT(sum.matrices_of(Codec::kG4), 0);
  EXPECT_EQ(sum.matrices_of(Codec::kG4) + sum.matrices_of(Codec::kP5), sum.expert_matrices);
  const Container c = Container::open(t / "ref.safetensors", {.verify_checksums = true});
  EXPECT_EQ(c.target(), Target::kCpu);
  int64_t g4 = 0;
  for (const auto& e : c.compressed()) g4 += e.view.codec == Codec::kG4;
  EXPECT_EQ(g4, sum.matrices_of(Codec::kG4));
  const auto want = container_bytes(t / "ref.safetensors");

  struct Stop {};
  int calls = 0;
  sw::CompressOptions opt = ref;
  opt.progress = [&](const sw::CompressProgress& p) {
    if (p.phase == "assemble" && ++calls == 1) throw Stop{};
  };
  const fs::path out = t / "out.safetensors";
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, opt), Stop);
  sw::CompressOptions again = ref;
  again.resume = true;
  const auto resumed = sw::compress_checkpoint(t / "ckpt", out, again);
  EXPECT_EQ(resumed.resumed_matrices, resumed.expert_matrices);
  EXPECT_EQ(diff(container_bytes(out), want), "");
  // A different target is a different run: resuming it from these work files is refused.
  std::filesystem::remove(out);
  calls = 0;
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, opt), Stop);
  sw::CompressOptions gpu = again;
  gpu.target = Target::kGpu;
  EXPECT_THROW(sw::compress_checkpoint(t / "ckpt", out, gpu), Error);
}

TEST(Pipeline, CliEndToEndInspectJson) {
  TempDir t("cli");
  auto r = run_cli(
      {"synth", (t / "ckpt").string(), "--preset", "tiny", "--experts", "4", "--vocab", "300"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The old name still works, and says it is going.
  r = run_cli({"generate", (t / "old").string(), "--preset", "tiny", "--experts", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("`qmoe generate` is now `qmoe synth`"), std::string::npos) << r.output;
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out.safetensors").string(),
               "--threads", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("round-to-nearest"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("peak resident memory"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("\r["), std::string::npos)
      << "no progress bar when stderr is not a terminal";
  r = run_cli({"verify", (t / "out.safetensors").string()});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = run_cli({"inspect", (t / "out.safetensors").string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = json::parse(r.output);
  EXPECT_EQ(j["quantizer"], "rtn");
  EXPECT_EQ(j["blocks"].size(), 4u);
  const auto& tot = j["totals"];
  EXPECT_EQ(tot["input_bytes"].get<int64_t>(),
            static_cast<int64_t>(fs::file_size(t / "ckpt" / "model.safetensors") +
                                 fs::file_size(t / "ckpt" / "config.json")));
  EXPECT_EQ(tot["container_bytes"].get<int64_t>(),
            static_cast<int64_t>(fs::file_size(t / "out.safetensors")));
  EXPECT_GT(tot["bits_per_expert_weight"].get<double>(), 0.3);
  EXPECT_LT(tot["bits_per_expert_weight"].get<double>(), 2.0);
  int zf = 0;
  for (const auto& x : j["tensors"]) zf += x.contains("zero_fraction");
  EXPECT_EQ(zf, 32);
  r = run_cli({"inspect", (t / "out.safetensors").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("bits/expert w"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("against"), std::string::npos) << r.output;
  r = run_cli(
      {"compress", (t / "ckpt").string(), "-o", (t / "p.safetensors").string(), "--progress"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("matrices"), std::string::npos) << r.output;
  EXPECT_EQ(read_file(t / "p.safetensors"), read_file(t / "out.safetensors"));
}

// SIGKILL at random moments, then --resume (possibly killed again), must end in the bytes of an
// uninterrupted run.
TEST(Pipeline, KillAndResumeIsByteIdentical) {
  TempDir t("resume");
  auto o = tiny();
  o.d_model = 128;
  o.d_ff = 512;
  o.num_experts = 8;
  o.shard_size = 1 << 20;
  sw::generate_checkpoint(t / "ckpt", o);
  const std::string ck = (t / "ckpt").string();
  for (const bool sharded : {false, true}) {
    const std::string ref = (t / (sharded ? "ref" : "ref.safetensors")).string();
    const std::string out = (t / (sharded ? "out" : "out.safetensors")).string();
    std::vector<std::string> common{"--threads", "2"};
    if (sharded) common.insert(common.end(), {"--shard-size", "400k"});
    auto args = [&](const std::string& o2, bool resume) {
      std::vector<std::string> a{"compress", ck, "-o", o2};
      a.insert(a.end(), common.begin(), common.end());
      if (resume) a.push_back("--resume");
      return a;
    };
    const auto full = run_cli(args(ref, false));
    ASSERT_EQ(full.exit_code, 0) << full.output;
    const auto want = container_bytes(ref);
    ASSERT_FALSE(want.empty());
    const uint64_t seed = std::random_device{}();
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> when(0.01, full.seconds * 0.9);
    int killed = 0;
    for (int round = 0; round < 4; ++round) {
      fs::remove_all(out);
      fs::remove_all(sw::work_dir_for(out));
      bool first = true;
      for (int k = 0; k < 3; ++k) {  // up to three kills in a row, each resumed
        const double at = when(rng);
        const auto r = run_cli(args(out, !first), at);
        first = false;
        if (r.signal == SIGKILL) {
          ++killed;
          // Whatever is under the final name is complete: the rename is the writer's last step
          // (a kill between it and removing the work directory leaves both).
          if (!sharded && fs::exists(out)) {
            EXPECT_EQ(diff(container_bytes(out), want), "") << "seed " << seed;
          }
        } else {
          ASSERT_EQ(r.exit_code, 0) << r.output << " signal " << r.signal << " seed " << seed;
          break;
        }
      }
      const auto fin = run_cli(args(out, true));
      ASSERT_EQ(fin.exit_code, 0) << fin.output << " seed " << seed;
      EXPECT_EQ(diff(container_bytes(out), want), "")
          << "sharded " << sharded << " round " << round << " seed " << seed;
      EXPECT_FALSE(fs::exists(sw::work_dir_for(out)));
      // No temporary files left beside or inside the output.
      for (const auto& e : fs::directory_iterator(sharded ? fs::path(out) : t.path))
        EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
    }
    EXPECT_GT(killed, 0) << "no run was interrupted: the test checked nothing (seed " << seed
                         << ")";
    std::printf("kill/resume (%s): %d kills, seed %llu\n", sharded ? "sharded" : "one file", killed,
                static_cast<unsigned long long>(seed));
  }
}

TEST(Pipeline, ResumeRefusesAnotherRun) {
  TempDir t("refuse");
  sw::generate_checkpoint(t / "ckpt", tiny());
  auto o2 = tiny();
  o2.seed = 7;
  sw::generate_checkpoint(t / "ckpt2", o2);
  const fs::path work = sw::work_dir_for(t / "out.safetensors");
  fs::create_directories(work);
  write_file(work / "run.json", "{\"something\": \"else\"}\n");
  sw::CompressOptions opt;
  opt.resume = true;
  try {
    sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("another input"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
  opt.resume = false;  // without --resume the stale work is replaced
  sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
  EXPECT_TRUE(fs::exists(t / "out.safetensors"));
}

// ---- bad inputs ---------------------------------------------------------------------------------

// Rewrites a single-file checkpoint through `edit`, which may change, drop (return false) or add
// tensors.
using Edit = std::function<bool(std::string& name, DType& dt, std::vector<int64_t>& shape,
                                std::string& bytes)>;
void rewrite(const fs::path& dir, const Edit& edit,
             const std::vector<std::tuple<std::string, DType, std::vector<int64_t>>>& add = {}) {
  std::vector<std::tuple<std::string, DType, std::vector<int64_t>, std::string>> ts;
  {
    const auto f = SafetensorsFile::open(dir / "model.safetensors");
    for (const auto& t : f.tensors()) {
      std::string name = t.name,
                  bytes(reinterpret_cast<const char*>(f.bytes(t).data()), f.bytes(t).size());
      DType dt = t.dtype;
      std::vector<int64_t> shape = t.shape;
      if (edit(name, dt, shape, bytes)) ts.emplace_back(name, dt, shape, bytes);
    }
  }
  for (const auto& [n, dt, shape] : add) {
    int64_t nb = dtype_size(dt);
    for (auto s : shape) nb *= s;
    ts.emplace_back(n, dt, shape, std::string(static_cast<size_t>(nb), '\0'));
  }
  fs::remove(dir / "model.safetensors");
  SafetensorsWriter w(dir / "model.safetensors");
  w.set_metadata("format", "pt");
  for (auto& [n, dt, shape, bytes] : ts)
    w.add(n, dt, shape, std::as_bytes(std::span(bytes.data(), bytes.size())));
  w.finish();
}

struct BadCase {
  std::string what;
  std::function<void(const fs::path& ckpt)> spoil;
  std::vector<std::string> expect;  // substrings of the message
};

TEST(Pipeline, BadInputsFailBeforeAnyWork) {
  const std::string e1wo = "encoder.block.1.layer.1.mlp.experts.expert_1.wo.weight";
  std::vector<BadCase> cases = {
      {"missing config", [](const fs::path& d) { fs::remove(d / "config.json"); }, {"config.json"}},
      {"not a Switch model",
       [](const fs::path& d) {
         auto j = json::parse(read_file(d / "config.json"));
         j["model_type"] = "t5";
         write_file(d / "config.json", j.dump());
       },
       {"config.json", "not a Switch"}},
      {"malformed config",
       [](const fs::path& d) { write_file(d / "config.json", "{\"d_model\": "); },
       {"config.json"}},
      {"missing weights",
       [](const fs::path& d) { fs::remove(d / "model.safetensors"); },
       {"model.safetensors"}},
      {"truncated weights",
       [](const fs::path& d) {
         fs::resize_file(d / "model.safetensors", fs::file_size(d / "model.safetensors") - 100);
       },
       {"model.safetensors"}},
      {"expert of the wrong shape",
       [&](const fs::path& d) {
         rewrite(d, [&](std::string& n, DType&, std::vector<int64_t>& s, std::string& b) {
           if (n == e1wo) {
             s = {s[1], s[0]};  // transposed
             (void)b;
           }
           return true;
         });
       },
       {e1wo, "shape"}},
      {"expert of the wrong dtype",
       [&](const fs::path& d) {
         rewrite(d, [&](std::string& n, DType& dt, std::vector<int64_t>&, std::string&) {
           if (n == e1wo) dt = DType::kI32;
           return true;
         });
       },
       {e1wo, "dtype"}},
      {"missing expert",
       [&](const fs::path& d) {
         rewrite(d, [&](std::string& n, DType&, std::vector<int64_t>&, std::string&) {
           return n != e1wo;
         });
       },
       {e1wo, "missing"}},
      {"expert the router does not know",
       [](const fs::path& d) {
         rewrite(
             d, [](std::string&, DType&, std::vector<int64_t>&, std::string&) { return true; },
             {{"encoder.block.1.layer.1.mlp.experts.expert_9.wi.weight", DType::kF32, {256, 64}}});
       },
       {"expert_9", "unexpected expert"}},
      {"no sparse block",
       [](const fs::path& d) {
         rewrite(d, [](std::string& n, DType&, std::vector<int64_t>&, std::string&) {
           return n.find(".mlp.router.") == std::string::npos &&
                  n.find(".mlp.experts.") == std::string::npos;
         });
       },
       {"sparse"}},
  };
  for (const auto& c : cases) {
    TempDir t("bad");
    sw::generate_checkpoint(t / "ckpt", tiny());
    c.spoil(t / "ckpt");
    const auto r =
        run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out.safetensors").string()});
    EXPECT_NE(r.exit_code, 0) << c.what << ": " << r.output;
    for (const auto& s : c.expect)
      EXPECT_NE(r.output.find(s), std::string::npos) << c.what << ": " << r.output;
    EXPECT_FALSE(fs::exists(t / "out.safetensors")) << c.what;
    EXPECT_FALSE(fs::exists(sw::work_dir_for(t / "out.safetensors"))) << c.what;
  }
}

TEST(Pipeline, MissingShardIsNamed) {
  TempDir t("shard");
  auto o = tiny();
  o.shard_size = 200 << 10;
  sw::generate_checkpoint(t / "ckpt", o);
  fs::path victim;
  for (const auto& e : fs::directory_iterator(t / "ckpt"))
    if (e.path().filename().string().rfind("model-00002-of-", 0) == 0) victim = e.path();
  ASSERT_FALSE(victim.empty()) << "expected a sharded checkpoint";
  fs::remove(victim);
  const auto r = run_cli(
      {"compress", (t / "ckpt").string(), "-o", (t / "out").string(), "--shard-size", "1M"});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(victim.filename().string()), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "out"));
}

TEST(Pipeline, OutputThatIsADirectory) {
  TempDir t("outdir");
  sw::generate_checkpoint(t / "ckpt", tiny());
  fs::create_directories(t / "out");
  const auto r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out").string()});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("directory"), std::string::npos) << r.output;
}

// A checkpoint whose uncompressed part alone is larger than the free disk: a sparse file, so the
// test itself needs no space. The check must refuse before writing anything.
TEST(Pipeline, NotEnoughDisk) {
  TempDir t("disk");
  sw::generate_checkpoint(t / "ckpt", tiny());
  struct statvfs v {};
  ASSERT_EQ(::statvfs(t.path.c_str(), &v), 0);
  const int64_t free_bytes = static_cast<int64_t>(v.f_bavail) * static_cast<int64_t>(v.f_frsize);
  const int64_t huge = free_bytes + (int64_t{1} << 30);
  // Header of a second "shard" holding one huge U8 tensor, data left as a hole.
  const std::string name = "decoder.extra_huge.weight";
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"},\"" + name +
                       "\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(huge) +
                       "],\"data_offsets\":[0," + std::to_string(huge) + "]}}";
  while (header.size() % 8) header.push_back(' ');
  {
    std::ofstream f(t / "ckpt" / "model-00002-of-00002.safetensors", std::ios::binary);
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header;
  }
  std::error_code ec;
  fs::resize_file(t / "ckpt" / "model-00002-of-00002.safetensors",
                  static_cast<uintmax_t>(8 + static_cast<int64_t>(header.size()) + huge), ec);
  if (ec)
    GTEST_SKIP() << "this filesystem cannot hold a sparse file of " << huge
                 << " bytes: " << ec.message();
  fs::rename(t / "ckpt" / "model.safetensors", t / "ckpt" / "model-00001-of-00002.safetensors");
  json wm = json::object();
  {
    const auto first = SafetensorsFile::open(t / "ckpt" / "model-00001-of-00002.safetensors");
    for (const auto& tt : first.tensors()) wm[tt.name] = "model-00001-of-00002.safetensors";
  }
  wm[name] = "model-00002-of-00002.safetensors";
  write_file(t / "ckpt" / "model.safetensors.index.json",
             json{{"metadata", json::object()}, {"weight_map", wm}}.dump());
  const auto r =
      run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out.safetensors").string()});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("not enough free disk space"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
  EXPECT_FALSE(fs::exists(sw::work_dir_for(t / "out.safetensors")));
}

// ---- GPTQ through a Hessian file
// ------------------------------------------------------------------

// Accumulators from random correlated inputs for every expert matrix of `ckpt`.
std::map<std::string, HessianAccumulator> random_hessians(const fs::path& ckpt, uint64_t seed) {
  const auto src = sw::SwitchSource::open(ckpt);
  std::map<std::string, HessianAccumulator> acc;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  for (const auto& n : src->names()) {
    if (n.find(".mlp.experts.") == std::string::npos) continue;
    const auto t = src->dense(n);
    const int64_t d = t.shape[1];
    const int64_t tokens =
        n.find("expert_3") != std::string::npos ? 0 : 3 * d;  // expert 3 saw nothing
    std::vector<float> x(static_cast<size_t>(tokens * d));
    for (int64_t i = 0; i < tokens; ++i) {
      const float common = nd(rng);
      for (int64_t j = 0; j < d; ++j) x[static_cast<size_t>(i * d + j)] = nd(rng) + 0.5f * common;
    }
    HessianAccumulator a(d);
    if (tokens) a.add(x.data(), tokens);
    acc.emplace(n.substr(0, n.size() - 7), std::move(a));
  }
  return acc;
}

TEST(Pipeline, GptqFromHessianFile) {
  TempDir t("gptq");
  sw::generate_checkpoint(t / "ckpt", tiny());
  const auto acc = random_hessians(t / "ckpt", 5);
  write_hessians(t / "h.safetensors", acc);
  auto prov = sw::open_hessian_file(t / "h.safetensors");
  sw::CompressOptions opt;
  opt.hessians = prov.get();
  opt.threads = 2;
  const auto s = sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
  EXPECT_EQ(s.quantizer, "gptq");
  EXPECT_EQ(s.fallback_matrices, 2 * 2 * 2);  // expert 3 of each sparse block: wi and wo
  const Container c = Container::open(t / "out.safetensors");
  EXPECT_EQ(c.metadata().at("quantizer"), "gptq");
  // Each matrix equals a direct compress_matrix() call with the same Hessian.
  const auto src = sw::SwitchSource::open(t / "ckpt");
  int checked = 0;
  for (const auto& e : c.compressed()) {
    const auto w = src->dense(e.name);
    const auto& a = acc.at(e.name.substr(0, e.name.size() - 7));
    const auto h = a.hessian();
    const auto want =
        compress_matrix(w.data, w.shape[0], w.shape[1], h.empty() ? nullptr : h.data());
    std::vector<uint8_t> got(static_cast<size_t>(w.numel())), exp(static_cast<size_t>(w.numel()));
    decode_symbols_ref(e.view, got.data());
    decode_symbols_ref(want.matrix.view(), exp.data());
    EXPECT_EQ(got, exp) << e.name;
    ++checked;
  }
  EXPECT_EQ(checked, 32);
  // Per-expert losses are recorded and shown by inspect.
  const auto r = run_cli({"inspect", (t / "out.safetensors").string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = json::parse(r.output);
  int with_loss = 0;
  for (const auto& x : j["tensors"]) with_loss += x.contains("gptq_loss");
  EXPECT_EQ(with_loss, 32);
  // Same bytes on a second run with other threads.
  sw::CompressOptions o1 = opt;
  o1.threads = 1;
  sw::compress_checkpoint(t / "ckpt", t / "out1.safetensors", o1);
  EXPECT_EQ(read_file(t / "out1.safetensors"), read_file(t / "out.safetensors"));
}

TEST(Pipeline, HessiansThatDoNotMatch) {
  TempDir t("gptqbad");
  sw::generate_checkpoint(t / "ckpt", tiny());
  auto acc = random_hessians(t / "ckpt", 6);
  const std::string victim = "decoder.block.3.layer.2.mlp.experts.expert_2.wo";
  acc.erase(victim);
  acc.emplace(victim, HessianAccumulator(64));  // d_model instead of d_ff
  write_hessians(t / "h.safetensors", acc);
  auto r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out.safetensors").string(),
                    "--hessians", (t / "h.safetensors").string()});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(victim), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("h.safetensors"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
  acc.erase(victim);
  write_hessians(t / "h2.safetensors", acc);
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "out.safetensors").string(),
               "--hessians", (t / "h2.safetensors").string()});
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("no Hessian"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
}
// Rate control through the pipeline: every expert matrix lands within the tolerance of its target
// (scope "all": the mean over the experts lands on --target-bits), the options are recorded, the
// bytes do not depend on the thread count; round to nearest takes a target too, and
// check-compressed does not hold such a container to ternarize_rtn().
TEST(Pipeline, RateControlLandsEveryMatrix) {
  TempDir t("rate");
  sw::generate_checkpoint(t / "ckpt", tiny());
  const auto acc = random_hessians(t / "ckpt", 7);
  write_hessians(t / "h.safetensors", acc);
  auto prov = sw::open_hessian_file(t / "h.safetensors");
  sw::CompressOptions opt;
  opt.hessians = prov.get();
  opt.threads = 2;
  opt.ternary.levels = TernaryLevels::kFit;
  opt.ternary.refit = 2;
  opt.rate.target_bits = 1.5;
  opt.rate.knob = RateKnob::kPenalty;
  opt.rate.scope = RateScope::kAll;
  const auto s = sw::compress_checkpoint(t / "ckpt", t / "out.safetensors", opt);
  EXPECT_NEAR(s.bits_per_expert_weight(), 1.5, opt.rate.tolerance);
  const Container c = Container::open(t / "out.safetensors");
  const json o = json::parse(c.metadata().at("compress.options"));
  EXPECT_EQ(o.at("ternary").at("levels"), "fit");
  EXPECT_EQ(o.at("ternary").at("refit"), 2);
  EXPECT_EQ(o.at("rate").at("target_bits"), 1.5);
  EXPECT_EQ(o.at("rate").at("scope"), "all");
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (const auto& e : c.compressed()) shapes.emplace_back(e.view.rows, e.view.cols);
  const std::vector<double> targets = rate_targets(shapes, opt.rate);
  for (size_t i = 0; i < c.compressed().size(); ++i)
    EXPECT_NEAR(c.compressed()[i].view.bits_per_weight(), targets[i], opt.rate.tolerance)
        << c.compressed()[i].name;
  EXPECT_EQ(targets.size(), 32u);
  EXPECT_NE(targets.front(), targets.back());  // wi and wo differ in overhead
  sw::CompressOptions o1 = opt;
  o1.threads = 1;
  sw::compress_checkpoint(t / "ckpt", t / "out1.safetensors", o1);
  EXPECT_EQ(read_file(t / "out1.safetensors"), read_file(t / "out.safetensors"));

  // Round to nearest at a size, from the command line; check-compressed accepts it.
  auto r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "rtn.safetensors").string(),
                    "--rtn", "--target-bits", "1.5", "--rate-scope", "all"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Container cr = Container::open(t / "rtn.safetensors");
  EXPECT_EQ(cr.metadata().at("quantizer"), "rtn");
  int64_t bytes = 0, weights = 0;
  for (const auto& e : cr.compressed()) {
    bytes += e.view.compressed_bytes();
    weights += e.view.rows * e.view.cols;
  }
  EXPECT_NEAR(8.0 * static_cast<double>(bytes) / static_cast<double>(weights), 1.5, 0.002);
  r = run_cli({"check-compressed", (t / "ckpt").string(), (t / "rtn.safetensors").string()});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("exactly equal"), std::string::npos) << r.output;
  // An unreachable target fails naming the tensor, and leaves no output.
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "low.safetensors").string(), "--rtn",
               "--target-bits", "0.1"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("not reached"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tensor '"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(t / "low.safetensors"));
  // A target above every size a matrix's rounding reaches (all weights non-zero): each matrix
  // stays at its largest, the run says so, and inspect marks them.
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "high.safetensors").string(), "--rtn",
               "--codec", "qmoe-v2", "--target-bits", "12"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("32 matrices stayed below their size target"), std::string::npos)
      << r.output;
  r = run_cli({"inspect", (t / "high.safetensors").string(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json hi = json::parse(r.output);
  int below = 0;
  for (const auto& e : hi.at("tensors"))
    if (e.contains("below_size_target")) {
      EXPECT_EQ(e.at("below_size_target"), true);
      EXPECT_LT(e.at("bits_per_weight").get<double>(), 12.0);
      ++below;
    }
  EXPECT_EQ(below, 32);
  // Default options record neither (their bytes stay QMoE's).
  r = run_cli(
      {"compress", (t / "ckpt").string(), "-o", (t / "plain.safetensors").string(), "--rtn"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json po =
      json::parse(Container::open(t / "plain.safetensors").metadata().at("compress.options"));
  EXPECT_FALSE(po.contains("ternary"));
  EXPECT_FALSE(po.contains("rate"));
  // --recipe refit: QMoE's levels and threshold, one round of GPTQ + level refit.
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "refit.safetensors").string(),
               "--hessians", (t / "h.safetensors").string(), "--recipe", "refit"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json ro =
      json::parse(Container::open(t / "refit.safetensors").metadata().at("compress.options"));
  EXPECT_EQ(ro.at("ternary").at("refit"), 1);
  EXPECT_EQ(ro.at("ternary").at("levels"), "minmax");
  EXPECT_EQ(ro.at("actorder"), false);
  // The default recipe: refit for GPTQ at a size (the same bytes as --recipe refit); QMoE's for
  // GPTQ without a size and for round to nearest at a size.
  const std::vector<std::string> sized = {"--target-bits", "1.5", "--rate-scope", "all"};
  auto compress = [&](const std::string& out, std::vector<std::string> args) {
    std::vector<std::string> cmd = {"compress", (t / "ckpt").string(), "-o", (t / out).string()};
    cmd.insert(cmd.end(), args.begin(), args.end());
    const CliResult res = run_cli(cmd);
    EXPECT_EQ(res.exit_code, 0) << res.output;
    return container_bytes(t / out);
  };
  const std::string hf = (t / "h.safetensors").string();
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  const auto by_default = compress("d1.safetensors", with({"--hessians", hf}, sized));
  EXPECT_EQ(diff(by_default,
                 compress("d2.safetensors", with({"--hessians", hf, "--recipe", "refit"}, sized))),
            "");
  EXPECT_NE(diff(by_default,
                 compress("d3.safetensors", with({"--hessians", hf, "--recipe", "qmoe"}, sized))),
            "");
  EXPECT_EQ(diff(compress("d4.safetensors", {"--hessians", hf}),
                 compress("d5.safetensors", {"--hessians", hf, "--recipe", "qmoe"})),
            "");
  EXPECT_EQ(diff(compress("d6.safetensors", with({"--rtn"}, sized)),
                 compress("d7.safetensors", with({"--rtn", "--recipe", "qmoe"}, sized))),
            "");
  r = run_cli({"compress", (t / "ckpt").string(), "-o", (t / "x.safetensors").string(), "--rtn",
               "--recipe", "best"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--recipe must be qmoe, refit or rd"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace qmoe::test
