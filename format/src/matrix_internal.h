// What matrix.cpp gives the rest of the library besides matrix.h.
#pragma once

#include <cstddef>
#include <span>

#include "qmoe/format/codec.h"
#include "qmoe/format/matrix.h"

namespace qmoe::internal {

// The bytes of a member of `m` (codec.h's Member: codes, row offsets, ..., levels).
std::span<const std::byte> member_bytes(const CompressedView& m, Member member);

}  // namespace qmoe::internal
