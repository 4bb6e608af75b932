// The codecs of a compressed matrix and their traits: the one list of codecs (format/SPEC.md
// section 4, "Codecs"). Code that handles every codec asks this table (names, stored members,
// dictionaries, which devices run a codec natively) instead of spelling the codecs out.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace qmoe {

// In the order codecs are listed in messages and summaries; stored by name, never by number.
enum class Codec : uint8_t { kV1, kV2, kV3, kG4, kP5 };

// The device a file's codecs were chosen for (format/SPEC.md 2.2, "qmoe.target"): "any" (a file
// for every device: the default), "cpu" or "gpu". The encoder's automatic codec choice follows it
// (encode.h).
enum class Target : uint8_t { kAny, kCpu, kGpu };

// The stored members of a compressed matrix W: tensors named W + suffix (format/SPEC.md, "Tensor
// groups"), and the CompressedView field each one fills.
enum class Member : uint8_t {
  kCodes,
  kRowOffsets,
  kPacked,
  kGroupOffsets,
  kTokens,
  kKinds,
  kLevels
};

// Where a codec's matrices find their dictionary.
enum class DictionaryKind : uint8_t {
  kNone,     // no dictionary
  kBuiltin,  // one dictionary fixed by the format, stored once in every file that uses it
  kFitted,   // fitted to the weights and shared by the matrices encoded with it: stored under
             // dictionary_tensor + its id (16 lowercase hex digits), named by each matrix
};

struct CodecTraits {
  Codec codec;
  std::string_view name;     // as stored in files, e.g. "qmoe-v1"
  std::string_view summary;  // one line, for help texts and listings
  // The members in the order a writer stores them; every codec ends with kLevels.
  std::array<Member, 4> member_list;
  size_t member_count;
  DictionaryKind dictionary;
  // kBuiltin: the dictionary tensor's name; kFitted: the prefix of its name; kNone: empty.
  std::string_view dictionary_tensor;
  // Rows a row slice must keep together (qmoe-v3 codes rows in pairs, qmoe-g4 in groups of 4).
  int row_unit;
  // Whether decoder_cuda runs the codec as stored; other codecs are transcoded on upload.
  bool gpu_native;
  // The target for which `--codec auto` picks this codec, if any.
  std::optional<Target> auto_for;

  constexpr std::span<const Member> members() const { return {member_list.data(), member_count}; }
  constexpr bool stores(Member m) const {
    for (size_t i = 0; i < member_count; ++i) {
      if (member_list[i] == m) return true;
    }
    return false;
  }
  // A codeword stream: codes and row offsets (qmoe-v1, qmoe-v2, qmoe-v3).
  constexpr bool has_codes() const { return stores(Member::kCodes); }
  // A dictionary fitted to the weights and named by each matrix (qmoe-v2, qmoe-v3).
  constexpr bool has_fitted_dictionary() const { return dictionary == DictionaryKind::kFitted; }
};

inline constexpr std::array<CodecTraits, 5> kCodecs = {{
    {Codec::kV1,
     "qmoe-v1",
     "QMoE's dictionary code: 16-bit codewords over a fixed dictionary",
     {Member::kCodes, Member::kRowOffsets, Member::kLevels},
     3,
     DictionaryKind::kBuiltin,
     "qmoe.dictionary.qmoe-v1",
     1,
     true,
     Target::kAny},
    {Codec::kV2,
     "qmoe-v2",
     "16-bit codewords over a dictionary fitted to the zero fraction, entries of up to 3 non-zeros",
     {Member::kCodes, Member::kRowOffsets, Member::kLevels},
     3,
     DictionaryKind::kFitted,
     "qmoe.dictionary.qmoe-v2.",
     1,
     true,
     Target::kGpu},
    {Codec::kV3,
     "qmoe-v3",
     "qmoe-v2 with rows coded in pairs over a 16-column window",
     {Member::kCodes, Member::kRowOffsets, Member::kLevels},
     3,
     DictionaryKind::kFitted,
     "qmoe.dictionary.qmoe-v3.",
     2,
     false,
     std::nullopt},
    {Codec::kG4,
     "qmoe-g4",
     "4-bit gap tokens and kind bits over groups of 4 rows, no dictionary",
     {Member::kGroupOffsets, Member::kTokens, Member::kKinds, Member::kLevels},
     4,
     DictionaryKind::kNone,
     "",
     4,
     false,
     Target::kCpu},
    {Codec::kP5,
     "qmoe-p5",
     "five symbols per byte in base 3, no dictionary: 1.6 bits per weight",
     {Member::kPacked, Member::kLevels},
     2,
     DictionaryKind::kNone,
     "",
     1,
     true,
     std::nullopt},
}};

static_assert(
    [] {
      for (size_t i = 0; i < kCodecs.size(); ++i) {
        if (static_cast<size_t>(kCodecs[i].codec) != i) return false;
        if (kCodecs[i].member_count == 0 ||
            kCodecs[i].member_list[kCodecs[i].member_count - 1] != Member::kLevels)
          return false;
      }
      return true;
    }(),
    "kCodecs is indexed by Codec, and every codec stores its levels last");

constexpr const CodecTraits& codec_traits(Codec c) {
  return kCodecs[static_cast<size_t>(c)];
}

// "qmoe-v1" / "qmoe-v2" / "qmoe-v3" / "qmoe-g4" / "qmoe-p5", the names stored in files.
// "unknown" for a value outside the table.
constexpr std::string_view codec_name(Codec c) {
  return static_cast<size_t>(c) < kCodecs.size() ? codec_traits(c).name : "unknown";
}
std::optional<Codec> codec_from_name(std::string_view s);
// Every codec's name, in table order, joined by `sep` (for messages and help texts).
std::string codec_names(std::string_view sep = ", ");

std::string_view target_name(Target t);
std::optional<Target> target_from_name(std::string_view s);

// The codec the automatic choice uses for `target` before comparing it with qmoe-p5 (encode.h):
// the codec whose auto_for is `target`.
Codec auto_codec(Target target);

}  // namespace qmoe
