// The plain safetensors layer: round trips, layout rules, and every malformed-file case of
// format/SPEC.md "Errors a reader must raise" that is not specific to the qmoe container.
#include <numeric>

#include "format_test_util.h"

namespace qmoe::test {
namespace {

using ::testing::HasSubstr;

std::vector<uint8_t> iota_bytes(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

fs::path write_valid(const TempDir& dir) {
  const fs::path p = dir / "a.safetensors";
  SafetensorsWriter w(p);
  const auto a = iota_bytes(3);           // U8 [3]
  const auto b = iota_bytes(4 * 6, 10);   // F32 [2, 3]
  const auto c = iota_bytes(2 * 5, 100);  // BF16 [5]
  const auto d = iota_bytes(8 * 2, 200);  // I64 [2]
  w.add("a", DType::kU8, {3}, std::as_bytes(std::span(a)));
  w.add("b", DType::kF32, {2, 3}, std::as_bytes(std::span(b)));
  w.add("c", DType::kBF16, {5}, std::as_bytes(std::span(c)));
  w.add("d", DType::kI64, {2}, std::as_bytes(std::span(d)));
  w.add("empty", DType::kF32, {0, 7}, {});
  w.set_metadata("k", "v");
  w.finish();
  return p;
}

TEST(Safetensors, DtypeNamesRoundTrip) {
  for (int i = 0; i <= static_cast<int>(DType::kF64); ++i) {
    const auto t = static_cast<DType>(i);
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t) << dtype_name(t);
  }
  EXPECT_EQ(dtype_from_name("bf16"), std::nullopt);
  EXPECT_EQ(dtype_from_name("F8_E4M3"), std::nullopt);
}

// write_file_atomic(): the content under the name, replacing what was there; a folder that is not
// there is an error naming the file, and no temporary file is left anywhere.
TEST(Safetensors, WriteFileAtomicReplacesOrLeavesNothing) {
  TempDir dir;
  const fs::path p = dir / "r.json";
  write_file_atomic(p, "first");
  write_file_atomic(p, std::string("sec\0nd", 6));
  EXPECT_EQ(read_regular_file(p, 100), std::string("sec\0nd", 6));
  try {
    write_file_atomic(dir / "missing" / "x.json", "x");
    ADD_FAILURE() << "wrote into a folder that does not exist";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.json"), std::string::npos) << e.what();
  }
  int files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++files;
  EXPECT_EQ(files, 1);
}

// to_float(): every float type widened exactly (F64 rounded), from unaligned bytes; other types
// refused.
TEST(Safetensors, ToFloatWidensEveryFloatType) {
  const float want[] = {0.0f, -1.5f, 3.140625f, -0.0f, 65504.0f, 1.0f / 1024};
  constexpr size_t n = sizeof want / sizeof want[0];
  std::vector<std::byte> buf(1 + 8 * n);
  float got[n];
  for (const DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64}) {
    ASSERT_TRUE(is_float_dtype(t));
    const int64_t es = dtype_size(t);
    for (size_t i = 0; i < n; ++i) {
      std::byte* p = buf.data() + 1 + es * static_cast<int64_t>(i);  // misaligned on purpose
      if (t == DType::kF32) std::memcpy(p, &want[i], 4);
      if (t == DType::kF64) {
        const double d = want[i];
        std::memcpy(p, &d, 8);
      }
      if (t == DType::kF16 || t == DType::kBF16) {
        const uint16_t h = t == DType::kF16 ? float_to_fp16(want[i]) : float_to_bf16(want[i]);
        std::memcpy(p, &h, 2);
      }
    }
    to_float(t, std::span<const std::byte>(buf.data() + 1, static_cast<size_t>(es) * n), got);
    for (size_t i = 0; i < n; ++i) {
      // 65504 is not a bf16 value: bf16 rounds it to 65536.
      const float w = t == DType::kBF16 ? bf16_to_float(float_to_bf16(want[i])) : want[i];
      EXPECT_EQ(std::memcmp(&got[i], &w, 4), 0) << dtype_name(t) << " " << i << ": " << got[i];
    }
  }
  EXPECT_FALSE(is_float_dtype(DType::kI32));
  EXPECT_THROW(to_float(DType::kI32, std::span<const std::byte>(buf.data(), 8), got),
               InvalidArgument);
}

TEST(Safetensors, ErrorContext) {
  EXPECT_EQ(error_context("f", "t", "w"), "f: tensor 't': w");
  EXPECT_EQ(error_context("f", "", "w"), "f: w");
  EXPECT_EQ(error_context("", "t", ""), "tensor 't'");
}

TEST(Safetensors, RoundTripLayoutAndAlignment) {
  TempDir dir;
  const fs::path p = write_valid(dir);
  const auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.metadata().at("k"), "v");
  ASSERT_EQ(f.tensors().size(), 5u);
  // Widest element type first, then arrival order.
  std::vector<std::string> order;
  for (const auto& t : f.tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"d", "b", "empty", "c", "a"}));
  for (const auto& t : f.tensors()) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f.bytes(t).data()) % dtype_size(t.dtype), 0u) << t.name;
  }
  const auto b = f.bytes(*f.find("b"));
  EXPECT_EQ(std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(b.data()),
                                 reinterpret_cast<const uint8_t*>(b.data()) + b.size()),
            iota_bytes(24, 10));
  EXPECT_EQ(f.find("b")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.find("b")->numel(), 6);
  EXPECT_EQ(f.find("empty")->nbytes(), 0);
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_EQ(f.as<float>(*f.find("b"), DType::kF32).size(), 6u);
  expect_format_error([&] { (void)f.as<int32_t>(*f.find("b"), DType::kI32); },
                      {p.string(), "'b'", "dtype is F32"});

  // Header length is a multiple of 8, padded with spaces.
  const auto raw = read_bytes(p);
  uint64_t n;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(raw[8], '{');
  EXPECT_TRUE(raw[8 + n - 1] == '}' || raw[8 + n - 1] == ' ');
}

TEST(Safetensors, SizeBytesMatchesFile) {
  TempDir dir;
  const fs::path p = dir / "s.safetensors";
  SafetensorsWriter w(p);
  const auto a = iota_bytes(13);
  w.add("a", DType::kU8, {13}, std::as_bytes(std::span(a)));
  w.set_metadata("m", "x");
  const int64_t expect = w.size_bytes();
  w.finish();
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(p)), expect);
}

TEST(Safetensors, WriterRejectsBadArguments) {
  TempDir dir;
  SafetensorsWriter w(dir / "w.safetensors");
  const auto a = iota_bytes(4);
  EXPECT_THROW(w.add("a", DType::kF32, {2}, std::as_bytes(std::span(a))), InvalidArgument);
  EXPECT_THROW(w.add("a", DType::kU8, {-4}, std::as_bytes(std::span(a))), InvalidArgument);
  EXPECT_THROW(w.add("__metadata__", DType::kU8, {4}, std::as_bytes(std::span(a))),
               InvalidArgument);
  w.add("a", DType::kU8, {4}, std::as_bytes(std::span(a)));
  EXPECT_THROW(w.add("a", DType::kU8, {4}, std::as_bytes(std::span(a))), InvalidArgument);
  EXPECT_THROW(w.add("big", DType::kF64, {int64_t{1} << 40, int64_t{1} << 40}, {}),
               InvalidArgument);
}

TEST(Safetensors, AtomicWriteLeavesNothingWithoutFinish) {
  TempDir dir;
  {
    SafetensorsWriter w(dir / "x.safetensors");
    const auto a = iota_bytes(16);
    w.add("a", DType::kU8, {16}, std::as_bytes(std::span(a)));
  }
  EXPECT_TRUE(dir.list().empty());
  // An existing file under the final name is kept intact until finish() replaces it.
  write_bytes(dir / "y.safetensors", {1, 2, 3});
  {
    SafetensorsWriter w(dir / "y.safetensors");
    const auto a = iota_bytes(16);
    w.add("a", DType::kU8, {16}, std::as_bytes(std::span(a)));
  }
  EXPECT_EQ(read_bytes(dir / "y.safetensors"), (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_EQ(dir.list(), (std::vector<std::string>{"y.safetensors"}));
}

TEST(Safetensors, AcceptsWhatTheReferenceAccepts) {
  TempDir dir;
  const fs::path p = dir / "r.safetensors";
  // Unpadded header, leading whitespace, null metadata, extra tensor fields, unsorted offsets,
  // zero-size tensors sharing an offset, a scalar.
  write_bytes(
      p,
      raw_file(R"( {"__metadata__":null,"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2],"x":1},)"
               R"("a":{"dtype":"U8","shape":[],"data_offsets":[0,1]},)"
               R"("z0":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},)"
               R"("z1":{"dtype":"F32","shape":[3,0],"data_offsets":[2,2]}})",
               {7, 9}));
  const auto f = SafetensorsFile::open(p);
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.tensors()[0].name, "a");
  EXPECT_EQ(f.find("a")->numel(), 1);
  EXPECT_EQ(static_cast<uint8_t>(f.bytes(*f.find("b"))[0]), 9);
}

struct BadCase {
  const char* name;
  std::string header;
  std::vector<uint8_t> data;
  std::vector<std::string> parts;  // expected in the message (besides the file name)
};

class SafetensorsBadHeader : public ::testing::TestWithParam<BadCase> {};

TEST_P(SafetensorsBadHeader, IsFormatErrorNamingFileAndTensor) {
  TempDir dir;
  const fs::path p = dir / "bad.safetensors";
  write_bytes(p, raw_file(GetParam().header, GetParam().data));
  auto parts = GetParam().parts;
  parts.push_back(p.string());
  expect_format_error([&] { (void)SafetensorsFile::open(p); }, parts);
}

const std::string kU8 = R"("dtype":"U8","shape":[2],)";

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadHeader,
    ::testing::Values(
        BadCase{"not_json", "{\"a\": ", {}, {"malformed JSON"}},
        BadCase{"garbage", "\x01\x02\xff", {}, {"malformed JSON"}},
        BadCase{"array", "[]", {}, {"not a JSON object"}},
        BadCase{"bad_utf8", "{\"a\xff\":1}", {}, {"malformed JSON"}},
        BadCase{
            "duplicate_key",
            "{\"a\":{" + kU8 + R"("data_offsets":[0,2]},"a":{)" + kU8 + R"("data_offsets":[0,2]}})",
            {1, 2},
            {"duplicate key"}},
        BadCase{"deep", std::string(100, '[') + std::string(100, ']'), {}, {"nested deeper"}},
        BadCase{"entry_not_object", R"({"a":[1]})", {}, {"'a'", "not a JSON object"}},
        BadCase{"unknown_dtype",
                R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "unknown dtype"}},
        BadCase{"missing_dtype",
                R"({"a":{"shape":[2],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "dtype"}},
        BadCase{"missing_shape",
                R"({"a":{"dtype":"U8","data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "shape"}},
        BadCase{"negative_dim",
                R"({"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "non-negative"}},
        BadCase{"float_dim",
                R"({"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "non-negative"}},
        BadCase{"huge_dim",
                R"({"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "non-negative"}},
        BadCase{"overflow_numel",
                R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})",
                {},
                {"'a'", "overflow"}},
        BadCase{"overflow_bytes",
                R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})",
                {},
                {"'a'", "overflow"}},
        BadCase{"offsets_not_pair",
                R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}})",
                {1, 2},
                {"'a'", "data_offsets"}},
        BadCase{"offsets_reversed",
                R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}})",
                {1, 2},
                {"'a'", "end before"}},
        BadCase{"size_mismatch",
                R"({"a":{"dtype":"U16","shape":[2],"data_offsets":[0,2]}})",
                {1, 2},
                {"'a'", "needs 4"}},
        BadCase{"out_of_range",
                R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                {1, 2},
                {"'a'", "past the end"}},
        BadCase{
            "far_out_of_range",
            R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[9223372036854775806,9223372036854775808]}})",
            {1, 2},
            {"'a'", "non-negative"}},
        BadCase{"gap",
                R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                {1, 2},
                {"'a'", "gap"}},
        BadCase{
            "gap_between",
            R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}})",
            {1, 2, 3},
            {"'b'", "gap"}},
        BadCase{
            "overlap",
            R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
            {1, 2, 3},
            {"'b'", "overlap"}},
        BadCase{
            "same_range",
            R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
            {1, 2},
            {"overlap"}},
        BadCase{"trailing_bytes",
                R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                {1, 2, 3},
                {"trailing"}},
        BadCase{"metadata_not_strings", R"({"__metadata__":{"k":1}})", {}, {"not a string"}},
        BadCase{"metadata_array", R"({"__metadata__":[]})", {}, {"__metadata__"}},
        BadCase{"trailing_nul", std::string("{}\0\0", 4), {}, {"malformed JSON"}},
        // A UTF-8 byte-order mark is not JSON whitespace (nlohmann's parser would skip it).
        BadCase{"byte_order_mark", "\xEF\xBB\xBF{}", {}, {"byte-order mark"}},
        BadCase{"byte_order_mark_after_space", " \xEF\xBB\xBF{}", {}, {"malformed JSON"}},
        // U+0000 spelled as an escape: names and keys are C strings to many tools.
        BadCase{"nul_in_tensor_name",
                "{\"a\\u0000b\":{" + kU8 + R"("data_offsets":[0,2]}})",
                {1, 2},
                {"U+0000"}},
        BadCase{"nul_in_metadata_key", R"({"__metadata__":{"k\u0000":"v"}})", {}, {"U+0000"}},
        BadCase{"nul_in_metadata_value", R"({"__metadata__":{"k":"v\u0000"}})", {}, {"U+0000"}},
        BadCase{"nul_in_dtype",
                R"({"a":{"dtype":"U8\u0000","shape":[2],"data_offsets":[0,2]}})",
                {1, 2},
                {"U+0000"}}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

TEST(Safetensors, TooShortFiles) {
  TempDir dir;
  const fs::path p = dir / "short.safetensors";
  for (size_t n = 0; n < 8; ++n) {
    write_bytes(p, std::vector<uint8_t>(n, 0));
    expect_format_error([&] { (void)SafetensorsFile::open(p); }, {p.string(), "truncated"});
  }
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir dir;
  const fs::path p = dir / "long.safetensors";
  auto b = raw_file("{}", {});
  b[0] = 3;  // claims 3 bytes, 2 present
  write_bytes(p, b);
  expect_format_error([&] { (void)SafetensorsFile::open(p); },
                      {p.string(), "past the end of the file"});
  const uint64_t huge = ~uint64_t{0};
  std::memcpy(b.data(), &huge, 8);
  write_bytes(p, b);
  expect_format_error([&] { (void)SafetensorsFile::open(p); }, {p.string(), "exceeds the limit"});
  const uint64_t just_over = 100'000'001;
  std::memcpy(b.data(), &just_over, 8);
  write_bytes(p, b);
  expect_format_error([&] { (void)SafetensorsFile::open(p); }, {p.string(), "exceeds the limit"});
}

TEST(Safetensors, MissingFileAndDirectory) {
  TempDir dir;
  expect_format_error([&] { (void)SafetensorsFile::open(dir / "absent.safetensors"); },
                      {"absent.safetensors"});
  expect_format_error([&] { (void)SafetensorsFile::open(dir.path()); },
                      {"not a regular file (a directory)"});
}

// A named pipe nobody writes to: opening it for reading would block forever. It is refused
// before it is opened (the test would hang otherwise; ctest's timeout makes that a failure).
TEST(Safetensors, NamedPipeIsRefusedWithoutBlocking) {
  TempDir dir;
  const fs::path fifo = dir / "pipe.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_format_error([&] { (void)SafetensorsFile::open(fifo); },
                      {fifo.string(), "not a regular file (a named pipe)"});
  expect_format_error([&] { (void)read_regular_file(fifo, 1 << 20); },
                      {fifo.string(), "a named pipe"});
  expect_format_error([&] { (void)SafetensorsFile::open("/dev/null"); },
                      {"/dev/null", "a character device"});
}

TEST(Safetensors, ReadRegularFileBoundsTheSize) {
  TempDir dir;
  write_bytes(dir / "f.json", std::vector<uint8_t>(100, ' '));
  EXPECT_EQ(read_regular_file(dir / "f.json", 100).size(), 100u);
  expect_format_error([&] { (void)read_regular_file(dir / "f.json", 99); },
                      {"f.json", "larger than the limit"});
}

// A mapped file truncated in place by another program: reading a page past the new end raises
// SIGBUS. With the handler of file.h the process ends with a message naming the file and exit
// code 2, and the temporary files of unfinished writers are removed first.
TEST(SafetensorsDeathTest, TruncatedMappedFileEndsWithAMessageNamingIt) {
  // "fast" death tests fork without exec: the child sees this test's files under the same names.
  GTEST_FLAG_SET(death_test_style, "fast");
  TempDir dir;
  const fs::path p = dir / "big.safetensors";
  const std::vector<float> data(1 << 20, 1.0f);  // 4 MiB: the tail is pages past the cut
  {
    SafetensorsWriter w(p);
    w.add("x", DType::kF32, {1 << 20}, std::as_bytes(std::span(data)));
    w.finish();
  }
  const fs::path out = dir / "out";
  EXPECT_EXIT(
      {
        install_mapped_file_fault_handler();
        const auto f = SafetensorsFile::open(p);
        // A sharded writer with one shard closed under its intermediate name.
        ContainerWriter w(out, {.shard_size = 16});
        w.add_dense("a", DType::kF32, {1 << 10}, std::as_bytes(std::span(data).first(1 << 10)));
        w.add_dense("b", DType::kF32, {1 << 10}, std::as_bytes(std::span(data).first(1 << 10)));
        if (::truncate(p.c_str(), 4096) != 0) std::abort();
        const auto bytes = f.bytes(*f.find("x"));
        volatile float sum = 0;
        for (size_t i = 0; i < bytes.size(); i += 4096) sum = sum + static_cast<float>(bytes[i]);
        std::abort();  // not reached: the read past the new end faults
      },
      ::testing::ExitedWithCode(2), p.string() + ": the mapped file could not be read any more");
  // The closed shard of the writer in the child was removed by the handler.
  EXPECT_EQ(TempDir::list_of(out), std::vector<std::string>{});
}

// Every proper prefix of a valid file is rejected cleanly (no crash, no out-of-bounds read: the
// ASan build checks the latter).
TEST(Safetensors, EveryTruncationIsRejected) {
  TempDir dir;
  const auto full = read_bytes(write_valid(dir));
  const fs::path p = dir / "cut.safetensors";
  for (size_t n = 0; n < full.size(); ++n) {
    write_bytes(p, std::vector<uint8_t>(full.begin(), full.begin() + static_cast<int64_t>(n)));
    EXPECT_THROW((void)SafetensorsFile::open(p), FormatError) << "cut at " << n;
  }
}

TEST(Safetensors, MisalignedTypedViewIsRejected) {
  TempDir dir;
  const fs::path p = dir / "mis.safetensors";
  // Valid safetensors (the reference implementation accepts it), but the F32 tensor starts at
  // data offset 1: raw bytes are available, a typed view is not.
  std::string h =
      R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}})";
  h.append((8 - h.size() % 8) % 8, ' ');  // data section 8-aligned, so "a" is at 8k + 1
  write_bytes(p, raw_file(h, {0, 0, 0, 128, 63}));
  const auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.bytes(*f.find("a")).size(), 4u);
  expect_format_error([&] { (void)f.as<float>(*f.find("a"), DType::kF32); }, {"'a'", "aligned"});
}

}  // namespace
}  // namespace qmoe::test
