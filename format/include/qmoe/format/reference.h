// Reference (plain, spec-following) decoding of every codec. It is the source of truth the fast
// CPU and CUDA kernels are tested against; it favours clarity over speed.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "qmoe/format/matrix.h"

namespace qmoe {

// The qmoe-v1 decode table (kTableWords int32, layout in codec_layout.h), generated on first use
// by the dictionary construction in format/SPEC.md. Thread-safe; the pointer stays valid forever.
const int32_t* v1_decode_table();

// The same qmoe-v1 dictionary as v1::kEntries qmoe-v2 entry words (codec_layout.h, SPEC section
// 4.3.2): every qmoe-v1 entry has 2..28 symbols, at most 3 of them non-zero, so it is a valid
// qmoe-v2 entry. Kernels that read entry words run both codecs with one code path (the CUDA kernels
// do). Thread-safe; the pointer stays valid forever.
const uint32_t* v1_entry_words();

// XXH3-64 of a qmoe-v2 or qmoe-v3 dictionary's bytes (its id, CompressedView::dictionary_id).
uint64_t v2_dictionary_id(std::span<const uint32_t> entries);
// Checks a qmoe-v2 dictionary: 65536 entries, each well formed (codec_layout.h, SPEC section 4.3).
// Throws FormatError whose message starts with `what` and names the entry.
void validate_v2_dictionary(std::span<const uint32_t> entries, std::string_view what = {});
// Validates `entries` and wraps them with their id.
std::shared_ptr<const FittedDictionary> make_v2_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what = {});

// The same for a qmoe-v3 dictionary (v3 entry words, codec_layout.h, SPEC section 4.4.2); its id is
// the same hash, v2_dictionary_id().
void validate_v3_dictionary(std::span<const uint32_t> entries, std::string_view what = {});
std::shared_ptr<const FittedDictionary> make_v3_dictionary(std::vector<uint32_t> entries,
                                                           std::string_view what = {});
// validate_v2_dictionary() or validate_v3_dictionary(), by the codec that uses the dictionary.
void validate_dictionary(Codec codec, std::span<const uint32_t> entries,
                         std::string_view what = {});

// Checks what makes row_slice() safe: the sizes of every member and the row offsets (start at 0,
// non-decreasing, end at num_codes), a qmoe-v2 dictionary's size, qmoe-g4 group offsets
// (non-decreasing, inside the token and kind streams); no decoding. This is also all a view needs
// for the decoders below, which check each row as they decode it.
void validate_layout(const CompressedView& m, std::string_view what = {});

// The most bytes (CompressedView::compressed_bytes()) a rows x cols matrix takes in codec c,
// whatever its symbols: a bound for sizing buffers and memory plans.
int64_t max_compressed_bytes(Codec c, int64_t rows, int64_t cols);

// Checks a whole matrix completely: sizes of every member, row offsets start at 0, are
// non-decreasing and end at num_codes, every row's codes decode to exactly its width (v1 and v2;
// an odd width's last v1 half pair has s1 = 0), a v2 dictionary well formed and matching its id,
// p5 bytes <= 242 with zero padding, qmoe-g4 offsets from (0, 0) to the streams' sizes with every
// group decoding (SPEC 4.5.5), levels finite with lo <= 0 <= hi. Throws FormatError whose message
// starts with `what` (e.g. "file.safetensors: tensor 'x'").
void validate(const CompressedView& m, std::string_view what = {});

// validate() without its qmoe-v2 dictionary checks (well-formed entries, id = XXH3-64), for a
// reader that has checked each dictionary of a file once (the container reader). A dictionary that
// was not checked this way must go through validate().
void validate_codes(const CompressedView& m, std::string_view what = {});

// Decodes to symbols (rows*cols bytes, row-major). Throws FormatError on a malformed stream.
void decode_symbols_ref(const CompressedView& m, uint8_t* symbols);
// Decodes to dense float (rows*cols floats, row-major): lo, 0 or hi of the row, as float.
void decode_ref(const CompressedView& m, float* out);
// y = W x with W decoded by decode_ref; x has cols floats, y rows floats. Sums in double, in
// column order, rounded once to float.
void matvec_ref(const CompressedView& m, const float* x, float* y);

}  // namespace qmoe
