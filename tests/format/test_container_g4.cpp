// qmoe-g4 matrices (format/SPEC.md section 4.5) and the "qmoe.target" key (2.2) in the container:
// round trips next to other codecs, single file and sharded, and the reader's errors for broken
// groups, streams and target values.
#include "format_test_util.h"
#include "qmoe/encoder/encode.h"

namespace qmoe::test {
namespace {

using Header = nlohmann::ordered_json;
using Data = std::vector<uint8_t>;

// qmoe-g4 matrices of every kind of height (a multiple of 4, one padding row, three, no rows, no
// columns) next to a qmoe-v1 and a qmoe-v2 matrix, written for the CPU.
struct G4Fixture {
  TernaryMatrix ta = random_ternary(8, 300, 0.885, 1), tb = random_ternary(7, 129, 0.96, 2),
                tc = random_ternary(5, 77, 0.5, 3), td = random_ternary(0, 10, 0.9, 4),
                te = random_ternary(6, 0, 0.9, 5), tf = random_ternary(4, 64, 0.885, 6),
                tg = random_ternary(4, 64, 0.885, 7);
  CompressedMatrix a = encode(ta, {.codec = Codec::kG4}), b = encode(tb, {.codec = Codec::kG4}),
                   c = encode(tc, {.codec = Codec::kG4}), d = encode(td, {.codec = Codec::kG4}),
                   e = encode(te, {.codec = Codec::kG4}), f = encode(tf, {.codec = Codec::kV1}),
                   g = encode(tg, {.codec = Codec::kV2});
  void add_all(ContainerWriter& w) const {
    w.set_target(Target::kCpu);
    w.add_compressed("a", a.view(), DType::kF32);
    w.add_compressed("b", b.view(), DType::kBF16);
    w.add_compressed("c", c.view(), DType::kF32);
    w.add_compressed("d", d.view(), DType::kF32);
    w.add_compressed("e", e.view(), DType::kF32);
    w.add_compressed("f", f.view(), DType::kF32);
    w.add_compressed("g", g.view(), DType::kF32);
  }
  fs::path write(const fs::path& dir) const {
    const fs::path p = dir / "g4.safetensors";
    ContainerWriter w(p);
    add_all(w);
    w.finish();
    return p;
  }
  void check(const Container& cont) const {
    for (const auto& [name, m, t] : {std::tuple{"a", &a, &ta},
                                     {"b", &b, &tb},
                                     {"c", &c, &tc},
                                     {"d", &d, &td},
                                     {"e", &e, &te},
                                     {"f", &f, &tf},
                                     {"g", &g, &tg}}) {
      const CompressedEntry* entry = cont.find_compressed(name);
      ASSERT_NE(entry, nullptr) << name;
      EXPECT_EQ(entry->view.codec, m->codec) << name;
      EXPECT_NO_THROW(validate(entry->view, name)) << name;
      EXPECT_EQ(decode(entry->view), t->to_dense()) << name;
      EXPECT_EQ(entry->view.compressed_bytes(), m->view().compressed_bytes()) << name;
    }
    EXPECT_EQ(cont.target(), Target::kCpu);
    EXPECT_EQ(cont.metadata().at("qmoe.target"), "cpu");
  }
};

TEST(ContainerG4, RoundTripWithOtherCodecsAndTarget) {
  TempDir dir;
  G4Fixture fx;
  const fs::path p = fx.write(dir.path());
  const auto c = Container::open(p, {.verify_checksums = true, .validate_codes = true});
  fx.check(c);
  const auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.metadata().at("qmoe.target"), "cpu");
  const TensorInfo* offs = f.find("b.qmoe_group_offsets");
  ASSERT_NE(offs, nullptr);
  EXPECT_EQ(offs->dtype, DType::kI32);
  EXPECT_EQ(offs->shape, (std::vector<int64_t>{2 + 1, 2}));  // 7 rows: 2 groups
  const TensorInfo* tok = f.find("b.qmoe_tokens");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->dtype, DType::kU8);
  EXPECT_EQ(tok->shape, (std::vector<int64_t>{static_cast<int64_t>(fx.b.tokens.size())}));
  EXPECT_NE(f.find("b.qmoe_kinds"), nullptr);
  EXPECT_EQ(f.find("b.qmoe_codes"), nullptr);
  EXPECT_EQ(f.metadata().at("qmoe.matrix.b"),
            R"({"codec":"qmoe-g4","shape":[7,129],"dtype":"BF16"})");
}

TEST(ContainerG4, ShardedKeepsTheTargetInShardsAndIndex) {
  TempDir dir;
  G4Fixture fx;
  const fs::path out = dir / "sharded";
  ContainerWriter w(out, {.shard_size = 300});
  fx.add_all(w);
  const auto files = w.finish();
  ASSERT_GT(files.size(), 3u);
  const auto c = Container::open(out, {.verify_checksums = true});
  fx.check(c);
  for (const auto& e : c.compressed())
    EXPECT_EQ(SafetensorsFile::open(e.shard).metadata().at("qmoe.target"), "cpu") << e.shard;
  // set_target() after a shard was closed is refused, like set_metadata().
  EXPECT_THROW(
      {
        ContainerWriter late(dir / "late", {.shard_size = 100});
        late.add_compressed("a", fx.a.view(), DType::kF32);
        late.add_compressed("b", fx.b.view(), DType::kF32);
        late.set_target(Target::kGpu);
      },
      InvalidArgument);
}

// Without set_target(), or with Target::kAny (a file meant for any device, SPEC 2.2), no key is
// written, so that the tools' default output is unchanged; kAny also drops an earlier target.
TEST(ContainerG4, NoTargetKeyWithoutSetTargetOrForAny) {
  TempDir dir;
  G4Fixture fx;
  for (int how = 0; how < 3; ++how) {
    SCOPED_TRACE(how);
    const fs::path p = dir / ("plain" + std::to_string(how) + ".safetensors");
    ContainerWriter w(p);
    if (how == 2) w.set_target(Target::kGpu);
    if (how >= 1) w.set_target(Target::kAny);
    w.add_compressed("a", fx.a.view(), DType::kF32);
    w.finish();
    const auto c = Container::open(p);
    EXPECT_EQ(c.target(), std::nullopt);
    EXPECT_EQ(c.metadata().count("qmoe.target"), 0u);
  }
}

void expect_bad_g4(const std::function<void(Header&, Data&, const G4Fixture&)>& edit,
                   const std::vector<std::string>& parts) {
  expect_bad_file<G4Fixture>(edit, parts);
}

TEST(ContainerG4, BadTargetValue) {
  expect_bad_g4(
      [](Header& h, Data&, const G4Fixture&) { h["__metadata__"]["qmoe.target"] = "tpu"; },
      {"qmoe.target", "\"tpu\"", "\"cpu\", \"gpu\" or \"any\""});
}

TEST(ContainerG4, BadGroupMembers) {
  expect_bad_g4(
      [](Header& h, Data&, const G4Fixture&) { h["a.qmoe_group_offsets"]["shape"] = {6}; },
      {"tensor 'a.qmoe_group_offsets'", "I32 [3, 2]"});
  expect_bad_g4([](Header& h, Data&, const G4Fixture&) { h["a.qmoe_tokens"]["dtype"] = "I8"; },
                {"tensor 'a.qmoe_tokens'", "U8"});
  expect_bad_g4(
      [](Header& h, Data&, const G4Fixture&) {
        h["stray"] = h["c.qmoe_kinds"];
        h.erase("c.qmoe_kinds");
        h["__metadata__"].erase("qmoe.xxh3.c.qmoe_kinds");
      },
      {"tensor 'c'", "'c.qmoe_kinds' is missing"});
  // A qmoe-g4 member under a matrix of another codec is an extra member.
  expect_bad_g4(
      [](Header& h, Data&, const G4Fixture&) {
        h["f.qmoe_tokens"] = h["a.qmoe_tokens"];
        h.erase("a.qmoe_tokens");
        h["__metadata__"].erase("qmoe.xxh3.a.qmoe_tokens");
      },
      {"'a.qmoe_tokens' is missing"});
}

TEST(ContainerG4, BadStreams) {
  // A token of a's first group raised past the group's end (14 zeros after every position):
  // caught by the code checks at open, naming the matrix and the group.
  expect_bad_g4(
      [](Header& h, Data& d, const G4Fixture& fx) {
        const auto b = h["a.qmoe_tokens"]["data_offsets"][0].get<size_t>();
        const auto t1 = static_cast<size_t>(fx.a.group_offsets[2]);
        for (size_t i = 0; i + 1 < t1; i += 2) d[b + i / 2] = 0xee;
      },
      {"tensor 'a'", "qmoe-g4 group 0 (rows 0..3)"});
  // Group offsets that do not start at (0, 0).
  expect_bad_g4(
      [](Header& h, Data& d, const G4Fixture&) {
        const auto b = h["b.qmoe_group_offsets"]["data_offsets"][0].get<size_t>();
        d[b + 4] = 1;  // kind offset of group 0
      },
      {"tensor 'b'"});
  // A non-zero unused bit in the kinds.
  G4Fixture fx;
  const int32_t n = fx.c.group_offsets.back();
  ASSERT_NE(n % 8, 0);
  expect_bad_g4(
      [](Header& h, Data& d, const G4Fixture&) {
        const auto e = h["c.qmoe_kinds"]["data_offsets"][1].get<size_t>();
        d[e - 1] |= 0x80;
      },
      {"tensor 'c'", "unused last bits of the kinds"});
}

}  // namespace
}  // namespace qmoe::test
