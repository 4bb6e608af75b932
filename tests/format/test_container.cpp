// The qmoe container: round trips (dense + compressed, sharded and unsharded), atomic writes,
// writer argument checks.
#include <set>

#include "format_test_util.h"

namespace qmoe::test {
namespace {

using ::testing::HasSubstr;

struct Fixture {
  std::vector<float> dense_f32;
  std::vector<uint16_t> dense_bf16;
  TernaryMatrix tv1, tp5, todd, tempty;
  CompressedMatrix v1, p5, odd, empty;
  Fixture() {
    dense_f32 = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1.0f};
    dense_bf16 = {float_to_bf16(1.0f), float_to_bf16(-0.5f), float_to_bf16(2.0f)};
    tv1 = random_ternary(7, 64, 0.885, 1);
    tp5 = random_ternary(5, 23, 0.5, 2);
    todd = random_ternary(4, 13, 0.9, 3);
    tempty = TernaryMatrix(0, 9);
    v1 = GreedyV1::get().encode(tv1);
    p5 = encode_p5(tp5);
    odd = GreedyV1::get().encode(todd);
    empty = GreedyV1::get().encode(tempty);
  }
  void add_all(ContainerWriter& w) const {
    w.set_metadata("model", "switch-base-8");
    w.add_dense("embed", DType::kF32, {2, 3}, bytes_of(dense_f32));
    w.add_compressed("experts.0.wi", v1.view(), DType::kF32);
    w.add_compressed("experts.0.wo", p5.view(), DType::kBF16);
    w.add_dense("norm", DType::kBF16, {3}, bytes_of(dense_bf16));
    w.add_compressed("experts.1.wi", odd.view(), DType::kF16);
    w.add_compressed("experts.1.wo", empty.view(), DType::kF32);
  }
  void check(const Container& c) const {
    EXPECT_EQ(c.names(), (std::vector<std::string>{"embed", "experts.0.wi", "experts.0.wo",
                                                   "experts.1.wi", "experts.1.wo", "norm"}));
    EXPECT_EQ(c.metadata().at("format"), "qmoe");
    EXPECT_EQ(c.metadata().at("format_version"), std::to_string(kFormatVersion));
    EXPECT_EQ(c.format_version(), kFormatVersion);
    EXPECT_EQ(c.metadata().at("model"), "switch-base-8");
    for (const auto& [k, v] : c.metadata()) EXPECT_FALSE(k.rfind("qmoe.", 0) == 0) << k;
    const auto* e = c.find_compressed("experts.0.wi");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->view.codec, Codec::kV1);
    EXPECT_EQ(e->original_dtype, DType::kF32);
    EXPECT_EQ(e->original_shape, (std::vector<int64_t>{7, 64}));
    EXPECT_EQ(decode(e->view), tv1.to_dense());
    EXPECT_EQ(std::vector<uint16_t>(e->view.codes.begin(), e->view.codes.end()), v1.codes);
    e = c.find_compressed("experts.0.wo");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->view.codec, Codec::kP5);
    EXPECT_EQ(e->original_dtype, DType::kBF16);
    EXPECT_EQ(decode(e->view), tp5.to_dense());
    e = c.find_compressed("experts.1.wi");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->original_dtype, DType::kF16);
    EXPECT_EQ(decode(e->view), todd.to_dense());
    e = c.find_compressed("experts.1.wo");
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->view.rows, 0);
    EXPECT_EQ(e->view.cols, 9);
    EXPECT_EQ(c.find_compressed("embed"), nullptr);
    const auto* d = c.find_dense("embed");
    ASSERT_NE(d, nullptr);
    EXPECT_EQ(d->dtype, DType::kF32);
    EXPECT_EQ(d->shape, (std::vector<int64_t>{2, 3}));
    ASSERT_EQ(d->bytes.size(), 24u);
    EXPECT_EQ(std::memcmp(d->bytes.data(), dense_f32.data(), 24), 0);
    d = c.find_dense("norm");
    ASSERT_NE(d, nullptr);
    EXPECT_EQ(std::memcmp(d->bytes.data(), dense_bf16.data(), 6), 0);
    EXPECT_EQ(c.find_dense("qmoe.dictionary.qmoe-v1"), nullptr);
    EXPECT_EQ(c.find_dense("experts.0.wi.qmoe_codes"), nullptr);
    EXPECT_EQ(c.dense().size(), 2u);
    EXPECT_EQ(c.compressed().size(), 4u);
    EXPECT_TRUE(c.mismatched_checksums().empty());
  }
};

TEST(Container, RoundTripSingleFile) {
  TempDir dir;
  Fixture fx;
  const fs::path p = dir / "m.qmoe.safetensors";
  ContainerWriter w(p);
  fx.add_all(w);
  EXPECT_EQ(w.finish(), (std::vector<fs::path>{p}));
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"m.qmoe.safetensors"}));
  const auto c = Container::open(p, {.verify_checksums = true, .validate_codes = true});
  fx.check(c);
  EXPECT_EQ(c.files(), (std::vector<fs::path>{p}));

  // The metadata keys of format/SPEC.md, byte for byte.
  const auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.metadata().at("qmoe.matrix.experts.0.wi"),
            R"({"codec":"qmoe-v1","shape":[7,64],"dtype":"F32"})");
  EXPECT_EQ(f.metadata().at("qmoe.matrix.experts.0.wo"),
            R"({"codec":"qmoe-p5","shape":[5,23],"dtype":"BF16"})");
  const auto* codes = f.find("experts.0.wi.qmoe_codes");
  ASSERT_NE(codes, nullptr);
  EXPECT_EQ(f.metadata().at("qmoe.xxh3.experts.0.wi.qmoe_codes"), checksum_hex(f.bytes(*codes)));
  EXPECT_EQ(f.find("experts.0.wo.qmoe_packed")->shape, (std::vector<int64_t>{5, 5}));
  EXPECT_EQ(f.find("experts.0.wi.qmoe_levels")->shape, (std::vector<int64_t>{7, 2}));
  EXPECT_EQ(f.find("experts.0.wi.qmoe_row_offsets")->shape, (std::vector<int64_t>{8}));
  EXPECT_EQ(f.find("qmoe.dictionary.qmoe-v1")->shape, (std::vector<int64_t>{65536, 2}));
  // Every stored tensor has a checksum key, and there is nothing else under "qmoe.".
  size_t xxh = 0;
  for (const auto& [k, v] : f.metadata()) xxh += k.rfind("qmoe.xxh3.", 0) == 0;
  EXPECT_EQ(xxh, f.tensors().size());
}

TEST(Container, OpenDirectoryWithSingleFile) {
  TempDir dir;
  Fixture fx;
  ContainerWriter w(dir / "model.safetensors");
  fx.add_all(w);
  w.finish();
  fx.check(Container::open(dir.path()));
}

TEST(Container, ChecksumKnown) {
  // XXH3_64bits of the empty input with seed 0, a published test vector.
  EXPECT_EQ(checksum_hex({}), "2d06800538d394c2");
}

TEST(Container, ShardedRoundTrip) {
  TempDir dir;
  Fixture fx;
  const fs::path out = dir / "sharded";
  // 1000 bytes: a qmoe-v1 group (with its 512 KiB dictionary) never shares a shard with an
  // earlier group; small groups after it do not fit either; "norm" (6 bytes) joins the p5 group.
  // Shards: {embed} {dict, 0.wi} {0.wo, norm} {dict, 1.wi} {dict, 1.wo}.
  ContainerWriter w(out, {.shard_size = 1000});
  fx.add_all(w);
  const auto files = w.finish();
  ASSERT_EQ(files.size(), 6u);  // 5 shards + index
  EXPECT_EQ(files.back(), out / "model.safetensors.index.json");
  EXPECT_EQ(files.front(), out / "model-00001-of-00005.safetensors");
  std::vector<std::string> names;
  for (const auto& f : files) names.push_back(f.filename().string());
  std::sort(names.begin(), names.end());
  std::vector<std::string> listed;
  for (const auto& e : fs::directory_iterator(out)) listed.push_back(e.path().filename().string());
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(listed, names);  // nothing else left behind

  for (const auto& p : {out, out / "model.safetensors.index.json"}) {
    const auto c = Container::open(p, {.verify_checksums = true});
    fx.check(c);
    EXPECT_EQ(c.files().size(), 6u);
    EXPECT_EQ(c.files().front(), out / "model.safetensors.index.json");
  }
  // Each shard is self-contained: a v1 matrix's shard holds the dictionary, metadata is copied.
  const auto c = Container::open(out);
  for (const auto& e : c.compressed()) {
    const auto f = SafetensorsFile::open(e.shard);
    EXPECT_EQ(f.find("qmoe.dictionary.qmoe-v1") != nullptr, e.view.codec == Codec::kV1) << e.name;
    EXPECT_EQ(f.metadata().at("model"), "switch-base-8");
    EXPECT_EQ(f.metadata().at("format"), "qmoe");
  }
  const auto index = nlohmann::json::parse(read_bytes(out / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["model"], "switch-base-8");
  EXPECT_EQ(index["metadata"]["format"], "qmoe");
  EXPECT_EQ(index["weight_map"]["experts.0.wi.qmoe_codes"],
            index["weight_map"]["experts.0.wi.qmoe_levels"]);
  EXPECT_EQ(index["weight_map"].size(), 13u);  // 3 + 2 + 3 + 3 group members, 2 dense
  EXPECT_FALSE(index["weight_map"].contains("qmoe.dictionary.qmoe-v1"));
}

TEST(Container, ShardsPackGroupsUpToTheLimit) {
  TempDir dir;
  const fs::path out = dir / "s";
  std::vector<float> t(100, 1.0f);  // 400 bytes each
  ContainerWriter w(out, {.shard_size = 1000});
  for (int i = 0; i < 7; ++i)
    w.add_dense(std::string(1, static_cast<char>('a' + i)), DType::kF32, {100}, bytes_of(t));
  const auto files = w.finish();
  ASSERT_EQ(files.size(), 5u);  // 2 + 2 + 2 + 1 tensors, + index
  const auto c = Container::open(out);
  EXPECT_EQ(c.dense().size(), 7u);
  for (size_t k = 0; k + 1 < files.size(); ++k) {
    EXPECT_LE(static_cast<int64_t>(SafetensorsFile::open(files[k]).tensors().size()), 2);
  }
}

// An index lists every stored tensor but the dictionaries; one that lists nothing cannot say
// which shards belong to it, so there is no empty sharded container (an empty one is a file).
TEST(Container, ShardedEmptyContainerIsRefused) {
  TempDir dir;
  {
    ContainerWriter w(dir / "e", {.shard_size = 1 << 20});
    EXPECT_THROW((void)w.finish(), InvalidArgument);
  }
  EXPECT_TRUE(fs::is_empty(dir / "e"));
  ContainerWriter w(dir / "e.safetensors");
  w.finish();
  EXPECT_TRUE(Container::open(dir / "e.safetensors").names().empty());
}

TEST(Container, AtomicWriteLeavesNothingWithoutFinish) {
  TempDir dir;
  Fixture fx;
  {
    ContainerWriter w(dir / "single.safetensors");
    fx.add_all(w);
  }
  {
    ContainerWriter w(dir / "sharded", {.shard_size = 1000});
    fx.add_all(w);  // several shards already closed under intermediate names
  }
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"sharded"}));
  EXPECT_TRUE(fs::is_empty(dir / "sharded"));
}

TEST(Container, WriterRejectsBadArguments) {
  TempDir dir;
  Fixture fx;
  ContainerWriter w(dir / "w.safetensors");
  EXPECT_THROW(w.set_metadata("format", "x"), InvalidArgument);
  EXPECT_THROW(w.set_metadata("format_version", "2"), InvalidArgument);
  EXPECT_THROW(w.set_metadata("qmoe.anything", "x"), InvalidArgument);
  EXPECT_THROW(w.add_dense("qmoe.dictionary.qmoe-v1", DType::kF32, {2, 3}, bytes_of(fx.dense_f32)),
               InvalidArgument);
  EXPECT_THROW(w.add_dense("x.qmoe_codes", DType::kF32, {2, 3}, bytes_of(fx.dense_f32)),
               InvalidArgument);
  EXPECT_THROW(w.add_dense("", DType::kF32, {2, 3}, bytes_of(fx.dense_f32)), InvalidArgument);
  EXPECT_THROW(w.add_dense("a", DType::kF32, {2, 4}, bytes_of(fx.dense_f32)), InvalidArgument);
  w.add_dense("a", DType::kF32, {2, 3}, bytes_of(fx.dense_f32));
  EXPECT_THROW(w.add_dense("a", DType::kF32, {2, 3}, bytes_of(fx.dense_f32)), InvalidArgument);
  EXPECT_THROW(w.add_compressed("a", fx.v1.view(), DType::kF32), InvalidArgument);
  EXPECT_THROW(w.add_compressed("b", fx.v1.view(), DType::kI32), InvalidArgument);
  CompressedMatrix broken = fx.v1;
  broken.codes.back() = 1;  // the last row no longer decodes to its width
  EXPECT_THROW(w.add_compressed("b", broken.view(), DType::kF32), InvalidArgument);
  broken = fx.v1;
  broken.levels[0] = 0x7fc0;  // NaN
  EXPECT_THROW(w.add_compressed("b", broken.view(), DType::kF32), InvalidArgument);
  w.finish();
  EXPECT_THROW(w.finish(), InvalidArgument);
  EXPECT_THROW(w.add_dense("z", DType::kF32, {2, 3}, bytes_of(fx.dense_f32)), InvalidArgument);
  const auto c = Container::open(dir / "w.safetensors");
  EXPECT_EQ(c.names(), (std::vector<std::string>{"a"}));
}

TEST(Container, MetadataAfterFirstShardIsRejected) {
  TempDir dir;
  std::vector<float> t(100, 1.0f);
  ContainerWriter w(dir / "s", {.shard_size = 500});
  w.set_metadata("early", "ok");
  w.add_dense("a", DType::kF32, {100}, bytes_of(t));
  w.add_dense("b", DType::kF32, {100}, bytes_of(t));  // closes the first shard
  EXPECT_THROW(w.set_metadata("late", "no"), InvalidArgument);
  w.finish();
  EXPECT_EQ(Container::open(dir / "s").metadata().at("early"), "ok");
}

// Shapes far beyond memory are handled through sizes only: a wide all-zero matrix encodes to a
// few codes per row, and the format's size arithmetic stays in 64 bits.
TEST(Container, WideAndTallMatrices) {
  TempDir dir;
  TernaryMatrix wide(1, 100000);
  wide.levels = {float_to_bf16(-1.0f), float_to_bf16(1.0f)};
  wide.symbols[99999] = 2;
  TernaryMatrix tall(4096, 14);
  for (int64_t r = 0; r < tall.rows; ++r) {
    tall.levels[2 * r] = float_to_bf16(-0.5f);
    tall.levels[2 * r + 1] = float_to_bf16(0.25f);
    tall.symbols[r * 14 + r % 14] = static_cast<uint8_t>(1 + r % 2);
  }
  const auto cw = GreedyV1::get().encode(wide);
  const auto ct = GreedyV1::get().encode(tall);
  ContainerWriter w(dir / "big.safetensors");
  w.add_compressed("wide", cw.view(), DType::kF32);
  w.add_compressed("tall", ct.view(), DType::kF32);
  w.add_compressed("wide_p5", encode_p5(wide).view(), DType::kF32);
  w.finish();
  const auto c = Container::open(dir / "big.safetensors", {.verify_checksums = true});
  EXPECT_EQ(decode(c.find_compressed("wide")->view), wide.to_dense());
  EXPECT_EQ(decode(c.find_compressed("tall")->view), tall.to_dense());
  EXPECT_EQ(decode(c.find_compressed("wide_p5")->view), wide.to_dense());
  // A zero run costs one code per 14 pairs: 16 / 28 bits per weight.
  EXPECT_LT(c.find_compressed("wide")->view.bits_per_weight(true), 16.0 / 28 + 0.001);
}

TEST(Container, BigDeclaredShapeWithoutDataIsRejected) {
  TempDir dir;
  Fixture fx;
  const fs::path p = dir / "m.safetensors";
  ContainerWriter w(p);
  fx.add_all(w);
  w.finish();
  // Claim a 4096 x 14336 matrix without the data for it.
  rewrite(p, [](auto& h, auto&) {
    h["__metadata__"]["qmoe.matrix.experts.0.wi"] =
        R"({"codec":"qmoe-v1","shape":[4096,14336],"dtype":"F32"})";
  });
  expect_format_error([&] { (void)Container::open(p); },
                      {p.string(), "experts.0.wi.qmoe_row_offsets", "[4097]"});
  rewrite(p, [](auto& h, auto&) {
    h["__metadata__"]["qmoe.matrix.experts.0.wi"] =
        R"({"codec":"qmoe-v1","shape":[4611686018427387904,4611686018427387904],"dtype":"F32"})";
  });
  expect_format_error([&] { (void)Container::open(p); }, {p.string(), "experts.0.wi"});
}

// The Python `safetensors` package (the reference implementation) must open our files.
TEST(Container, OpensInPythonSafetensors) {
  if (std::system("python3 -c 'import safetensors, numpy, ml_dtypes' >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "python3 with safetensors, numpy and ml_dtypes is not installed "
                    "(scripts/install-deps.sh)";
  }
  TempDir dir;
  Fixture fx;
  const fs::path p = dir / "py.safetensors";
  ContainerWriter w(p);
  fx.add_all(w);
  w.finish();
  const fs::path script = dir / "check.py";
  {
    std::ofstream s(script);
    // ml_dtypes must be imported before safetensors.numpy can hand out BF16 tensors: importing
    // it registers the numpy "bfloat16" dtype (format/SPEC.md, "Reading with other tools").
    s << "import sys, numpy as np, ml_dtypes\n"
         "from safetensors import safe_open\n"
         "from safetensors.numpy import load_file\n"
         "t = load_file(sys.argv[1])\n"
         "with safe_open(sys.argv[1], framework='numpy') as f:\n"
         "    md = f.metadata()\n"
         "assert md['format'] == 'qmoe' and md['format_version'] == '2', md\n"
         "assert t['embed'].dtype == np.float32 and t['embed'].tolist() == [[1.5, -2.0, 3.25], "
         "[0.0, 7.0, -1.0]]\n"
         "assert t['experts.0.wi.qmoe_codes'].dtype == np.uint16\n"
         "assert t['experts.0.wi.qmoe_row_offsets'].dtype == np.int32\n"
         "assert t['experts.0.wi.qmoe_levels'].shape == (7, 2)\n"
         "assert str(t['experts.0.wi.qmoe_levels'].dtype) == 'bfloat16'\n"
         "assert t['experts.0.wo.qmoe_packed'].shape == (5, 5)\n"
         "assert t['qmoe.dictionary.qmoe-v1'].shape == (65536, 2)\n"
         "assert t['norm'].astype(np.float32).tolist() == [1.0, -0.5, 2.0]\n"
         "print('ok', len(t))\n";
  }
  const std::string cmd = "python3 " + script.string() + " " + p.string();
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}

}  // namespace
}  // namespace qmoe::test
