// qmoe-v2 matrices in the container: each file stores every dictionary its matrices use once,
// under its id; readers check the dictionary against its id and reject broken references.
#include "format_test_util.h"
#include "qmoe/encoder/encode.h"

namespace qmoe::test {
namespace {

using Header = nlohmann::ordered_json;
using Data = std::vector<uint8_t>;

struct V2Fixture {
  // a and b have similar sparsity and share a dictionary; c is sparser and has its own.
  TernaryMatrix ta = random_ternary(6, 300, 0.885, 1), tb = random_ternary(9, 77, 0.89, 2),
                tc = random_ternary(5, 129, 0.96, 3);
  CompressedMatrix a = encode(ta, {.codec = Codec::kV2, .fitted_p0 = 0.890625}),
                   b = encode(tb, {.codec = Codec::kV2, .fitted_p0 = 0.890625}),
                   c = encode(tc, {.codec = Codec::kV2});
  void add_all(ContainerWriter& w) const {
    w.add_compressed("a", a.view(), DType::kF32);
    w.add_compressed("b", b.view(), DType::kBF16);
    w.add_compressed("c", c.view(), DType::kF32);
  }
  fs::path write(const fs::path& dir) const {
    const fs::path p = dir / "v2.safetensors";
    ContainerWriter w(p);
    add_all(w);
    w.finish();
    return p;
  }
  void check(const Container& cont) const {
    for (const auto& [name, m, t] : {std::tuple{"a", &a, &ta}, {"b", &b, &tb}, {"c", &c, &tc}}) {
      const CompressedEntry* e = cont.find_compressed(name);
      ASSERT_NE(e, nullptr) << name;
      EXPECT_EQ(e->view.codec, Codec::kV2);
      EXPECT_EQ(e->view.dictionary_id, m->dictionary->id);
      EXPECT_EQ(decode(e->view), t->to_dense()) << name;
    }
  }
};

std::string dict_name(uint64_t id) {
  return std::string(kV2DictionaryPrefix) + hex64(id);
}

TEST(ContainerV2, RoundTripStoresEachDictionaryOnce) {
  TempDir dir;
  V2Fixture fx;
  ASSERT_EQ(fx.a.dictionary, fx.b.dictionary);
  ASSERT_NE(fx.a.dictionary, fx.c.dictionary);
  const fs::path p = fx.write(dir.path());
  const auto c = Container::open(p, {.verify_checksums = true});
  fx.check(c);
  const auto f = SafetensorsFile::open(p);
  int dictionaries = 0;
  for (const TensorInfo& t : f.tensors()) dictionaries += t.name.rfind("qmoe.dictionary.", 0) == 0;
  EXPECT_EQ(dictionaries, 2);
  const TensorInfo* d = f.find(dict_name(fx.a.dictionary->id));
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->dtype, DType::kU32);
  EXPECT_EQ(d->shape, (std::vector<int64_t>{65536}));
  EXPECT_NE(f.find(dict_name(fx.c.dictionary->id)), nullptr);
  EXPECT_EQ(f.find("qmoe.dictionary.qmoe-v1"), nullptr);
  const auto decl = nlohmann::json::parse(f.metadata().at("qmoe.matrix.a"));
  EXPECT_EQ(decl["codec"], "qmoe-v2");
  EXPECT_EQ("qmoe.dictionary.qmoe-v2." + decl["dictionary"].get<std::string>(),
            dict_name(fx.a.dictionary->id));
  EXPECT_TRUE(c.dense().empty());
}

TEST(ContainerV2, ShardsHoldTheDictionariesTheyUse) {
  TempDir dir;
  V2Fixture fx;
  const fs::path out = dir / "sharded";
  ContainerWriter w(out, {.shard_size = 1000});  // one group per shard
  fx.add_all(w);
  w.finish();
  const auto c = Container::open(out, {.verify_checksums = true});
  fx.check(c);
  for (const auto& e : c.compressed()) {
    const auto f = SafetensorsFile::open(e.shard);
    EXPECT_NE(f.find(dict_name(e.view.dictionary_id)), nullptr) << e.name;
    int dictionaries = 0;
    for (const TensorInfo& t : f.tensors())
      dictionaries += t.name.rfind("qmoe.dictionary.", 0) == 0;
    EXPECT_EQ(dictionaries, 1) << e.shard;
  }
  const auto index = nlohmann::json::parse(read_bytes(out / "model.safetensors.index.json"));
  for (const auto& [k, v] : index["weight_map"].items())
    EXPECT_EQ(k.rfind("qmoe.dictionary.", 0), std::string::npos) << k;
}

// Partitioned writing (several processes writing one sharded container): R writers given the
// same tensors, writer r writing shards r, r + R, ...: after finish_part() on all, keep_part() on
// the others and finish() on the first, the files are byte for byte those of one writer. Each
// reads and checks only its own groups; a writer dropped without keep_part() removes its shards.
TEST(ContainerV2, PartitionedWritingGivesTheSameFiles) {
  TempDir dir;
  V2Fixture fx;
  const fs::path ref = dir / "ref";
  {
    ContainerWriter w(ref, {.shard_size = 1000});
    w.set_metadata("k", "v");
    w.add_dense("d", DType::kU8, {3}, std::as_bytes(std::span<const char>("xyz", 3)));
    fx.add_all(w);
    w.finish();
  }
  const auto files_of = [](const fs::path& d) {
    std::map<std::string, std::vector<uint8_t>> m;
    for (const auto& e : fs::directory_iterator(d))
      m[e.path().filename().string()] = read_bytes(e.path());
    return m;
  };
  const auto want = files_of(ref);
  ASSERT_EQ(want.size(), 5u);  // 4 shards and the index
  for (const int parts : {2, 3, 5}) {
    const fs::path out = dir / ("p" + std::to_string(parts));
    std::vector<std::unique_ptr<ContainerWriter>> ws;
    std::vector<int> checks(static_cast<size_t>(parts), 0);
    for (int r = 0; r < parts; ++r) {
      ws.push_back(std::make_unique<ContainerWriter>(
          out, ContainerWriteOptions{
                   .shard_size = 1000, .part_count = parts, .part_rank = r, .part_tag = "t"}));
      ContainerWriter& w = *ws.back();
      w.set_metadata("k", "v");
      w.add_dense("d", DType::kU8, {3}, std::as_bytes(std::span<const char>("xyz", 3)));
      for (const auto& [name, m, dt] : {std::tuple{"a", &fx.a, DType::kF32},
                                        {"b", &fx.b, DType::kBF16},
                                        {"c", &fx.c, DType::kF32}})
        w.add_compressed(name, m->view(), dt, [&checks, r] { ++checks[static_cast<size_t>(r)]; });
    }
    for (auto& w : ws) w->finish_part();
    // Shard k (1-based) by writer (k - 1) % parts; "d" is shard 1, a, b, c shards 2, 3, 4.
    for (int r = 0; r < parts; ++r) {
      int mine = 0;
      for (int k = 2; k <= 4; ++k) mine += (k - 1) % parts == r;
      EXPECT_EQ(checks[static_cast<size_t>(r)], mine) << parts << " " << r;
    }
    for (int r = 1; r < parts; ++r) ws[static_cast<size_t>(r)]->keep_part();
    ws[0]->finish();
    ws.clear();
    EXPECT_EQ(files_of(out), want) << parts << " writers";
    Container::open(out, {.verify_checksums = true});
  }
  // Dropped before keep_part() (another process failed): no file is left.
  {
    const fs::path out = dir / "dropped";
    {
      ContainerWriter w(out,
                        {.shard_size = 1000, .part_count = 2, .part_rank = 1, .part_tag = "v"});
      w.add_dense("d", DType::kU8, {3}, std::as_bytes(std::span<const char>("xyz", 3)));
      fx.add_all(w);
      w.finish_part();
      EXPECT_EQ(files_of(out).size(), 2u);  // shards 2 and 4, under intermediate names
    }
    EXPECT_TRUE(files_of(out).empty());
  }
  EXPECT_THROW(ContainerWriter(dir / "x", {.part_count = 2, .part_rank = 0}), InvalidArgument);
  EXPECT_THROW(ContainerWriter(dir / "x", {.shard_size = 10, .part_count = 2, .part_rank = 2}),
               InvalidArgument);
}

void expect_bad_v2(const std::function<void(Header&, Data&, const V2Fixture&)>& edit,
                   const std::vector<std::string>& parts) {
  expect_bad_file<V2Fixture>(edit, parts);
}

TEST(ContainerV2, BrokenDictionariesAndReferences) {
  // The dictionary of c renamed to a dense tensor: c's reference dangles.
  expect_bad_v2(
      [](Header& h, Data&, const V2Fixture& fx) {
        const std::string name = dict_name(fx.c.dictionary->id);
        h["stray"] = h[name];
        h.erase(name);
        h["__metadata__"].erase("qmoe.xxh3." + name);
      },
      {"tensor 'c'", "dictionary", "is missing"});
  // An entry changed: it no longer hashes to its name (or is malformed).
  expect_bad_v2(
      [](Header& h, Data& d, const V2Fixture& fx) {
        const auto b = h[dict_name(fx.a.dictionary->id)]["data_offsets"][0].get<size_t>();
        d[b + 4 * 100] ^= 1;  // column bit of entry 100's slot 0
      },
      {dict_name(0x0).substr(0, 24)});
  // Wrong dtype.
  expect_bad_v2([](Header& h, Data&,
                   const V2Fixture& fx) { h[dict_name(fx.c.dictionary->id)]["dtype"] = "I32"; },
                {"U32 [65536]"});
  // A matrix declaration without its dictionary key, or with a malformed one.
  expect_bad_v2(
      [](Header& h, Data&, const V2Fixture&) {
        h["__metadata__"]["qmoe.matrix.b"] = R"({"codec":"qmoe-v2","shape":[9,77],"dtype":"BF16"})";
      },
      {"tensor 'b'", "\"dictionary\""});
  expect_bad_v2(
      [](Header& h, Data&, const V2Fixture&) {
        h["__metadata__"]["qmoe.matrix.b"] =
            R"({"codec":"qmoe-v2","shape":[9,77],"dtype":"BF16","dictionary":"XYZ"})";
      },
      {"tensor 'b'", "16 lowercase hex digits"});
  // A dictionary no matrix uses: c becomes a qmoe-v1 declaration... simplest, point c at a's.
  expect_bad_v2(
      [](Header& h, Data&, const V2Fixture& fx) {
        auto decl = nlohmann::json::parse(h["__metadata__"]["qmoe.matrix.c"].get<std::string>());
        decl["dictionary"] = dict_name(fx.a.dictionary->id).substr(kV2DictionaryPrefix.size());
        h["__metadata__"]["qmoe.matrix.c"] = decl.dump();
      },
      {"used by no matrix"});
}

// The reference decoder is safe on dictionaries nobody validated (the fuzzer's path): an entry
// whose slot is both low and high (symbol 3) is an error naming the entry, not an index past the
// row's table of values (found by fuzz_decoder; corpus seed v2-dict-slot-low-and-high).
TEST(ReferenceDecoder, UnvalidatedEntryBothLowAndHighIsAnError) {
  const V2Fixture fx;
  CompressedView v = fx.a.view();
  std::vector<uint32_t> dict(v.dictionary.begin(), v.dictionary.end());
  size_t i = 0;
  while (i < v.codes.size() && v2::slot_symbol(dict[v.codes[i]], 0) == 0) ++i;
  ASSERT_LT(i, v.codes.size());
  const uint16_t code = v.codes[i];
  dict[code] |= (1u << v2::kLowShift) | (1u << v2::kHighShift);
  v.dictionary = dict;
  const size_t n = static_cast<size_t>(v.rows * v.cols);
  std::vector<float> dense(n), x(static_cast<size_t>(v.cols), 1.0f), y(static_cast<size_t>(v.rows));
  std::vector<uint8_t> symbols(n);
  const std::vector<std::string> parts = {"qmoe-v2 dictionary entry " + std::to_string(code),
                                          "slot 0 is both low and high"};
  expect_format_error([&] { decode_ref(v, dense.data()); }, parts);
  expect_format_error([&] { decode_symbols_ref(v, symbols.data()); }, parts);
  expect_format_error([&] { matvec_ref(v, x.data(), y.data()); }, parts);
}

}  // namespace
}  // namespace qmoe::test
