// Registrations the SIGBUS handler of file.h reads (not installed).
#pragma once

#include <cstddef>
#include <string>

#include "qmoe/format/file.h"

namespace qmoe::internal {

using qmoe::FaultSlot;
using qmoe::TempFileMark;

// While alive, the address range [p, p + n) belongs to `path` for the fault handler.
class MappedRegion {
 public:
  MappedRegion() = default;
  MappedRegion(const void* p, size_t n, const std::string& path);
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

 private:
  FaultSlot* slot_ = nullptr;
};

}  // namespace qmoe::internal
