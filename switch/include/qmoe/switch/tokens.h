// Token files: pairs of (encoder input ids, decoder target ids), the input of `qmoe eval` and of
// calibration. format/TOKENS.md specifies the file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

namespace qmoe::sw {

struct TokenPairs {
  std::vector<int32_t> encoder_ids;      // all pairs' encoder inputs, concatenated
  std::vector<int64_t> encoder_offsets;  // num_pairs + 1, starts at 0, non-decreasing
  std::vector<int32_t> decoder_targets;  // all pairs' decoder targets (-100: ignored by the loss)
  std::vector<int64_t> decoder_offsets;  // num_pairs + 1

  int64_t num_pairs() const {
    return encoder_offsets.empty() ? 0 : static_cast<int64_t>(encoder_offsets.size()) - 1;
  }
  std::span<const int32_t> encoder(int64_t i) const;
  std::span<const int32_t> decoder(int64_t i) const;
  // Pairs [begin, end) as a new TokenPairs (offsets rebased to 0).
  TokenPairs slice(int64_t begin, int64_t end) const;
  void add(std::span<const int32_t> enc, std::span<const int32_t> dec);

  // Reads and validates a token file: FormatError naming the file (and tensor) when a tensor is
  // missing or of the wrong dtype/rank, offsets are not valid, an encoder sequence is empty, or an
  // id is outside [0, vocab_size) (targets may also be -100). vocab_size 0: ids not range-checked.
  static TokenPairs load(const std::filesystem::path& path, int64_t vocab_size = 0);
  void save(const std::filesystem::path& path) const;
  // Same checks as load() on an in-memory object; `what` names it in errors. A default-constructed
  // object (all vectors empty) is valid and has no pairs.
  void validate(int64_t vocab_size, const std::string& what) const;
};

}  // namespace qmoe::sw
