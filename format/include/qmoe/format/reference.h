// Reference (plain, spec-following) decoding of every codec. It is the source of truth the fast
// CPU and CUDA kernels are tested against; it favours clarity over speed.
#pragma once

#include <cstdint>
#include <string_view>

#include "qmoe/format/matrix.h"

namespace qmoe {

// The qmoe-v1 decode table (kTableWords int32, layout in codec_layout.h), generated on first use
// by the dictionary construction in format/SPEC.md. Thread-safe; the pointer stays valid forever.
const int32_t* v1_decode_table();

// Checks a view completely: sizes of every member, row offsets start at 0, are non-decreasing and
// end at num_codes, every row's codes decode to exactly its width (v1; an odd width's last half
// pair has s1 = 0), p5 bytes <= 242 with zero padding, levels finite with lo <= 0 <= hi.
// Throws FormatError whose message starts with `what` (e.g. "file.safetensors: tensor 'x'").
void validate(const CompressedView& m, std::string_view what = {});

// Decodes to symbols (rows*cols bytes, row-major). Throws FormatError on a malformed stream.
void decode_symbols_ref(const CompressedView& m, uint8_t* symbols);
// Decodes to dense float (rows*cols floats, row-major): lo, 0 or hi of the row, as float.
void decode_ref(const CompressedView& m, float* out);
// y = W x with W decoded by decode_ref; x has cols floats, y rows floats. Sums in double, in
// column order, rounded once to float.
void matvec_ref(const CompressedView& m, const float* x, float* y);

}  // namespace qmoe
