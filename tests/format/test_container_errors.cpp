// Malformed containers: every case of format/SPEC.md "Errors a reader must raise" specific to the
// qmoe layer. Each is a FormatError that names the file and the tensor; none may crash (the ASan
// build runs these too).
#include <fcntl.h>

#include "format_golden.h"

namespace qmoe::test {
namespace {

using Header = nlohmann::ordered_json;
using Data = std::vector<uint8_t>;

// Index of an entry of the dictionary with exactly n pairs.
uint16_t entry_with_pairs(int n) {
  const int32_t* t = v1_decode_table();
  for (int e = 0; e < v1::kEntries; ++e) {
    if (v1::entry_pairs(static_cast<uint32_t>(t[2 * e])) == n) return static_cast<uint16_t>(e);
  }
  throw std::runtime_error("no entry");
}

// Writes the small container, applies `edit` (with checksums refreshed afterwards when `fix`),
// and expects Container::open to fail naming the file and every one of `parts`.
void expect_bad(const std::function<void(Header&, Data&)>& edit,
                const std::vector<std::string>& parts, bool fix_checksums = true,
                ContainerOpenOptions opt = {}) {
  TempDir dir;
  const fs::path p = Small().write(dir);
  rewrite(p, [&](Header& h, Data& d) {
    edit(h, d);
    if (fix_checksums) refresh_checksums(h, d);
  });
  auto all = parts;
  all.push_back(p.string());
  expect_format_error([&] { (void)Container::open(p, opt); }, all);
}

TEST(ContainerErrors, SmallFixtureIsValid) {
  TempDir dir;
  Small s;
  const auto c = Container::open(s.write(dir), {.verify_checksums = true});
  EXPECT_EQ(decode(c.find_compressed("m")->view), s.tm.to_dense());
  EXPECT_EQ(decode(c.find_compressed("p")->view), s.tp.to_dense());
  EXPECT_EQ(c.find_compressed("m")->view.codes.size(), 3u);
}

TEST(ContainerErrors, CodesDecodeToMoreSymbolsThanTheWidth) {
  expect_bad(
      [](Header& h, Data& d) { poke<uint16_t>(h, d, "m.qmoe_codes", 1, entry_with_pairs(3)); },
      {"tensor 'm'", "row 1", "more than"});
}

TEST(ContainerErrors, CodesDecodeToFewerSymbolsThanTheWidth) {
  expect_bad(
      [](Header& h, Data& d) { poke<uint16_t>(h, d, "m.qmoe_codes", 2, entry_with_pairs(1)); },
      {"tensor 'm'", "row 2"});
}

TEST(ContainerErrors, RowOffsetsOutOfOrder) {
  expect_bad([](Header& h, Data& d) { poke<int32_t>(h, d, "m.qmoe_row_offsets", 2, 0); },
             {"tensor 'm'", "decrease"});
  expect_bad([](Header& h, Data& d) { poke<int32_t>(h, d, "m.qmoe_row_offsets", 0, 1); },
             {"tensor 'm'"});
  expect_bad([](Header& h, Data& d) { poke<int32_t>(h, d, "m.qmoe_row_offsets", 3, 2); },
             {"tensor 'm'"});
  expect_bad([](Header& h, Data& d) { poke<int32_t>(h, d, "m.qmoe_row_offsets", 3, -7); },
             {"tensor 'm'"});
}

TEST(ContainerErrors, NaNAndMisorderedLevels) {
  expect_bad([](Header& h, Data& d) { poke<uint16_t>(h, d, "m.qmoe_levels", 3, 0x7fc0); },
             {"tensor 'm'", "row 1", "levels"});
  expect_bad(
      [](Header& h, Data& d) { poke<uint16_t>(h, d, "p.qmoe_levels", 0, 0x7f80); },  // lo = +inf
      {"tensor 'p'", "row 0", "levels"});
  expect_bad(
      [](Header& h, Data& d) { poke<uint16_t>(h, d, "m.qmoe_levels", 0, float_to_bf16(0.5f)); },
      {"tensor 'm'", "levels"});
}

TEST(ContainerErrors, BadPackedBytes) {
  expect_bad([](Header& h, Data& d) { poke<uint8_t>(h, d, "p.qmoe_packed", 0, 243); },
             {"tensor 'p'", "242"});
  // 7 columns: the second byte holds columns 5, 6 and three padding symbols that must be 0.
  expect_bad([](Header& h, Data& d) { poke<uint8_t>(h, d, "p.qmoe_packed", 1, 9 * 2); },
             {"tensor 'p'", "padding"});
}

TEST(ContainerErrors, UnvalidatedOpenStillDecodesSafely) {
  TempDir dir;
  const fs::path p = Small().write(dir);
  rewrite(p, [](Header& h, Data& d) {
    poke<uint16_t>(h, d, "m.qmoe_codes", 1, entry_with_pairs(14));
    refresh_checksums(h, d);
  });
  const auto c = Container::open(p, {.validate_codes = false});
  std::vector<float> out(12);
  EXPECT_THROW(decode_ref(c.find_compressed("m")->view, out.data()), FormatError);
}

TEST(ContainerErrors, MissingGroupMember) {
  expect_bad([](Header& h, Data&) { rename_tensor(h, "m.qmoe_levels", "stray"); },
             {"tensor 'm'", "'m.qmoe_levels' is missing"});
  expect_bad([](Header& h, Data&) { rename_tensor(h, "m.qmoe_row_offsets", "stray"); },
             {"tensor 'm'", "'m.qmoe_row_offsets' is missing"});
  expect_bad([](Header& h, Data&) { rename_tensor(h, "p.qmoe_packed", "stray"); },
             {"tensor 'p'", "'p.qmoe_packed' is missing"});
}

TEST(ContainerErrors, ExtraGroupMember) {
  // A member-like name with no qmoe.matrix entry, and a v1 member beside a p5 matrix.
  expect_bad([](Header& h, Data&) { rename_tensor(h, "embed", "embed.qmoe_codes"); },
             {"tensor 'embed.qmoe_codes'", "no qmoe.matrix"});
  expect_bad([](Header& h, Data&) { rename_tensor(h, "embed", "p.qmoe_codes"); },
             {"tensor 'p.qmoe_codes'", "no qmoe.matrix"});
  // A group whose matrix entry was removed.
  expect_bad([](Header& h, Data&) { h["__metadata__"].erase("qmoe.matrix.p"); },
             {"no qmoe.matrix"});
}

TEST(ContainerErrors, WrongMemberDtypeOrShape) {
  expect_bad([](Header& h, Data&) { h["m.qmoe_levels"]["dtype"] = "F16"; },
             {"tensor 'm.qmoe_levels'", "BF16"});
  expect_bad([](Header& h, Data&) { h["m.qmoe_codes"]["dtype"] = "I16"; },
             {"tensor 'm.qmoe_codes'", "U16"});
  expect_bad([](Header& h, Data&) { h["m.qmoe_row_offsets"]["dtype"] = "U32"; },
             {"tensor 'm.qmoe_row_offsets'", "I32"});
  expect_bad(
      [](Header& h, Data&) {
        h["m.qmoe_levels"]["shape"] = {2, 3};
      },
      {"tensor 'm.qmoe_levels'", "[3, 2]"});
  expect_bad(
      [](Header& h, Data&) {
        h["p.qmoe_packed"]["shape"] = {1, 4};
      },
      {"tensor 'p.qmoe_packed'", "[2, 2]"});
  expect_bad(
      [](Header& h, Data&) {
        h["m.qmoe_codes"]["shape"] = {3, 1};
      },
      {"tensor 'm.qmoe_codes'", "1-D"});
}

TEST(ContainerErrors, BadMatrixDeclaration) {
  auto set = [](std::string v) {
    return [v](Header& h, Data&) { h["__metadata__"]["qmoe.matrix.m"] = v; };
  };
  expect_bad(set("{"), {"tensor 'm'", "malformed JSON"});
  expect_bad(set(R"({"codec":"qmoe-v9","shape":[3,4],"dtype":"F32"})"),
             {"tensor 'm'", "unknown codec"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3],"dtype":"F32"})"), {"tensor 'm'", "shape"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3,-4],"dtype":"F32"})"),
             {"tensor 'm'", "non-negative"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3,4],"dtype":"I32"})"), {"tensor 'm'", "dtype"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3,4],"dtype":"F32","x":1})"),
             {"tensor 'm'", "exactly"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3,5],"dtype":"F32"})"), {"tensor 'm'", "row 0"});
  expect_bad(set(R"({"codec":"qmoe-p5","shape":[3,4],"dtype":"F32"})"), {"tensor 'm'"});
  expect_bad(set(R"({"codec":"qmoe-v1","shape":[3,4],"dtype":"F32","dtype":"F16"})"),
             {"duplicate key"});
}

TEST(ContainerErrors, NotAQmoeContainer) {
  expect_bad([](Header& h, Data&) { h["__metadata__"].erase("format"); }, {"not a qmoe container"});
  expect_bad([](Header& h, Data&) { h["__metadata__"]["format"] = "gguf"; },
             {"not a qmoe container"});
  expect_bad([](Header& h, Data&) { h["__metadata__"]["format_version"] = "3"; },
             {"format_version", "\"1\" and \"2\""});
  // Version 1 has no header checksum: its key is an unknown reserved key there.
  expect_bad([](Header& h, Data&) { h["__metadata__"]["format_version"] = "1"; },
             {"qmoe.header.xxh3", "reserved"});
  expect_bad([](Header& h, Data&) { h["__metadata__"]["qmoe.future"] = "x"; }, {"qmoe.future"});
  expect_bad([](Header& h, Data&) { rename_tensor(h, "embed", "qmoe.other"); },
             {"tensor 'qmoe.other'", "reserved"});
}

TEST(ContainerErrors, DictionaryMismatch) {
  expect_bad(
      [](Header& h, Data& d) { poke<int32_t>(h, d, "qmoe.dictionary.qmoe-v1", 2 * 777 + 1, -1); },
      {"tensor 'qmoe.dictionary.qmoe-v1'", "entry 777"});
  expect_bad([](Header& h, Data&) { rename_tensor(h, "qmoe.dictionary.qmoe-v1", "dict"); },
             {"tensor 'qmoe.dictionary.qmoe-v1'", "missing"});
  expect_bad([](Header& h, Data&) { h["qmoe.dictionary.qmoe-v1"]["shape"] = {131072}; },
             {"tensor 'qmoe.dictionary.qmoe-v1'", "[65536, 2]"});
}

TEST(ContainerErrors, Checksums) {
  // A changed dense byte is found by verify_checksums and mismatched_checksums().
  TempDir dir;
  const fs::path p = Small().write(dir);
  rewrite(p, [](Header& h, Data& d) { poke<float>(h, d, "embed", 2, 9.0f); });
  const auto c = Container::open(p);
  EXPECT_EQ(c.mismatched_checksums(), (std::vector<std::string>{"embed"}));
  expect_format_error([&] { (void)Container::open(p, {.verify_checksums = true}); },
                      {p.string(), "tensor 'embed'", "checksum mismatch"});
  // Missing, malformed and orphaned checksum keys are errors even without verification.
  expect_bad([](Header& h, Data&) { h["__metadata__"].erase("qmoe.xxh3.m.qmoe_codes"); },
             {"tensor 'm.qmoe_codes'", "no checksum"}, false);
  expect_bad([](Header& h, Data&) { h["__metadata__"]["qmoe.xxh3.embed"] = "ABCDEF0123456789"; },
             {"tensor 'embed'", "16 lowercase hex"}, false);
  expect_bad([](Header& h, Data&) { h["__metadata__"]["qmoe.xxh3.ghost"] = "0123456789abcdef"; },
             {"tensor 'ghost'", "not in the file"}, false);
  // A changed code is caught by the checksum before anything else when verifying.
  expect_bad([](Header& h, Data& d) { poke<uint16_t>(h, d, "m.qmoe_codes", 0, 0); },
             {"checksum mismatch"}, false, {.verify_checksums = true, .validate_codes = false});
}

TEST(ContainerErrors, NameUsedTwice) {
  expect_bad(
      [](Header& h, Data&) {
        rename_tensor(h, "embed", "m");
        h["m"]["dtype"] = "F32";
      },
      {"tensor 'm'", "both"});
}

// ---- sharded -----------------------------------------------------------------------------------

fs::path write_sharded(const TempDir& dir) {
  Small s;
  ContainerWriter w(dir / "sh", {.shard_size = 20});  // {embed} {p} {dictionary, m}
  w.add_dense("embed", DType::kF32, {4}, bytes_of(s.embed));
  w.add_compressed("p", s.p.view(), DType::kF32);
  w.add_compressed("m", s.m.view(), DType::kF32);
  w.finish();
  return dir / "sh";
}

TEST(ContainerErrors, MissingShard) {
  TempDir dir;
  const fs::path out = write_sharded(dir);
  ASSERT_NO_THROW((void)Container::open(out));
  fs::remove(out / "model-00002-of-00003.safetensors");
  expect_format_error(
      [&] { (void)Container::open(out); },
      {"model.safetensors.index.json", "shard 'model-00002-of-00003.safetensors' is missing"});
}

void edit_index(const fs::path& out, const std::function<void(nlohmann::json&)>& fn) {
  auto j = nlohmann::json::parse(read_bytes(out / "model.safetensors.index.json"));
  fn(j);
  const std::string s = j.dump();
  write_bytes(out / "model.safetensors.index.json", Data(s.begin(), s.end()));
}

TEST(ContainerErrors, InconsistentIndex) {
  TempDir dir;
  const fs::path out = write_sharded(dir);
  const fs::path index = out / "model.safetensors.index.json";
  const auto original = read_bytes(index);
  auto restore = [&] { write_bytes(index, original); };

  edit_index(out, [](auto& j) { j["weight_map"]["embed"] = "../elsewhere.safetensors"; });
  expect_format_error([&] { (void)Container::open(out); },
                      {index.string(), "tensor 'embed'", "plain file name"});
  restore();
  edit_index(out, [](auto& j) { j["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"; });
  expect_format_error([&] { (void)Container::open(out); },
                      {index.string(), "tensor 'ghost'", "absent"});
  restore();
  edit_index(out, [](auto& j) { j["weight_map"].erase("m.qmoe_codes"); });
  expect_format_error([&] { (void)Container::open(out); },
                      {"model-00003-of-00003.safetensors", "tensor 'm.qmoe_codes'", "not listed"});
  restore();
  edit_index(
      out, [](auto& j) { j["weight_map"]["p.qmoe_packed"] = "model-00003-of-00003.safetensors"; });
  expect_format_error([&] { (void)Container::open(out); }, {"tensor 'p.qmoe_packed'"});
  restore();
  // embed is shard 1's only tensor: moved to shard 2, nothing vouches for shard 1 any more.
  edit_index(out, [](auto& j) { j["weight_map"]["embed"] = "model-00002-of-00003.safetensors"; });
  expect_format_error([&] { (void)Container::open(out); },
                      {index.string(), "no tensor is listed for shard model-00001-of-00003"});
  restore();
  // An empty weight_map verified as an empty model while its shards sat unread.
  edit_index(out, [](auto& j) { j["weight_map"] = nlohmann::json::object(); });
  expect_format_error([&] { (void)Container::open(out, {.verify_checksums = true}); },
                      {index.string(), "\"weight_map\" is empty"});
  restore();
  // Shard names other than the writer's, and shard counts that disagree.
  edit_index(out, [](auto& j) {
    for (auto& [t, s] : j["weight_map"].items()) {
      if (s == "model-00001-of-00003.safetensors") s = "model-1-of-3.safetensors";
    }
  });
  fs::copy_file(out / "model-00001-of-00003.safetensors", out / "model-1-of-3.safetensors");
  expect_format_error([&] { (void)Container::open(out); },
                      {index.string(), "model-1-of-3.safetensors", "is not model-XXXXX"});
  fs::remove(out / "model-1-of-3.safetensors");
  restore();
  edit_index(out, [](auto& j) { j["weight_map"]["embed"] = "model-00001-of-00004.safetensors"; });
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "counts"});
  restore();
  // The index's metadata must be the shards' global and user metadata.
  edit_index(out, [](auto& j) { j["metadata"]["note"] = "not in the shards"; });
  expect_format_error([&] { (void)Container::open(out); },
                      {"model-00001-of-00003.safetensors", "\"note\"", "is missing"});
  restore();
  edit_index(out, [](auto& j) { j["metadata"]["format_version"] = "1"; });
  expect_format_error([&] { (void)Container::open(out); },
                      {"model-00001-of-00003.safetensors", "\"format_version\" differs"});
  restore();
  edit_index(out, [](auto& j) { j["metadata"]["qmoe.header.xxh3"] = "0000000000000000"; });
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "reserved"});
  restore();
  edit_index(out, [](auto& j) { j["metadata"]["format_version"] = "7"; });
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "format_version"});
  restore();
  edit_index(out, [](auto& j) { j.erase("weight_map"); });
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "weight_map"});
  restore();
  edit_index(out, [](auto& j) { j["weight_map"]["embed"] = 3; });
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "tensor 'embed'"});
  restore();
  write_bytes(index, {'{', '"'});
  expect_format_error([&] { (void)Container::open(out); }, {index.string(), "malformed JSON"});
  restore();
  ASSERT_NO_THROW((void)Container::open(index));
  fs::remove(index);
  expect_format_error([&] { (void)Container::open(out); }, {out.string(), "neither"});
}

// format_version 2: the header checksum covers every tensor entry and every metadata entry, so
// edits that leave the header well formed and the tensor bytes consistent are caught too.
TEST(ContainerErrors, HeaderChecksum) {
  auto expect_caught = [](const std::function<void(Header&, Data&)>& edit,
                          const std::vector<std::string>& parts) {
    TempDir dir;
    const fs::path p = Small().write(dir);
    ASSERT_NO_THROW((void)Container::open(p));
    rewrite(p, edit, /*refresh_header=*/false);
    auto all = parts;
    all.push_back(p.string());
    expect_format_error([&] { (void)Container::open(p); }, all);
  };
  const std::vector<std::string> mismatch = {"header checksum mismatch"};
  // A shape with the same byte size (the 5 x 12 to 5 x 13 of a declaration is the same kind).
  expect_caught([](Header& h, Data&) { h["embed"]["shape"] = {2, 2}; }, mismatch);
  // A matrix declaration that stays valid.
  expect_caught(
      [](Header& h, Data&) {
        h["__metadata__"]["qmoe.matrix.p"] = R"({"codec":"qmoe-p5","shape":[2,7],"dtype":"F16"})";
      },
      mismatch);
  // Two tensors of the same size swapping their bytes: every tensor checksum still matches its
  // (moved) bytes once the keys are swapped too; only the header checksum notices.
  expect_caught(
      [](Header& h, Data&) {
        std::swap(h["embed"]["data_offsets"], h["m.qmoe_row_offsets"]["data_offsets"]);
        std::swap(h["__metadata__"]["qmoe.xxh3.embed"],
                  h["__metadata__"]["qmoe.xxh3.m.qmoe_row_offsets"]);
      },
      mismatch);
  // A user metadata value, a tensor checksum value (not verified by a plain open).
  expect_caught(
      [](Header& h, Data&) {
        h["__metadata__"]["format"] = "qmoe";
        h["__metadata__"]["x"] = "y";
      },
      mismatch);
  expect_caught([](Header& h, Data&) { h["__metadata__"]["qmoe.xxh3.embed"] = "0123456789abcdef"; },
                mismatch);
  expect_caught([](Header& h, Data&) { h["__metadata__"].erase("qmoe.header.xxh3"); },
                {"no header checksum", "format_version 2"});
  expect_caught(
      [](Header& h, Data&) { h["__metadata__"]["qmoe.header.xxh3"] = "ABCDEF0123456789"; },
      {"not 16 lowercase hex digits"});
  // Key order and whitespace are not part of it: a rewrite with the same content still opens.
  TempDir dir;
  const fs::path p = Small().write(dir);
  rewrite(
      p,
      [](Header& h, Data&) {
        Header r = Header::object();
        std::vector<std::string> keys;
        for (auto& [k, v] : h.items()) keys.push_back(k);
        for (auto it = keys.rbegin(); it != keys.rend(); ++it) r[*it] = h[*it];
        h = r;
      },
      /*refresh_header=*/false);
  EXPECT_NO_THROW((void)Container::open(p, {.verify_checksums = true}));
}

// One flipped bit anywhere in the header length or the header of a format_version 2 file: the
// reader refuses the file, or (if the flip changes nothing a reader takes from it) reads exactly
// the same container. With format_version 1 a flipped letter of a metadata value verified OK.
TEST(ContainerErrors, EveryHeaderBitFlipIsCaught) {
  TempDir dir;
  Small s;
  const fs::path good = dir / "good.safetensors";
  {
    ContainerWriter w(good);
    w.set_metadata("note", "golden");
    w.add_dense("embed", DType::kF32, {4}, bytes_of(s.embed));
    w.add_compressed("p", s.p.view(), DType::kF32);
    w.finish();
  }
  const auto full = read_bytes(good);
  uint64_t n;
  std::memcpy(&n, full.data(), 8);
  const Container ref = Container::open(good);
  auto same_as_ref = [&](const Container& c) {
    if (c.names() != ref.names() || c.metadata() != ref.metadata()) return false;
    const DenseEntry *a = c.find_dense("embed"), *b = ref.find_dense("embed");
    if (a == nullptr || a->shape != b->shape || a->dtype != b->dtype ||
        !std::equal(a->bytes.begin(), a->bytes.end(), b->bytes.begin(), b->bytes.end()))
      return false;
    const CompressedEntry *x = c.find_compressed("p"), *y = ref.find_compressed("p");
    return x != nullptr && x->original_shape == y->original_shape &&
           x->original_dtype == y->original_dtype && x->view.codec == y->view.codec &&
           decode(x->view) == decode(y->view);
  };
  const fs::path flipped = dir / "flipped.safetensors";
  write_bytes(flipped, full);
  // The byte is rewritten in place (truncating and rewriting the file each time is slow on
  // file systems that discard freed blocks).
  const int fd = ::open(flipped.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  auto put = [&](size_t i, uint8_t v) { ASSERT_EQ(::pwrite(fd, &v, 1, static_cast<off_t>(i)), 1); };
  int caught = 0, harmless = 0;
  for (size_t i = 0; i < 8 + n; ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      put(i, static_cast<uint8_t>(full[i] ^ (1u << bit)));
      try {
        const Container c = Container::open(flipped, {.verify_checksums = true});
        EXPECT_TRUE(same_as_ref(c))
            << "byte " << i << " bit " << bit << " read as another container";
        ++harmless;
      } catch (const FormatError&) {
        ++caught;
      }
    }
    put(i, full[i]);
  }
  ::close(fd);
  EXPECT_GT(caught, 0);
  RecordProperty("caught", caught);
  RecordProperty("harmless", harmless);
}

TEST(ContainerErrors, EveryTruncationIsRejected) {
  TempDir dir;
  Small s;
  const fs::path good = dir / "p5.safetensors";
  {
    ContainerWriter w(good);
    w.add_dense("embed", DType::kF32, {4}, bytes_of(s.embed));
    w.add_compressed("p", s.p.view(), DType::kF32);
    w.finish();
  }
  const auto full = read_bytes(good);
  const fs::path cut = dir / "cut.safetensors";
  for (size_t n = 0; n < full.size(); ++n) {
    write_bytes(cut, Data(full.begin(), full.begin() + static_cast<int64_t>(n)));
    EXPECT_THROW((void)Container::open(cut), FormatError) << "cut at " << n;
  }
  // The v1 file is 0.5 MiB: cut it at a spread of points, including inside the dictionary.
  const auto v1 = read_bytes(s.write(dir, "v1.safetensors"));
  for (size_t n = 0; n < v1.size(); n += 4099) {
    write_bytes(cut, Data(v1.begin(), v1.begin() + static_cast<int64_t>(n)));
    EXPECT_THROW((void)Container::open(cut), FormatError) << "cut at " << n;
  }
  write_bytes(cut, Data(v1.begin(), v1.end() - 1));
  EXPECT_THROW((void)Container::open(cut), FormatError);
}

// The committed golden files and the container fuzzer's seeds made from them are what the
// generator (format_golden.h, run by format_make_golden) writes today: a change of the writer that
// moves a byte of them fails here until the files are regenerated and committed.
TEST(ContainerGolden, CommittedFilesAreTheGeneratorsOutput) {
  TempDir dir;
  write_format_golden(dir / "golden", dir / "corpus");
  const fs::path src(QMOE_SOURCE_DIR);
  int compared = 0;
  for (const auto& [made, committed] :
       {std::pair{dir / "golden", src / "tests/format/golden"},
        std::pair{dir / "corpus", src / "tests/fuzz/corpus/container"}}) {
    for (const auto& e : fs::recursive_directory_iterator(made)) {
      if (!e.is_regular_file()) continue;
      const fs::path rel = fs::relative(e.path(), made);
      const fs::path c = committed / rel;
      ASSERT_TRUE(fs::exists(c)) << c << " is not committed (run format_make_golden)";
      EXPECT_EQ(read_bytes(e.path()), read_bytes(c)) << c << " differs from the generator's "
                                                     << "output (run format_make_golden)";
      ++compared;
    }
  }
  EXPECT_EQ(compared, 10 + 11);  // valid-p5 and 9 invalid files; their 10 seeds and valid-v1
}

// Committed golden files (tests/format/golden/): a valid qmoe-p5 container whose content is
// known, and invalid files that must be rejected with the message fragment in their name list.
TEST(ContainerGolden, ValidFileDecodesToKnownMatrix) {
  const fs::path g = fs::path(QMOE_SOURCE_DIR) / "tests/format/golden/valid-p5.safetensors";
  ASSERT_TRUE(fs::exists(g)) << g;
  const auto c = Container::open(g, {.verify_checksums = true});
  const auto* e = c.find_compressed("w");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->view.rows, 2);
  EXPECT_EQ(e->view.cols, 7);
  const std::vector<float> expect = {0, -1, 1, 0, 0, 0, 1, 0.5f, 0, 0, -0.5f, 0, 0, 0};
  EXPECT_EQ(decode(e->view), expect);
  ASSERT_NE(c.find_dense("bias"), nullptr);
  EXPECT_EQ(c.metadata().at("note"), "golden");
  EXPECT_EQ(c.format_version(), 2);
}

// A format_version 1 file (no header checksum), as the writer wrote it before version 2: it still
// opens, with every check version 1 defines.
TEST(ContainerGolden, Version1FileStillReads) {
  const fs::path g =
      fs::path(QMOE_SOURCE_DIR) / "tests/format/golden/version1/valid-p5.safetensors";
  ASSERT_TRUE(fs::exists(g)) << g;
  const auto c = Container::open(g, {.verify_checksums = true});
  EXPECT_EQ(c.format_version(), 1);
  EXPECT_EQ(c.metadata().at("format_version"), "1");
  const auto* e = c.find_compressed("w");
  ASSERT_NE(e, nullptr);
  const std::vector<float> expect = {0, -1, 1, 0, 0, 0, 1, 0.5f, 0, 0, -0.5f, 0, 0, 0};
  EXPECT_EQ(decode(e->view), expect);
  EXPECT_EQ(c.metadata().at("note"), "golden");
  EXPECT_TRUE(c.mismatched_checksums().empty());
}

// The writer reproduces the committed golden file (format/SPEC.md 7.1) byte for byte.
TEST(ContainerGolden, WriterReproducesSpecExampleP5) {
  TempDir dir;
  TernaryMatrix t(2, 7);
  t.symbols = {0, 1, 2, 0, 0, 0, 2, 2, 0, 0, 1, 0, 0, 0};
  t.levels = {float_to_bf16(-1), float_to_bf16(1), float_to_bf16(-0.5f), float_to_bf16(0.5f)};
  const std::vector<float> bias = {0.25f, -4.0f};
  ContainerWriter w(dir / "p5.safetensors");
  w.set_metadata("note", "golden");
  w.add_compressed("w", encode_p5(t).view(), DType::kF32);
  w.add_dense("bias", DType::kF32, {2}, bytes_of(bias));
  w.finish();
  EXPECT_EQ(read_bytes(dir / "p5.safetensors"),
            read_bytes(fs::path(QMOE_SOURCE_DIR) / "tests/format/golden/valid-p5.safetensors"));
}

// format/SPEC.md 7.2, checked byte for byte.
TEST(ContainerGolden, SpecExampleV1) {
  TempDir dir;
  TernaryMatrix t(2, 5);
  t.symbols = {0, 1, 0, 0, 2, 0, 0, 0, 0, 0};
  t.levels = {float_to_bf16(-0.5f), float_to_bf16(0.75f), float_to_bf16(-1.0f),
              float_to_bf16(1.0f)};
  const auto c = GreedyV1::get().encode(t);
  EXPECT_EQ(c.codes, (std::vector<uint16_t>{503, 2}));
  EXPECT_EQ(v1_decode_table()[2 * 503], 0x2043);
  EXPECT_EQ(v1_decode_table()[2 * 503 + 1], 3);
  const std::vector<float> b = {0.5f};
  const fs::path p = dir / "v1.safetensors";
  ContainerWriter w(p);
  w.add_compressed("w", c.view(), DType::kF32);
  w.add_dense("b", DType::kF32, {1}, bytes_of(b));
  w.finish();
  const auto bytes = read_bytes(p);
  ASSERT_EQ(bytes.size(), 525108u);
  const std::string header =
      R"({"__metadata__":{"format":"qmoe","format_version":"2","qmoe.header.xxh3":"de143301c30ea58f","qmoe.matrix.w":"{\"codec\":\"qmoe-v1\",\"shape\":[2,5],\"dtype\":\"F32\"}","qmoe.xxh3.b":"c98dd7ed5d5dfd9b","qmoe.xxh3.qmoe.dictionary.qmoe-v1":"19f839bbd9f45b7e","qmoe.xxh3.w.qmoe_codes":"81682cb5221f54e1","qmoe.xxh3.w.qmoe_levels":"36cd7915a40fadc6","qmoe.xxh3.w.qmoe_row_offsets":"f7d0630191d9c911"},"qmoe.dictionary.qmoe-v1":{"dtype":"I32","shape":[65536,2],"data_offsets":[0,524288]},"w.qmoe_row_offsets":{"dtype":"I32","shape":[3],"data_offsets":[524288,524300]},"b":{"dtype":"F32","shape":[1],"data_offsets":[524300,524304]},"w.qmoe_codes":{"dtype":"U16","shape":[2],"data_offsets":[524304,524308]},"w.qmoe_levels":{"dtype":"BF16","shape":[2,2],"data_offsets":[524308,524316]}})"
      "       ";
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 8),
            (std::vector<uint8_t>{0x10, 0x03, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(std::string(bytes.begin() + 8, bytes.begin() + 792), header);
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin() + 792, bytes.begin() + 792 + 16),
            (std::vector<uint8_t>{1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0}));
  const std::vector<uint8_t> tail = {0,    0,    0,    0,    1,    0,    0,    0,    2,    0,
                                     0,    0,    0,    0,    0,    0x3f, 0xf7, 0x01, 0x02, 0x00,
                                     0x00, 0xbf, 0x40, 0x3f, 0x80, 0xbf, 0x80, 0x3f};
  EXPECT_EQ(std::vector<uint8_t>(bytes.end() - 28, bytes.end()), tail);
}

TEST(ContainerGolden, InvalidFilesAreRejected) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"truncated.safetensors", "truncated"},
      {"header-past-end.safetensors", "past the end of the file"},
      {"bad-json.safetensors", "malformed JSON"},
      {"offset-gap.safetensors", "gap"},
      {"offset-overlap.safetensors", "overlap"},
      {"unknown-dtype.safetensors", "unknown dtype"},
      {"padding-symbol.safetensors", "padding"},
      {"nan-level.safetensors", "levels"},
      {"missing-member.safetensors", "is missing"},
  };
  for (const auto& [file, fragment] : cases) {
    const fs::path g = fs::path(QMOE_SOURCE_DIR) / "tests/format/golden/invalid" / file;
    ASSERT_TRUE(fs::exists(g)) << g;
    expect_format_error([&] { (void)Container::open(g); }, {file, fragment});
  }
}

}  // namespace
}  // namespace qmoe::test
