#include <gtest/gtest.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "qmoe/format/codec_layout.h"
#include "qmoe/format/reference.h"

namespace qmoe {
namespace {

// XXH3-64 of the 524288-byte reference table (sha256 c09862c4...ed45), so the check runs even
// where the reference file is not at hand.
constexpr uint64_t kReferenceTableXxh3 = 0x19f839bbd9f45b7eull;

TEST(Dictionary, EqualsReferenceFileByteForByte) {
  const std::filesystem::path ref =
      std::filesystem::path(QMOE_SHARED_DIR) / "reference" / "qmoe_v1_dec_table.i32le.bin";
  if (!std::filesystem::exists(ref)) GTEST_SKIP() << "reference table not found at " << ref;
  std::ifstream f(ref, std::ios::binary);
  std::vector<char> bytes(static_cast<size_t>(v1::kTableBytes));
  f.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_EQ(f.gcount(), v1::kTableBytes);
  EXPECT_EQ(f.peek(), EOF) << "reference file is longer than the table";
  // The file is little endian int32; so is every machine qmoe supports (checked in SPEC.md).
  EXPECT_EQ(0, std::memcmp(bytes.data(), v1_decode_table(), bytes.size()));
  EXPECT_EQ(XXH3_64bits(bytes.data(), bytes.size()), kReferenceTableXxh3);
}

TEST(Dictionary, HashMatchesReference) {
  EXPECT_EQ(XXH3_64bits(v1_decode_table(), static_cast<size_t>(v1::kTableBytes)),
            kReferenceTableXxh3);
}

TEST(Dictionary, DocumentedEntries) {
  const int32_t* t = v1_decode_table();
  auto pairs = [&](int e) { return v1::entry_pairs(static_cast<uint32_t>(t[2 * e])); };
  // Entry 0 = one pair (0,0); entry 1 = two pairs (0,0)(0,0).
  EXPECT_EQ(t[0], 1);
  EXPECT_EQ(t[1], 1);
  EXPECT_EQ(t[2], 2);
  EXPECT_EQ(t[3], 2);
  // Entry 100: 7 pairs, a single low-level symbol at column 3 of the sequence (pair 1, s1).
  EXPECT_EQ(pairs(100), 7);
  const uint32_t w0 = static_cast<uint32_t>(t[200]);
  for (int j = 0; j < 7; ++j) {
    EXPECT_EQ(v1::pair_s0(w0, j), 0) << j;
    EXPECT_EQ(v1::pair_s1(w0, j), j == 1 ? 1 : 0) << j;
  }
}

TEST(Dictionary, WellFormedAndDistinct) {
  const int32_t* t = v1_decode_table();
  std::vector<std::pair<uint32_t, uint32_t>> seen;
  for (int e = 0; e < v1::kEntries; ++e) {
    const uint32_t w0 = static_cast<uint32_t>(t[2 * e]), w1 = static_cast<uint32_t>(t[2 * e + 1]);
    const int n = v1::entry_pairs(w0);
    ASSERT_GE(n, 1);
    ASSERT_LE(n, v1::kMaxPairs);
    ASSERT_EQ(v1::entry_pairs(w1), n) << "both words carry the length";
    for (int k = 0; k < v1::kMaxPairs; ++k) {
      const uint32_t w = k < 7 ? w0 : w1;
      const int j = k % 7;
      if (k >= n) {
        ASSERT_EQ(v1::pair_s0(w, j), 0);
        ASSERT_EQ(v1::pair_s1(w, j), 0);
      } else {
        ASSERT_LE(v1::pair_s0(w, j), 2);
        ASSERT_LE(v1::pair_s1(w, j), 2);
      }
    }
    seen.emplace_back(w0, w1);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(std::adjacent_find(seen.begin(), seen.end()), seen.end()) << "duplicate entries";
}

}  // namespace
}  // namespace qmoe
