// qmoe-v3 matrices in the container (format/SPEC.md section 4.4), next to qmoe-v2 ones: each file
// stores every dictionary its matrices use once, under the prefix of its codec; readers check the
// dictionary against its id, reject broken references and a pair whose odd row has codes.
#include "format_test_util.h"
#include "qmoe/encoder/encode.h"

namespace qmoe::test {
namespace {

using Header = nlohmann::ordered_json;
using Data = std::vector<uint8_t>;

// Two qmoe-v2 and three qmoe-v3 matrices. c and d (d of odd height) share a qmoe-v3 dictionary;
// e is sparser and has its own; a and b have qmoe-v2 dictionaries, a fitted to the same zero
// fraction as c and d: the codecs share nothing.
struct V3Fixture {
  TernaryMatrix ta = random_ternary(6, 300, 0.885, 1), tb = random_ternary(5, 129, 0.96, 2),
                tc = random_ternary(8, 300, 0.885, 3), td = random_ternary(7, 77, 0.89, 4),
                te = random_ternary(4, 129, 0.96, 5);
  CompressedMatrix a = encode(ta, {.codec = Codec::kV2, .fitted_p0 = 0.890625}),
                   b = encode(tb, {.codec = Codec::kV2}),
                   c = encode(tc, {.codec = Codec::kV3, .fitted_p0 = 0.890625}),
                   d = encode(td, {.codec = Codec::kV3, .fitted_p0 = 0.890625}),
                   e = encode(te, {.codec = Codec::kV3});
  void add_all(ContainerWriter& w) const {
    w.add_compressed("a", a.view(), DType::kF32);
    w.add_compressed("b", b.view(), DType::kBF16);
    w.add_compressed("c", c.view(), DType::kF32);
    w.add_compressed("d", d.view(), DType::kBF16);
    w.add_compressed("e", e.view(), DType::kF32);
  }
  fs::path write(const fs::path& dir) const {
    const fs::path p = dir / "v3.safetensors";
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
                                     {"e", &e, &te}}) {
      const CompressedEntry* entry = cont.find_compressed(name);
      ASSERT_NE(entry, nullptr) << name;
      EXPECT_EQ(entry->view.codec, m->codec) << name;
      EXPECT_EQ(entry->view.dictionary_id, m->dictionary->id) << name;
      EXPECT_NO_THROW(validate(entry->view, name)) << name;
      EXPECT_EQ(decode(entry->view), t->to_dense()) << name;
      std::vector<uint8_t> symbols(t->symbols.size());
      decode_symbols_ref(entry->view, symbols.data());
      EXPECT_EQ(symbols, t->symbols) << name;
    }
  }
};

std::string dict_name(Codec codec, uint64_t id) {
  return std::string(codec == Codec::kV3 ? kV3DictionaryPrefix : kV2DictionaryPrefix) + hex64(id);
}

TEST(ContainerV3, RoundTripWithQmoeV2StoresEachDictionaryOnceUnderItsCodec) {
  TempDir dir;
  V3Fixture fx;
  ASSERT_EQ(fx.c.codec, Codec::kV3);
  ASSERT_EQ(fx.c.dictionary, fx.d.dictionary);
  ASSERT_NE(fx.c.dictionary, fx.e.dictionary);
  ASSERT_NE(fx.a.dictionary->id, fx.c.dictionary->id);  // same p0, other codec: other words
  const fs::path p = fx.write(dir.path());
  const auto c = Container::open(p, {.verify_checksums = true, .validate_codes = true});
  fx.check(c);
  EXPECT_TRUE(c.dense().empty());

  const auto f = SafetensorsFile::open(p);
  int v2_dicts = 0, v3_dicts = 0;
  for (const TensorInfo& t : f.tensors()) {
    v2_dicts += t.name.rfind(kV2DictionaryPrefix, 0) == 0;
    v3_dicts += t.name.rfind(kV3DictionaryPrefix, 0) == 0;
  }
  EXPECT_EQ(v2_dicts, 2);
  EXPECT_EQ(v3_dicts, 2);
  for (const CompressedMatrix* m : {&fx.c, &fx.e}) {
    const TensorInfo* d = f.find(dict_name(Codec::kV3, m->dictionary->id));
    ASSERT_NE(d, nullptr);
    EXPECT_EQ(d->dtype, DType::kU32);
    EXPECT_EQ(d->shape, (std::vector<int64_t>{65536}));
    EXPECT_EQ(f.find(dict_name(Codec::kV2, m->dictionary->id)), nullptr);
  }
  EXPECT_NE(f.find(dict_name(Codec::kV2, fx.a.dictionary->id)), nullptr);
  EXPECT_EQ(f.find("qmoe.dictionary.qmoe-v1"), nullptr);
  const auto decl = nlohmann::json::parse(f.metadata().at("qmoe.matrix.d"));
  EXPECT_EQ(decl["codec"], "qmoe-v3");
  EXPECT_EQ(decl["shape"], (std::vector<int64_t>{7, 77}));
  EXPECT_EQ(decl["dictionary"], hex64(fx.d.dictionary->id));

  // What was read transcodes to qmoe-v2 (the GPU's codec) with the same weights.
  const CompressedMatrix v2 = transcode(c.find_compressed("d")->view, {.codec = Codec::kV2});
  EXPECT_EQ(v2.codec, Codec::kV2);
  EXPECT_EQ(decode(v2.view()), fx.td.to_dense());
}

TEST(ContainerV3, ShardsHoldTheDictionariesTheyUse) {
  TempDir dir;
  V3Fixture fx;
  const fs::path out = dir / "sharded";
  ContainerWriter w(out, {.shard_size = 1000});  // one group per shard
  fx.add_all(w);
  w.finish();
  const auto c = Container::open(out, {.verify_checksums = true});
  fx.check(c);
  for (const auto& e : c.compressed()) {
    const auto f = SafetensorsFile::open(e.shard);
    EXPECT_NE(f.find(dict_name(e.view.codec, e.view.dictionary_id)), nullptr) << e.name;
    int dictionaries = 0;
    for (const TensorInfo& t : f.tensors())
      dictionaries += t.name.rfind("qmoe.dictionary.", 0) == 0;
    EXPECT_EQ(dictionaries, 1) << e.shard;
  }
}

void expect_bad_v3(const std::function<void(Header&, Data&, const V3Fixture&)>& edit,
                   const std::vector<std::string>& parts) {
  expect_bad_file<V3Fixture>(edit, parts);
}

TEST(ContainerV3, MissingDictionary) {
  // The dictionary of e renamed to a dense tensor: e's reference dangles.
  expect_bad_v3(
      [](Header& h, Data&, const V3Fixture& fx) {
        const std::string name = dict_name(Codec::kV3, fx.e.dictionary->id);
        h["stray"] = h[name];
        h.erase(name);
        h["__metadata__"].erase("qmoe.xxh3." + name);
      },
      {"tensor 'e'", "qmoe-v3 dictionary", "is missing"});
  // Stored under the qmoe-v2 prefix instead: still missing for a qmoe-v3 matrix.
  expect_bad_v3(
      [](Header& h, Data&, const V3Fixture& fx) {
        const std::string name = dict_name(Codec::kV3, fx.e.dictionary->id);
        const std::string as_v2 = dict_name(Codec::kV2, fx.e.dictionary->id);
        h[as_v2] = h[name];
        h.erase(name);
        h["__metadata__"].erase("qmoe.xxh3." + name);
      },
      {"tensor 'e'", "qmoe-v3 dictionary '" + std::string(kV3DictionaryPrefix)});
}

TEST(ContainerV3, CorruptDictionary) {
  // An entry changed: it no longer hashes to its name (or is malformed).
  expect_bad_v3(
      [](Header& h, Data& d, const V3Fixture& fx) {
        const auto b =
            h[dict_name(Codec::kV3, fx.c.dictionary->id)]["data_offsets"][0].get<size_t>();
        d[b + 4 * 20000 + 3] ^= 4;  // a width bit of entry 20000
      },
      {"tensor '" + dict_name(Codec::kV3, V3Fixture().c.dictionary->id) + "'"});
  // An entry malformed (bit 25 set) whatever its hash: the dictionary's own check names it.
  expect_bad_v3(
      [](Header& h, Data& d, const V3Fixture& fx) {
        const auto b =
            h[dict_name(Codec::kV3, fx.e.dictionary->id)]["data_offsets"][0].get<size_t>();
        d[b + 4 * 7 + 3] |= 2;
      },
      {"tensor '" + dict_name(Codec::kV3, V3Fixture().e.dictionary->id) + "'",
       "dictionary entry 7 "});
  // Wrong dtype or shape.
  expect_bad_v3(
      [](Header& h, Data&, const V3Fixture& fx) {
        h[dict_name(Codec::kV3, fx.c.dictionary->id)]["dtype"] = "I32";
      },
      {"U32 [65536]"});
  // A qmoe-v3 declaration without its dictionary key.
  expect_bad_v3(
      [](Header& h, Data&, const V3Fixture&) {
        h["__metadata__"]["qmoe.matrix.d"] = R"({"codec":"qmoe-v3","shape":[7,77],"dtype":"BF16"})";
      },
      {"tensor 'd'", "qmoe-v3", "\"dictionary\""});
}

TEST(ContainerV3, UnusedDictionary) {
  // e pointed at c's dictionary: e's own is used by no matrix of the file.
  expect_bad_v3(
      [](Header& h, Data&, const V3Fixture& fx) {
        auto decl = nlohmann::json::parse(h["__metadata__"]["qmoe.matrix.e"].get<std::string>());
        decl["dictionary"] = hex64(fx.c.dictionary->id);
        h["__metadata__"]["qmoe.matrix.e"] = decl.dump();
      },
      {"tensor '" + dict_name(Codec::kV3, V3Fixture().e.dictionary->id) + "'",
       "qmoe-v3 dictionary used by no matrix"});
}

TEST(ContainerV3, OddRowWithCodes) {
  // Row 1 of c given the last code of pair 0: the pair's codes must be its even row's range.
  V3Fixture fx;
  const int32_t end0 = fx.c.row_offsets[1];
  ASSERT_GT(end0, 0);
  ASSERT_EQ(fx.c.row_offsets[2], end0);
  expect_bad_v3(
      [end0](Header& h, Data& d, const V3Fixture&) {
        const auto b = h["c.qmoe_row_offsets"]["data_offsets"][0].get<size_t>();
        const int32_t v = end0 - 1;
        std::memcpy(d.data() + b + 1 * sizeof(int32_t), &v, sizeof v);
      },
      {"tensor 'c'", "row 1 has codes"});
  // The same for the last odd row of d (7 rows: row 5 is the last odd one).
  ASSERT_GT(fx.d.row_offsets[5], fx.d.row_offsets[4]);
  const int32_t end4 = fx.d.row_offsets[5];
  expect_bad_v3(
      [end4](Header& h, Data& d, const V3Fixture&) {
        const auto b = h["d.qmoe_row_offsets"]["data_offsets"][0].get<size_t>();
        const int32_t v = end4 - 1;
        std::memcpy(d.data() + b + 5 * sizeof(int32_t), &v, sizeof v);
      },
      {"tensor 'd'", "row 5 has codes"});
}

}  // namespace
}  // namespace qmoe::test
