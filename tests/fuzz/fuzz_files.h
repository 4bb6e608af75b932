// Fuzz inputs that stand for a folder of files (a checkpoint: config.json, an index, shards; a
// sharded container), and the structure-aware mutator that edits them one file at a time.
//
// Layout: the 8 bytes "QMOEDIR1", then records
//   u8 name length (1..64), the name, u32 little-endian content length, the content.
// Names are written as given when they are plain file names (letters, digits, '.', '_', '-';
// not "." or ".."), else the record is skipped. Trailing bytes that do not form a record are
// ignored.
#pragma once

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace qmoe::fuzz {

inline constexpr std::string_view kDirMagic = "QMOEDIR1";

struct File {
  std::string name;
  std::string data;
};

inline bool is_dir_input(const uint8_t* d, size_t n) {
  return n >= kDirMagic.size() && std::memcmp(d, kDirMagic.data(), kDirMagic.size()) == 0;
}

inline std::vector<File> parse_files(const uint8_t* d, size_t n) {
  std::vector<File> out;
  size_t p = kDirMagic.size();
  while (p < n) {
    const size_t len = d[p++];
    if (len == 0 || p + len + 4 > n) break;
    File f;
    f.name.assign(reinterpret_cast<const char*>(d + p), len);
    p += len;
    uint32_t size;
    std::memcpy(&size, d + p, 4);
    p += 4;
    if (size > n - p) break;
    f.data.assign(reinterpret_cast<const char*>(d + p), size);
    p += size;
    out.push_back(std::move(f));
  }
  return out;
}

inline std::string serialize_files(const std::vector<File>& files) {
  std::string s(kDirMagic);
  for (const File& f : files) {
    const size_t len = std::min<size_t>(std::max<size_t>(f.name.size(), 1), 64);
    s.push_back(static_cast<char>(len));
    s.append(f.name.empty() ? std::string("x") : f.name.substr(0, len));
    const auto size = static_cast<uint32_t>(f.data.size());
    s.append(reinterpret_cast<const char*>(&size), 4);
    s.append(f.data);
  }
  return s;
}

inline bool plain_name(const std::string& n) {
  if (n.empty() || n == "." || n == "..") return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

// A directory of this process (in /dev/shm when there is one: files are rewritten on every run).
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/qmoe-fuzz-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) __builtin_trap();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return std::filesystem::path(tmpl);
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& p, const std::string& data) {
  const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) __builtin_trap();
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w <= 0) __builtin_trap();
    done += static_cast<size_t>(w);
  }
  ::close(fd);
}

// Empties `dir` and writes the files with plain names into it (a later file of the same name
// replaces an earlier one).
inline void write_files(const std::filesystem::path& dir, const std::vector<File>& files) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    std::filesystem::remove_all(e.path(), ec);
  for (const File& f : files) {
    if (plain_name(f.name)) write_file(dir / f.name, f.data);
  }
}

// Rewrites the header checksum (format/SPEC.md 2.6) of a qmoe container file in place so that a
// mutated header still reaches the checks behind it: when the file parses as safetensors and its
// header spells the key as "qmoe.header.xxh3":"<16 characters>", those 16 characters become the
// checksum of what the reader parsed. Returns whether it rewrote anything.
inline bool repair_header_checksum(const std::filesystem::path& p) {
  std::optional<SafetensorsFile> f;
  try {
    f = SafetensorsFile::open(p);
  } catch (const Error&) {
    return false;
  }
  const std::string want = hex64(header_digest(f->metadata(), f->tensors(), kHeaderChecksumKey));
  f.reset();
  const int fd = ::open(p.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  uint64_t n = 0;
  bool done = false;
  if (::pread(fd, &n, 8, 0) == 8 && n <= (uint64_t{1} << 24)) {
    std::string header(n, '\0');
    if (::pread(fd, header.data(), n, 8) == static_cast<ssize_t>(n)) {
      const std::string key = "\"" + std::string(kHeaderChecksumKey) + "\":\"";
      const size_t at = header.find(key);
      if (at != std::string::npos && at + key.size() + 17 <= header.size() &&
          header[at + key.size() + 16] == '"') {
        done = ::pwrite(fd, want.data(), 16, static_cast<off_t>(8 + at + key.size())) == 16;
      }
    }
  }
  ::close(fd);
  return done;
}

// A number from the edges of the ranges readers check.
inline std::string interesting_number(std::minstd_rand& rng) {
  static const char* const kNumbers[] = {"0",
                                         "1",
                                         "2",
                                         "3",
                                         "7",
                                         "8",
                                         "-1",
                                         "255",
                                         "256",
                                         "65535",
                                         "65536",
                                         "2147483646",
                                         "2147483647",
                                         "2147483648",
                                         "4294967295",
                                         "4294967296",
                                         "9223372036854775807",
                                         "9223372036854775808",
                                         "18446744073709551615",
                                         "18446744073709551616",
                                         "4611686018427387912",
                                         "1e308",
                                         "1.5",
                                         "-0"};
  return kNumbers[rng() % (sizeof kNumbers / sizeof kNumbers[0])];
}

// Replaces one run of digits of `text` (from `begin`) by an interesting number.
inline bool tweak_number(std::string& text, size_t begin, std::minstd_rand& rng) {
  std::vector<size_t> starts;
  for (size_t i = begin; i < text.size(); ++i) {
    const bool digit = text[i] >= '0' && text[i] <= '9';
    if (digit && (i == begin || !(text[i - 1] >= '0' && text[i - 1] <= '9'))) starts.push_back(i);
  }
  if (starts.empty()) return false;
  const size_t a = starts[rng() % starts.size()];
  size_t b = a;
  while (b < text.size() && text[b] >= '0' && text[b] <= '9') ++b;
  text.replace(a, b - a, interesting_number(rng));
  return true;
}

// The same inside the JSON header of a safetensors file (the length prefix follows).
inline bool tweak_header_number(std::string& file, std::minstd_rand& rng) {
  if (file.size() < 8) return false;
  uint64_t n;
  std::memcpy(&n, file.data(), 8);
  if (n > file.size() - 8) return false;
  std::string header = file.substr(8, n);
  if (!tweak_number(header, 0, rng)) return false;
  const uint64_t m = header.size();
  file = std::string(reinterpret_cast<const char*>(&m), 8) + header + file.substr(8 + n);
  return true;
}

// Structure-aware mutation of a folder input: one file's content (libFuzzer's byte mutations,
// or a number of a JSON file or of a safetensors header replaced by an edge value), its name, or
// the set of files (one dropped, one copied under another file's name). Falls back to plain byte
// mutation for inputs that are not folders.
inline size_t mutate_dir(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  if (!is_dir_input(data, size)) {
    // One file: sometimes a number of its header, else libFuzzer's own mutations.
    std::minstd_rand rng(seed);
    if (rng() % 4 == 0) {
      std::string file(reinterpret_cast<const char*>(data), size);
      if (tweak_header_number(file, rng) && file.size() <= max_size) {
        std::memcpy(data, file.data(), file.size());
        return file.size();
      }
    }
    return LLVMFuzzerMutate(data, size, max_size);
  }
  std::vector<File> files = parse_files(data, size);
  if (files.empty()) return LLVMFuzzerMutate(data, size, max_size);
  std::minstd_rand rng(seed);
  File& f = files[rng() % files.size()];
  switch (rng() % 10) {
    case 0:
      if (!tweak_number(f.data, 0, rng)) f.data.clear();
      break;
    case 1:
      if (!tweak_header_number(f.data, rng)) f.data.resize(f.data.size() / 2);
      break;
    case 2: {  // the name
      f.name.resize(64);
      const size_t n = LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(f.name.data()),
                                        std::min<size_t>(f.name.find('\0'), 64), 64);
      f.name.resize(n);
      break;
    }
    case 3:
      if (files.size() > 1) files.erase(files.begin() + static_cast<long>(rng() % files.size()));
      break;
    case 4: {  // one file's content under another's name (a shard standing for another, ...)
      const File& g = files[rng() % files.size()];
      f.data = g.data;
      break;
    }
    default: {
      const size_t room = max_size > size ? max_size - size : 0;
      std::string d = f.data;
      d.resize(d.size() + std::min<size_t>(room, 256));
      d.resize(LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(d.data()), f.data.size(), d.size()));
      f.data = std::move(d);
      break;
    }
  }
  const std::string out = serialize_files(files);
  if (out.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, out.data(), out.size());
  return out.size();
}

}  // namespace qmoe::fuzz
