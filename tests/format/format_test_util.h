// Helpers for the container tests: temporary directories, raw safetensors files, and small
// ternary matrices encoded with the greedy qmoe-v1 rule of format/SPEC.md (independent of the
// encoder module, so these tests depend on qmoe_format only).
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>
#include "random_ternary.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "qmoe/core/bf16.h"
#include "qmoe/format/codec_layout.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/file.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/reference.h"
#include "qmoe/format/safetensors.h"

namespace qmoe::test {

namespace fs = std::filesystem;

// A fresh directory, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "qmoe-format-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& s) const { return path_ / s; }
  // Names of the entries of the directory, sorted.
  std::vector<std::string> list() const { return list_of(path_); }
  static std::vector<std::string> list_of(const fs::path& dir) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  fs::path path_;
};

inline std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A safetensors file from header text (used verbatim, no padding) and data bytes.
inline std::vector<uint8_t> raw_file(const std::string& header, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out;
  out.reserve(8 + header.size() + data.size());
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// Splits a file into its header JSON and data section (no validation beyond what is needed).
inline std::pair<nlohmann::ordered_json, std::vector<uint8_t>> split_file(const fs::path& p) {
  const auto b = read_bytes(p);
  uint64_t n;
  std::memcpy(&n, b.data(), 8);
  const std::string header(b.begin() + 8, b.begin() + 8 + static_cast<int64_t>(n));
  return {nlohmann::ordered_json::parse(header),
          std::vector<uint8_t>(b.begin() + 8 + static_cast<int64_t>(n), b.end())};
}

// Recomputes the header checksum (format_version 2, "qmoe.header.xxh3") of a header that has one,
// so that a test can edit the header and still reach the check it means to exercise. Headers the
// reader refuses before that check (unknown dtypes, non-string metadata, ...) are left alone.
inline void refresh_header_checksum(nlohmann::ordered_json& h) {
  const std::string key(kHeaderChecksumKey);
  if (!h.is_object() || !h.contains("__metadata__") || !h["__metadata__"].is_object() ||
      !h["__metadata__"].contains(key))
    return;
  try {
    std::map<std::string, std::string> md;
    for (const auto& [k, v] : h["__metadata__"].items()) md[k] = v.get<std::string>();
    std::vector<TensorInfo> tensors;
    for (const auto& [name, e] : h.items()) {
      if (name == "__metadata__") continue;
      const auto dt = dtype_from_name(e.at("dtype").get<std::string>());
      if (!dt) return;
      tensors.push_back(TensorInfo{name, *dt, e.at("shape").get<std::vector<int64_t>>(),
                                   e.at("data_offsets").at(0).get<int64_t>(),
                                   e.at("data_offsets").at(1).get<int64_t>()});
    }
    h["__metadata__"][key] = hex64(header_digest(md, tensors, key));
  } catch (const nlohmann::json::exception&) {
  }
}

// Rewrites a file's header (and optionally its data) in place; the header is re-padded to 8 and,
// unless `refresh_header` is false, its header checksum is recomputed.
inline void rewrite(const fs::path& p,
                    const std::function<void(nlohmann::ordered_json&, std::vector<uint8_t>&)>& fn,
                    bool refresh_header = true) {
  auto [h, d] = split_file(p);
  fn(h, d);
  if (refresh_header) refresh_header_checksum(h);
  std::string text = h.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_bytes(p, raw_file(text, d));
}

// Offset of a tensor's bytes within the data section of a file.
inline int64_t data_begin(const fs::path& p, const std::string& tensor) {
  return split_file(p).first[tensor]["data_offsets"][0].get<int64_t>();
}

// Recomputes every "qmoe.xxh3.*" key of a header from the data, so a test can corrupt content
// and still reach the check it means to exercise.
inline void refresh_checksums(nlohmann::ordered_json& h, const std::vector<uint8_t>& d) {
  for (auto& [name, info] : h.items()) {
    if (name == "__metadata__") continue;
    const auto b = info["data_offsets"][0].get<size_t>();
    const auto e = info["data_offsets"][1].get<size_t>();
    h["__metadata__"]["qmoe.xxh3." + name] =
        checksum_hex(std::as_bytes(std::span<const uint8_t>(d.data() + b, e - b)));
  }
}

// Greedy qmoe-v1 encoding (format/SPEC.md 4.1.4): the dictionary is prefix-closed, so the
// longest match is found by extending the current run while the extension is an entry.
class GreedyV1 {
 public:
  GreedyV1() {
    const int32_t* t = v1_decode_table();
    for (int e = 0; e < v1::kEntries; ++e) {
      const auto w0 = static_cast<uint32_t>(t[2 * e]);
      const auto w1 = static_cast<uint32_t>(t[2 * e + 1]);
      const int n = v1::entry_pairs(w0);
      std::string key;
      for (int k = 0; k < n; ++k) {
        const uint32_t w = k < v1::kPairsPerWord ? w0 : w1;
        const int j = k % v1::kPairsPerWord;
        key.push_back(static_cast<char>(v1::pair_s0(w, j) + 3 * v1::pair_s1(w, j)));
      }
      index_.emplace(key, static_cast<uint16_t>(e));
    }
  }

  CompressedMatrix encode(const TernaryMatrix& m) const {
    CompressedMatrix c;
    c.codec = Codec::kV1;
    c.rows = m.rows;
    c.cols = m.cols;
    c.levels = m.levels;
    c.row_offsets.push_back(0);
    for (int64_t r = 0; r < m.rows; ++r) {
      const uint8_t* row = m.symbols.data() + r * m.cols;
      std::string cur;
      for (int64_t p = 0; p < v1::row_pairs(m.cols); ++p) {
        const int s0 = row[2 * p];
        const int s1 = 2 * p + 1 < m.cols ? row[2 * p + 1] : 0;
        const char v = static_cast<char>(s0 + 3 * s1);
        if (!cur.empty() && index_.count(cur + v) == 0) {
          c.codes.push_back(index_.at(cur));
          cur.clear();
        }
        cur.push_back(v);
      }
      if (!cur.empty()) c.codes.push_back(index_.at(cur));
      c.row_offsets.push_back(static_cast<int32_t>(c.codes.size()));
    }
    return c;
  }

  static const GreedyV1& get() {
    static const GreedyV1 g;
    return g;
  }

 private:
  std::map<std::string, uint16_t> index_;
};

inline CompressedMatrix encode_p5(const TernaryMatrix& m) {
  CompressedMatrix c;
  c.codec = Codec::kP5;
  c.rows = m.rows;
  c.cols = m.cols;
  c.levels = m.levels;
  const int64_t nb = p5::row_bytes(m.cols);
  c.packed.assign(static_cast<size_t>(m.rows * nb), 0);
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      int v = 0;
      for (int i = 4; i >= 0; --i) {
        const int64_t col = 5 * b + i;
        v = 3 * v + (col < m.cols ? m.symbols[static_cast<size_t>(r * m.cols + col)] : 0);
      }
      c.packed[static_cast<size_t>(r * nb + b)] = static_cast<uint8_t>(v);
    }
  }
  return c;
}

inline std::vector<float> decode(const CompressedView& v) {
  std::vector<float> out(static_cast<size_t>(v.rows * v.cols));
  decode_ref(v, out.data());
  return out;
}

template <class T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

// Runs fn, expects a FormatError whose message contains every one of `parts`.
inline void expect_format_error(const std::function<void()>& fn,
                                const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no FormatError thrown (expected one mentioning '"
                  << (parts.empty() ? "" : parts[0]) << "')";
  } catch (const FormatError& e) {
    for (const auto& p : parts) EXPECT_THAT(std::string(e.what()), ::testing::HasSubstr(p));
  }
}

// Writes a fixture (Fixture::write(dir) returns the file), edits the file's header and data,
// refreshes the checksums so that only the edit is wrong, and expects Container::open to raise a
// FormatError mentioning every one of `parts` and the file.
template <class Fixture>
void expect_bad_file(
    const std::function<void(nlohmann::ordered_json&, std::vector<uint8_t>&, const Fixture&)>& edit,
    const std::vector<std::string>& parts) {
  TempDir dir;
  Fixture fx;
  const fs::path p = fx.write(dir.path());
  rewrite(p, [&](nlohmann::ordered_json& h, std::vector<uint8_t>& d) {
    edit(h, d, fx);
    refresh_checksums(h, d);
  });
  auto all = parts;
  all.push_back(p.string());
  expect_format_error([&] { (void)Container::open(p); }, all);
}

}  // namespace qmoe::test
