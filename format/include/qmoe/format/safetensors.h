// Plain safetensors files: a validating mmap reader and an atomic writer. The qmoe container
// (container.h) is built on these; so are Hessian files and checkpoint loading.
//
// File layout (safetensors): u64 little-endian header size N, N bytes of JSON header
// {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...},
// then the data; offsets are relative to the first data byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/core/dtype.h"
#include "qmoe/format/error.h"

namespace qmoe {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t begin = 0;  // data offsets, relative to the first data byte
  int64_t end = 0;
  int64_t numel() const;
  int64_t nbytes() const { return end - begin; }
};

// A read-only, mmapped, fully validated safetensors file. open() checks, before returning: the
// header size against the file size, the JSON, every dtype, shape (no overflow, byte size equal
// to numel * element size), and that the data offsets tile the data section exactly (no gaps,
// overlaps or out-of-range offsets). Every error is a FormatError naming the file (and tensor).
// Cheap to copy (shares the mapping); thread-safe for reading.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::filesystem::path& path() const;
  const std::map<std::string, std::string>& metadata() const;
  // Tensors in data-offset order.
  const std::vector<TensorInfo>& tensors() const;
  // nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
  // Raw bytes of a tensor (zero-copy view into the mapping).
  std::span<const std::byte> bytes(const TensorInfo& t) const;
  // Typed view; throws FormatError if the stored dtype is not `expected`.
  template <class T>
  std::span<const T> as(const TensorInfo& t, DType expected) const {
    check_dtype(t, expected);
    auto b = bytes(t);
    return {reinterpret_cast<const T*>(b.data()), b.size() / sizeof(T)};
  }

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
  void check_dtype(const TensorInfo& t, DType expected) const;
};

// The XXH3-64 (seed 0) of the canonical form of a header (format/SPEC.md 2.6): every metadata
// entry except the one keyed `exclude_key`, in increasing byte order of the keys, then every
// tensor's name, dtype, shape and data offsets, in increasing byte order of the names; strings
// are length-prefixed. It does not depend on how the JSON is spelled (whitespace, key order,
// escapes), only on what a reader takes from it.
uint64_t header_digest(const std::map<std::string, std::string>& metadata,
                       const std::vector<TensorInfo>& tensors, std::string_view exclude_key);

// Writes one safetensors file atomically: data goes to "<path>.tmp.<pid>", which is renamed to
// `path` by finish(). Destroying the writer without finish() removes the temporary file, so an
// interrupted run never leaves a partial file under the final name. Tensors are laid out with
// the widest element types first, so that every tensor is aligned to its element size; the
// header is padded with spaces to a multiple of 8 bytes.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::filesystem::path path);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  void set_metadata(std::string key, std::string value);
  // finish() stores, under metadata key `key`, header_digest() of the final header (all other
  // metadata and every tensor's entry) as 16 lowercase hex digits. Empty: no such entry.
  void set_header_checksum_key(std::string key);
  // Copies the bytes (size must be numel(shape) * dtype_size(dtype)). Names must be unique.
  void add(std::string name, DType dtype, std::vector<int64_t> shape,
           std::span<const std::byte> data);
  // Total bytes the file will have.
  int64_t size_bytes() const;
  void finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qmoe
