// Checkpoint layout discovery, tied aliases, and the errors for bad checkpoints and token files.
#include <cstring>
#include <fstream>
#include <sstream>

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
