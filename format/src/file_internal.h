// Registrations the SIGBUS handler of file.h reads (not installed).
#pragma once

#include <cstddef>
#include <string>

namespace qmoe::internal {

struct FaultSlot;

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

// While alive (and not released), `path` is a temporary file the fault handler removes before
// ending the process.
class TempFileMark {
 public:
  TempFileMark() = default;
  explicit TempFileMark(const std::string& path);
  ~TempFileMark() { release(); }
  TempFileMark(const TempFileMark&) = delete;
  TempFileMark& operator=(const TempFileMark&) = delete;
  TempFileMark(TempFileMark&& o) noexcept : slot_(o.slot_) { o.slot_ = nullptr; }
  TempFileMark& operator=(TempFileMark&& o) noexcept;
  // The file was renamed or removed: nothing to clean up any more.
  void release();

 private:
  FaultSlot* slot_ = nullptr;
};

}  // namespace qmoe::internal
