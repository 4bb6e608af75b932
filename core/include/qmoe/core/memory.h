// This process's resident memory, from /proc (Linux); 0 where /proc does not say.
#pragma once

#include <cstdint>

namespace qmoe {

// Resident set size now, in bytes (/proc/self/statm).
int64_t resident_bytes();
// Peak resident set size so far, in bytes (VmHWM of /proc/self/status).
int64_t peak_resident_bytes();

}  // namespace qmoe
