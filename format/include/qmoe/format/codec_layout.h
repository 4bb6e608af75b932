// Bit layouts of every qmoe codec, shared by host and device code: one header per codec,
// qmoe/format/codecs/<codec>.h with namespace qmoe::<codec> (v1, v2, ...), all included here.
// format/SPEC.md is the normative description; these headers are its executable form. No std
// containers here: the CUDA kernels include it.
//
// Symbols: 0 = zero, 1 = the row's low level (lo <= 0), 2 = the row's high level (hi >= 0).
#pragma once

#include "qmoe/core/bf16.h"
#include "qmoe/format/codecs/g4.h"
#include "qmoe/format/codecs/p5.h"
#include "qmoe/format/codecs/v1.h"
#include "qmoe/format/codecs/v2.h"
#include "qmoe/format/codecs/v3.h"

namespace qmoe {

// Value of symbol s given the row's levels (as float).
QMOE_HD float symbol_value(int s, float lo, float hi) {
  return s == 1 ? lo : (s == 2 ? hi : 0.0f);
}

}  // namespace qmoe
