// The qmoe container: a safetensors file (or a set of shards plus an index JSON) holding
// compressed matrices as small groups of typed tensors, the codec dictionaries, and uncompressed
// tensors unchanged. format/SPEC.md specifies it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/core/dtype.h"
#include "qmoe/format/matrix.h"
#include "qmoe/format/safetensors.h"

namespace qmoe {

inline constexpr std::string_view kFormatName = "qmoe";
// The version the writer writes (format/SPEC.md section 10). Version 2 adds the header checksum.
inline constexpr int kFormatVersion = 2;
// The oldest version the reader reads: version 1 files (no header checksum) still open.
inline constexpr int kMinFormatVersion = 1;
// Metadata key of the header checksum (format_version 2): XXH3-64 of the header's canonical form,
// header_digest() of safetensors.h, as 16 lowercase hex digits.
inline constexpr std::string_view kHeaderChecksumKey = "qmoe.header.xxh3";

// Stored tensor names of a compressed matrix W are W + suffix (format/SPEC.md, "Tensor groups").
inline constexpr std::string_view kCodesSuffix = ".qmoe_codes";  // qmoe-v1: U16 [num_codes]
inline constexpr std::string_view kRowOffsetsSuffix = ".qmoe_row_offsets";  // qmoe-v1: I32 [rows+1]
inline constexpr std::string_view kPackedSuffix =
    ".qmoe_packed";  // qmoe-p5: U8 [rows, ceil(cols/5)]
inline constexpr std::string_view kLevelsSuffix = ".qmoe_levels";  // all: BF16 [rows, 2]
// qmoe-g4 (format/SPEC.md section 4.5): U8 [ceil(T/2)], U8 [ceil(N/8)], I32 [ceil(rows/4)+1, 2].
inline constexpr std::string_view kTokensSuffix = ".qmoe_tokens";
inline constexpr std::string_view kKindsSuffix = ".qmoe_kinds";
inline constexpr std::string_view kGroupOffsetsSuffix = ".qmoe_group_offsets";
// Optional global metadata key: the device the codecs were chosen for, "cpu", "gpu" or "any".
inline constexpr std::string_view kTargetKey = "qmoe.target";
// The dictionary tensors' names (codec.h, CodecTraits::dictionary_tensor): the qmoe-v1 decode
// table, I32 [65536, 2], in every file that holds a qmoe-v1 matrix; a qmoe-v2 or qmoe-v3 dictionary
// is stored as its codec's prefix + its id as 16 lowercase hex digits.
inline constexpr std::string_view kV1DictionaryTensor = codec_traits(Codec::kV1).dictionary_tensor;
inline constexpr std::string_view kV2DictionaryPrefix = codec_traits(Codec::kV2).dictionary_tensor;
inline constexpr std::string_view kV3DictionaryPrefix = codec_traits(Codec::kV3).dictionary_tensor;
// Name of the index of a sharded container, and of the single file inside a directory.
inline constexpr std::string_view kIndexFileName = "model.safetensors.index.json";
inline constexpr std::string_view kSingleFileName = "model.safetensors";

// The checksum format of "qmoe.xxh3.<tensor>" metadata: XXH3_64bits (seed 0) of the bytes as 16
// lowercase hex digits.
std::string checksum_hex(std::span<const std::byte> bytes);
// A 64-bit hash as 16 lowercase hex digits, the spelling of checksums and of qmoe-v2 dictionary
// ids (CompressedView::dictionary_id).
std::string hex64(uint64_t h);

// A compressed matrix of the container, with what it was before compression.
struct CompressedEntry {
  std::string name;     // logical name (the original tensor's name)
  CompressedView view;  // zero-copy view into the mapping
  DType original_dtype = DType::kF32;
  std::vector<int64_t> original_shape;  // {rows, cols}
  std::string shard;                    // file the tensor group lives in
};

// A dense (passed-through) tensor of the container.
struct DenseEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
  std::string shard;
};

struct ContainerOpenOptions {
  bool verify_checksums = false;  // hash every tensor (xxh3-64) against the metadata
  bool validate_codes = true;     // full validate() of every compressed matrix
};

// Read side. open() accepts a .safetensors file, an index .json, or a directory holding
// "model.safetensors" or "model.safetensors.index.json". Everything is validated before open()
// returns; errors are FormatError naming the file and tensor. Thread-safe for reading.
class Container {
 public:
  static Container open(const std::filesystem::path& path, const ContainerOpenOptions& opt = {});

  // Global and user metadata (of the first shard, or of the index when sharded), without the
  // "qmoe." bookkeeping entries but with "qmoe.target" when present.
  const std::map<std::string, std::string>& metadata() const;
  // 1 or 2: the format_version of the container's files. Version 1 headers carry no checksum.
  int format_version() const;
  // The "qmoe.target" key, when the file has one.
  std::optional<Target> target() const;
  std::vector<std::string> names() const;                               // logical names, sorted
  const CompressedEntry* find_compressed(std::string_view name) const;  // nullptr if not
  const DenseEntry* find_dense(std::string_view name) const;            // nullptr if not
  const std::vector<CompressedEntry>& compressed() const;
  const std::vector<DenseEntry>& dense() const;
  // The files the container consists of: the index (when sharded) first, then the shards.
  std::vector<std::filesystem::path> files() const;
  // Recomputes every checksum; returns the names of tensors that do not match (empty = sound).
  std::vector<std::string> mismatched_checksums() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

struct ContainerWriteOptions {
  // 0: one file. Otherwise shards of at most about this many bytes (a tensor group is never
  // split), named "model-XXXXX-of-YYYYY.safetensors", plus "model.safetensors.index.json".
  int64_t shard_size = 0;
  // Sharded containers written by several processes together (`qmoe compress` under MPI). Every
  // process adds every tensor, in the same order, with the same metadata, so that all of them
  // place the tensors in the same shards; process `part_rank` of `part_count` writes shard k
  // (0-based) when k % part_count == part_rank, and reads and validates only the tensors of its
  // shards. The shards' intermediate names carry `part_tag` (the same on every process) instead of
  // the process id. Each process calls finish_part(); once every one has succeeded, one of them
  // calls finish(), which renames every shard and writes the index, and the others keep_part().
  int part_count = 1;
  int part_rank = 0;
  std::string part_tag = {};
};

// Write side. `out` is a file path when unsharded, a directory when sharded. Everything is
// written under temporary names and renamed by finish(); destroying without finish() leaves no
// file under a final name. Shards are streamed: memory stays bounded by about one shard.
class ContainerWriter {
 public:
  ContainerWriter(std::filesystem::path out, ContainerWriteOptions opt = {});
  ~ContainerWriter();
  ContainerWriter(const ContainerWriter&) = delete;
  ContainerWriter& operator=(const ContainerWriter&) = delete;

  // User metadata, copied into every shard and the index. Keys "format", "format_version" and
  // keys starting with "qmoe." are reserved (InvalidArgument). When sharded, call it before the
  // first shard is closed (i.e. before adding more than shard_size bytes); later calls throw
  // InvalidArgument.
  void set_metadata(std::string key, std::string value);
  // Records the device the codecs were chosen for ("qmoe.target" in every shard and the index);
  // Target::kAny writes no key (a file without it is meant for any device). Same timing rule as
  // set_metadata().
  void set_target(Target target);
  // Names must be unique across dense and compressed tensors; names starting with "qmoe." or
  // whose last dot-separated part starts with "qmoe_" are reserved (InvalidArgument). The data
  // is copied (into a staging file, not memory). add_compressed() validates the matrix
  // completely (validate()) and throws InvalidArgument if it is malformed. `check`, when given,
  // runs before the data is read (partitioned writing: only where this process writes it), e.g.
  // to verify where the data comes from.
  void add_dense(std::string name, DType dtype, std::vector<int64_t> shape,
                 std::span<const std::byte> data);
  void add_compressed(std::string name, const CompressedView& m, DType original_dtype,
                      const std::function<void()>& check = {});
  std::vector<std::filesystem::path> finish();  // returns the files written
  // Partitioned writing (ContainerWriteOptions::part_count): closes this process's last shard
  // (written and synced under its intermediate name).
  void finish_part();
  // After finish_part() on a process that does not call finish(): its shards stay for the
  // process that does (destroying the writer without it removes them).
  void keep_part();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qmoe
