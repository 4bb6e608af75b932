// Checkpoint layout discovery, tied aliases, and the errors for bad checkpoints and token files.
#include <sys/resource.h>
#include <sys/stat.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <tuple>

#include <gtest/gtest.h>

#include "qmoe/format/error.h"
#include "qmoe/switch/forward.h"
#include "qmoe/switch/generate.h"
#include "test_util.h"

namespace qmoe::sw::test {
namespace {
namespace fs = std::filesystem;

std::string read(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write(const fs::path& p, const std::string& s) {
  std::ofstream(p) << s;
}

void replace_in(const fs::path& p, const std::string& from, const std::string& to) {
  std::string s = read(p);
  const auto pos = s.find(from);
  ASSERT_NE(pos, std::string::npos) << from << " not in " << p;
  s.replace(pos, from.size(), to);
  write(p, s);
}

fs::path copy_fixture(const std::string& name) {
  const fs::path d = temp_dir(name);
  fs::copy(fixture(name), d, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  return d;
}

// Expects a FormatError whose message contains every one of `parts`.
template <class Fn>
void expect_format_error(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no FormatError";
  } catch (const FormatError& e) {
    for (const auto& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
  }
}

TEST(Checkpoint, LayoutFromTensorNames) {
  const auto a = SwitchSource::open(fixture("every_other_f32"));
  EXPECT_EQ(a->layout().encoder.sparse, (std::vector<bool>{false, true, false, true}));
  EXPECT_EQ(a->layout().decoder.sparse, (std::vector<bool>{false, true, false, true}));
  EXPECT_EQ(a->layout().num_experts, 4);
  EXPECT_FALSE(a->is_container());
  const auto b = SwitchSource::open(fixture("all_sparse_bf16"));
  EXPECT_EQ(b->layout().encoder.sparse, (std::vector<bool>{true, true}));
  EXPECT_EQ(b->layout().decoder.sparse, (std::vector<bool>{true, true, true}));
  EXPECT_EQ(b->layout().num_experts, 8);
  const SwitchModel m = SwitchModel::load(b);
  EXPECT_FALSE(m.scale_logits);  // untied lm_head
  EXPECT_TRUE(SwitchModel::load(a).scale_logits);
}

TEST(Checkpoint, ConfigSparsityIsIgnored) {
  // switch-c-2048's config claims dense blocks that are sparse: the tensor names decide.
  const fs::path d = copy_fixture("every_other_f32");
  replace_in(d / "config.json", "\"num_sparse_encoder_layers\": 2",
             "\"num_sparse_encoder_layers\": 0");
  EXPECT_EQ(SwitchSource::open(d)->layout().encoder.sparse,
            (std::vector<bool>{false, true, false, true}));
  fs::remove_all(d);
}

TEST(Checkpoint, TiedAliasesInIndexResolve) {
  // Converted shards keep index entries for tied aliases (encoder/decoder.embed_tokens.weight,
  // lm_head.weight) pointing at the shard of shared.weight, as generate_checkpoint() writes them.
  GenerateOptions o;
  o.vocab_size = 64, o.d_model = 16, o.d_ff = 32, o.d_kv = 4, o.num_heads = 2;
  o.num_layers = o.num_decoder_layers = 2, o.num_experts = 2, o.shard_size = 8000;
  const fs::path d = temp_dir("aliases");
  generate_checkpoint(d, o);
  ASSERT_NE(read(d / "model.safetensors.index.json").find("\"decoder.embed_tokens.weight\""),
            std::string::npos);
  TokenPairs pairs;
  const std::vector<int32_t> enc{1, 2, 3}, dec{4, 5};
  pairs.add(enc, dec);
  {
    const SwitchModel m = SwitchModel::load(d);
    EXPECT_TRUE(m.source->has("decoder.embed_tokens.weight"));
    EXPECT_EQ(m.encoder_embed.data, nullptr);  // tied: shared.weight for both stacks
    EXPECT_GT(cross_entropy(m, pairs).mean(), 0.0);
  }
  // Untied with aliases only (no embedding of its own stored): the aliases are shared.weight.
  replace_in(d / "config.json", "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
  const SwitchModel u = SwitchModel::load(d);
  ASSERT_NE(u.encoder_embed.data, nullptr);
  EXPECT_EQ(0, std::memcmp(u.encoder_embed.data, u.shared.data,
                           sizeof(float) * static_cast<size_t>(o.vocab_size * o.d_model)));
  EXPECT_EQ(embed(u, Stack::kEncoder, enc), embed(u, Stack::kDecoder, enc));
  fs::remove_all(d);
}

TEST(Checkpoint, Errors) {
  {
    const fs::path d = copy_fixture("every_other_f32");
    fs::remove(d / "config.json");
    expect_format_error([&] { SwitchSource::open(d); }, {"config.json"});
    fs::remove_all(d);
  }
  {
    const fs::path d = copy_fixture("every_other_f32");
    replace_in(d / "config.json", "\"switch_transformers\"", "\"t5\"");
    expect_format_error([&] { SwitchSource::open(d); }, {"config.json", "not a Switch"});
    fs::remove_all(d);
  }
  {
    const fs::path d = copy_fixture("every_other_f32");
    replace_in(d / "config.json", "\"d_ff\": 64", "\"d_ff\": 65");
    expect_format_error([&] { SwitchModel::load(d); },
                        {"model.safetensors", "wi.weight", "[64, 32]", "[65, 32]"});
    fs::remove_all(d);
  }
  {
    const fs::path d = copy_fixture("every_other_f32");
    replace_in(d / "config.json", "\"d_model\": 32", "\"d_model\": \"32\"");
    expect_format_error([&] { SwitchSource::open(d); }, {"config.json", "d_model"});
    fs::remove_all(d);
  }
  {
    const fs::path d = copy_fixture("all_sparse_bf16");
    fs::remove(d / "model-00003-of-00006.safetensors");
    expect_format_error([&] { SwitchSource::open(d); },
                        {"model-00003-of-00006.safetensors", "missing shard"});
    fs::remove_all(d);
  }
  {
    const fs::path d = copy_fixture("all_sparse_bf16");
    replace_in(d / "model.safetensors.index.json", "\"weight_map\": {",
               "\"weight_map\": {\n    \"encoder.block.0.layer.0.SelfAttention.zz.weight\": "
               "\"model-00001-of-00006.safetensors\",");
    expect_format_error([&] { SwitchSource::open(d); }, {"SelfAttention.zz.weight", "lacks"});
    fs::remove_all(d);
  }
  expect_format_error([&] { SwitchSource::open(fixture("no_such_model")); }, {"no_such_model"});
}

// Rewrites the checkpoint's model.safetensors with tensor `name` replaced by `shape` (float32,
// zeros) or removed (empty shape list and remove = true).
void replace_tensor(const fs::path& dir, const std::string& name, std::vector<int64_t> shape,
                    bool remove = false) {
  const fs::path p = dir / "model.safetensors";
  const fs::path tmp = dir / "model.rewritten";
  {
    const auto in = SafetensorsFile::open(p);
    SafetensorsWriter out(tmp);
    for (const auto& [k, v] : in.metadata()) out.set_metadata(k, v);
    for (const auto& t : in.tensors()) {
      if (t.name != name) {
        out.add(t.name, t.dtype, t.shape, in.bytes(t));
      } else if (!remove) {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        const std::vector<float> zeros(static_cast<size_t>(n), 0.0f);
        out.add(t.name, DType::kF32, shape, std::as_bytes(std::span(zeros)));
      }
    }
    out.finish();
  }
  fs::rename(tmp, p);
}

// config.json's integers are bounded and their products checked: num_heads 4 x d_kv 2^62 + 8
// wrapped to a plausible 32 and the forward pass read out of bounds (SIGSEGV in qmoe eval).
TEST(Checkpoint, ConfigIntegersAreBoundedAndProductsChecked) {
  const std::string base = read(fixture("every_other_f32") / "config.json");
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = base;
    const auto pos = s.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    if (pos != std::string::npos) s.replace(pos, from.size(), to);
    return s;
  };
  EXPECT_NO_THROW(SwitchConfig::parse(base, "c.json"));
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"\"d_kv\": 8", "\"d_kv\": 4611686018427387912", "'d_kv'"},
      {"\"d_kv\": 8", "\"d_kv\": 18446744073709551615", "'d_kv'"},
      {"\"d_kv\": 8", "\"d_kv\": 1073741824", "num_heads x d_kv"},
      {"\"d_model\": 32", "\"d_model\": 2147483647", "'d_model'"},
      {"\"d_model\": 32", "\"d_model\": 2147483646", "vocab_size x d_model"},
      {"\"vocab_size\": 96", "\"vocab_size\": 2147483648", "'vocab_size'"},
      {"\"num_experts\": 4", "\"num_experts\": -4", "'num_experts'"},
      {"\"relative_attention_num_buckets\": 16", "\"relative_attention_num_buckets\": 2",
       "relative_attention_num_buckets"},
      {"\"relative_attention_num_buckets\": 16", "\"relative_attention_num_buckets\": 1000000",
       "relative_attention_num_buckets"},
      {"\"relative_attention_max_distance\": 24", "\"relative_attention_max_distance\": 8",
       "half of relative_attention_num_buckets"},
      {"\"expert_capacity\": 64", "\"expert_capacity\": 99999999999", "'expert_capacity'"},
      {"\"decoder_start_token_id\": 0", "\"decoder_start_token_id\": 96", "vocabulary"},
      {"\"pad_token_id\": 0", "\"pad_token_id\": 4294967296", "vocabulary"},
      {"\"layer_norm_epsilon\": 1e-06", "\"layer_norm_epsilon\": 1e999", "1e999"},
      {"\"layer_norm_epsilon\": 1e-06", "\"layer_norm_epsilon\": 0", "layer_norm_epsilon"},
      {"\"d_kv\": 8", "\"d_kv\": 8.0", "'d_kv' is not an integer"},
  };
  for (const auto& [from, to, fragment] : cases) {
    // The products need both factors large: vocab_size too, for vocab_size x d_model.
    const std::string text = fragment == "vocab_size x d_model"
                                 ? with(from, to).replace(with(from, to).find("\"vocab_size\": 96"),
                                                          16, "\"vocab_size\": 2147483647")
                                 : with(from, to);
    expect_format_error([&] { SwitchConfig::parse(text, "c.json"); }, {"c.json", fragment});
  }
  // The checkpoint with the wrapping config is refused when it is opened: before anything runs.
  const fs::path d = copy_fixture("every_other_f32");
  replace_in(d / "config.json", "\"d_kv\": 8", "\"d_kv\": 4611686018427387912");
  expect_format_error([&] { SwitchSource::open(d); }, {"config.json", "'d_kv'"});
  fs::remove_all(d);
}

// JSON rules of format/SPEC.md section 2.1 for config.json and the checkpoint index.
TEST(Checkpoint, ConfigAndIndexJsonRules) {
  const std::string base = read(fixture("every_other_f32") / "config.json");
  expect_format_error([&] { SwitchConfig::parse("\xEF\xBB\xBF" + base, "c.json"); },
                      {"c.json", "byte-order mark"});
  expect_format_error(
      [&] { SwitchConfig::parse("{\"d_ff\": 64, " + base.substr(base.find('{') + 1), "c.json"); },
      {"c.json", "duplicate key \"d_ff\""});
  expect_format_error(
      [&] {
        SwitchConfig::parse("{\"x\\u0000\": 1, " + base.substr(base.find('{') + 1), "c.json");
      },
      {"c.json", "U+0000"});
  const fs::path d = copy_fixture("all_sparse_bf16");
  const std::string idx = read(d / "model.safetensors.index.json");
  write(d / "model.safetensors.index.json", "\xEF\xBB\xBF" + idx);
  expect_format_error([&] { SwitchSource::open(d); },
                      {"model.safetensors.index.json", "byte-order mark"});
  fs::remove_all(d);
}

// compress used to accept configs that contradict the weights (and copy them into the container,
// which failed only at eval); the source now checks every tensor the forward pass needs against
// the config when it is opened.
TEST(Checkpoint, ConfigThatContradictsTheWeightsIsRefusedAtOpen) {
  struct Case {
    std::string what;
    std::function<void(const fs::path&)> spoil;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"vocab_size",
       [](const fs::path& d) {
         replace_in(d / "config.json", "\"vocab_size\": 96", "\"vocab_size\": 97");
       },
       {"model.safetensors", "'shared.weight'", "[96, 32]", "[97, 32]", "vocab_size 97"}},
      {"num_heads",
       [](const fs::path& d) {
         replace_in(d / "config.json", "\"num_heads\": 4", "\"num_heads\": 8");
       },
       {"SelfAttention.q.weight", "[32, 32]", "[64, 32]", "num_heads 8"}},
      {"untied without lm_head",
       [](const fs::path& d) {
         replace_in(d / "config.json", "\"tie_word_embeddings\": true",
                    "\"tie_word_embeddings\": false");
       },
       {"'lm_head.weight'", "missing", "tie_word_embeddings is false"}},
      {"shared.weight shape",
       [](const fs::path& d) {
         replace_tensor(d, "shared.weight", {96, 31});
       },
       {"'shared.weight'", "[96, 31]", "[96, 32]"}},
      {"decoder_start_token_id",
       [](const fs::path& d) {
         replace_in(d / "config.json", "\"decoder_start_token_id\": 0",
                    "\"decoder_start_token_id\": 96");
       },
       {"config.json", "decoder_start_token_id", "vocabulary"}},
      {"relative bias buckets",
       [](const fs::path& d) {
         replace_in(d / "config.json", "\"relative_attention_num_buckets\": 16",
                    "\"relative_attention_num_buckets\": 20");
       },
       {"relative_attention_bias.weight", "[16, 4]", "[20, 4]"}},
      {"final layer norm",
       [](const fs::path& d) { replace_tensor(d, "decoder.final_layer_norm.weight", {}, true); },
       {"'decoder.final_layer_norm.weight'", "missing"}},
      {"expert shape",
       [](const fs::path& d) {
         replace_tensor(d, "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight", {32, 63});
       },
       {"expert_2.wo.weight", "[32, 63]", "[32, 64]"}},
  };
  for (const auto& c : cases) {
    const fs::path d = copy_fixture("every_other_f32");
    c.spoil(d);
    try {
      (void)SwitchSource::open(d);
      ADD_FAILURE() << c.what << ": opened";
    } catch (const FormatError& e) {
      for (const auto& p : c.parts)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
            << c.what << ": " << e.what() << " lacks " << p;
    }
    fs::remove_all(d);
  }
}

// Named pipes in place of any file of a checkpoint or a token file: refused at once (they used
// to block forever; ctest's timeout would fail this test if they still did).
TEST(Checkpoint, NamedPipesAreRefused) {
  for (const char* file : {"config.json", "model.safetensors", "tokens.safetensors"}) {
    const fs::path d = copy_fixture("every_other_f32");
    fs::remove(d / file);
    ASSERT_EQ(::mkfifo((d / file).c_str(), 0600), 0);
    if (std::string(file) == "tokens.safetensors") {
      expect_format_error([&] { TokenPairs::load(d / file); }, {file, "named pipe"});
    } else {
      expect_format_error([&] { SwitchSource::open(d); }, {file, "named pipe"});
    }
    fs::remove_all(d);
  }
  const fs::path d = copy_fixture("all_sparse_bf16");
  fs::remove(d / "model.safetensors.index.json");
  ASSERT_EQ(::mkfifo((d / "model.safetensors.index.json").c_str(), 0600), 0);
  expect_format_error([&] { SwitchSource::open(d); },
                      {"model.safetensors.index.json", "named pipe"});
  fs::remove(d / "model.safetensors.index.json");
  fs::copy_file(fixture("all_sparse_bf16") / "model.safetensors.index.json",
                d / "model.safetensors.index.json");
  fs::remove(d / "model-00002-of-00006.safetensors");
  ASSERT_EQ(::mkfifo((d / "model-00002-of-00006.safetensors").c_str(), 0600), 0);
  expect_format_error([&] { SwitchSource::open(d); },
                      {"model-00002-of-00006.safetensors", "named pipe"});
  fs::remove_all(d);
}

// A file system without room for the checkpoint: generate used to write through a mapping of a
// sparse file and die of SIGBUS, leaving config.json and a temporary file. Here the file size
// limit (RLIMIT_FSIZE, in a child process) stands for the full disk: every write past it fails
// as ENOSPC would (tests/cli/bad_inputs.sh fills a real file system). The error must be a
// qmoe::Error and nothing may be left in the directory: neither the file being written nor the
// shards finished before it.
// The child of the death test below: exits 0 when generate_checkpoint() failed with a qmoe::Error
// and left the directory empty.
[[noreturn]] void generate_without_room(const fs::path& dir, int64_t shard_size) {
  ::signal(SIGXFSZ, SIG_IGN);  // EFBIG from the write instead of the signal
  struct rlimit lim {};
  lim.rlim_cur = lim.rlim_max = 100 << 10;
  ::setrlimit(RLIMIT_FSIZE, &lim);
  // About 4 MB; sharded at 64 KiB, the shards before the one of shared.weight (128 KiB) fit.
  GenerateOptions o = generate_preset("tiny");
  o.shard_size = shard_size;
  try {
    generate_checkpoint(dir, o);
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    std::exit(fs::is_empty(dir) ? 0 : 3);
  }
  std::exit(4);
}

TEST(GenerateDeathTest, NoRoomLeavesNothing) {
  GTEST_FLAG_SET(death_test_style, "fast");
  const fs::path d = temp_dir("generate_full");
  for (const int64_t shard_size : {int64_t{0}, int64_t{64} << 10}) {
    EXPECT_EXIT(generate_without_room(d / "ck", shard_size), ::testing::ExitedWithCode(0),
                "error: .*ck/model.*File too large");
    EXPECT_TRUE(fs::is_empty(d / "ck"));
  }
  fs::remove_all(d);
}

TEST(Tokens, Validation) {
  TokenPairs p;
  const int32_t e1[] = {1, 2, 3}, d1[] = {4, 5};
  p.add(e1, d1);
  EXPECT_NO_THROW(p.validate(10, "t"));
  expect_format_error([&] { p.validate(5, "t"); }, {"t", "decoder_targets", "outside"});
  TokenPairs q = p;
  q.decoder_targets[0] = -100;
  EXPECT_NO_THROW(q.validate(10, "t"));
  q.encoder_ids[1] = -1;
  expect_format_error([&] { q.validate(10, "t"); }, {"encoder_ids"});
  TokenPairs r = p;
  r.encoder_offsets[1] = 4;
  expect_format_error([&] { r.validate(10, "t"); }, {"encoder_offsets"});
  TokenPairs s = p;
  const int32_t none[] = {1};
  s.add(std::span<const int32_t>(none, 0), std::span<const int32_t>(none, 1));
  expect_format_error([&] { s.validate(10, "t"); }, {"no encoder tokens"});
  EXPECT_EQ(p.slice(0, 1).num_pairs(), 1);
  EXPECT_THROW(p.slice(0, 2), InvalidArgument);
}

TEST(Tokens, FileRoundTripAndErrors) {
  const fs::path d = temp_dir("tokens");
  TokenPairs p;
  const int32_t e1[] = {1, 2, 3}, d1[] = {4, -100}, e2[] = {7}, d2[] = {8, 9, 1};
  p.add(e1, d1);
  p.add(e2, d2);
  p.save(d / "t.safetensors");
  const TokenPairs q = TokenPairs::load(d / "t.safetensors", 10);
  EXPECT_EQ(q.encoder_ids, p.encoder_ids);
  EXPECT_EQ(q.decoder_targets, p.decoder_targets);
  EXPECT_EQ(q.encoder_offsets, p.encoder_offsets);
  EXPECT_EQ(q.decoder_offsets, p.decoder_offsets);
  expect_format_error([&] { TokenPairs::load(d / "t.safetensors", 8); },
                      {"t.safetensors", "decoder_targets"});
  // A safetensors file that is not a token file.
  expect_format_error(
      [&] { TokenPairs::load(fixture("every_other_f32") / "expected.safetensors"); },
      {"expected.safetensors", "qmoe-tokens"});
  fs::remove_all(d);
}

}  // namespace
}  // namespace qmoe::sw::test
