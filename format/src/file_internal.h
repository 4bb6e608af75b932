// Registrations the SIGBUS handler of file.h reads (not installed).
#pragma once

#include <cstddef>
#include <string>

#include "qmoe/format/file.h"

namespace qmoe::internal {

using qmoe::FaultSlot;
using qmoe::TempFileMark;

// Defined in safetensors.cpp: writes all n bytes (retrying on EINTR), Error naming `path`
// otherwise; "<path>: <what>: <errno text>".
void write_all(int fd, const void* p, size_t n, const std::string& path);
std::string io_error(const std::string& path, const char* what);

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
