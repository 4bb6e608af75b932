// Opening and reading the files qmoe takes as input, safely.
//
// - Only regular files are read: a named pipe, a device, a socket or a directory is refused
//   before it is opened for reading (and opened non-blocking if it becomes one in between), so a
//   reader never blocks on a FIFO that nobody writes.
// - Small text inputs (config.json, index files) are read whole with a size bound and checked
//   against qmoe's strict JSON rules (format/SPEC.md section 2.1).
// - Mapped files (SafetensorsFile) that shrink while in use: touching a page past the new end
//   raises SIGBUS. install_mapped_file_fault_handler() turns that into a message naming the file
//   and a clean exit (no core dump), after removing the temporary files of unfinished writers.
//   format/SPEC.md section 6 describes the rule.
// - An interrupted run (SIGINT, SIGTERM, SIGHUP): install_interrupt_cleanup() removes the
//   temporary files of unfinished writers before the process ends.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace qmoe {

// An open, read-only descriptor of a regular file and its size at open time. Owns the descriptor
// (closed by the destructor). Movable, not copyable.
class RegularFile {
 public:
  // Refuses anything that is not a regular file, before reading from it: FormatError naming the
  // file ("not a regular file (a named pipe)", "cannot open: <errno text>", ...).
  static RegularFile open(const std::filesystem::path& path);
  RegularFile() = default;
  RegularFile(RegularFile&& o) noexcept;
  RegularFile& operator=(RegularFile&& o) noexcept;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile();

  int fd() const { return fd_; }
  int64_t size() const { return size_; }

 private:
  int fd_ = -1;
  int64_t size_ = 0;
};

// Writes `data` to `path` atomically and durably: to "<path>.tmp.<pid>" (marked for removal if
// the process is interrupted), fsync, then renamed over `path`. On failure nothing is left under
// either name and Error names the file. Every small file qmoe writes whole (reports, run.json,
// dictionaries) goes through it; safetensors files have SafetensorsWriter.
void write_file_atomic(const std::filesystem::path& path, std::string_view data);

// The whole content of a regular file of at most `max_bytes` bytes. FormatError naming the file
// when it is not a regular file, cannot be read, or is larger.
std::string read_regular_file(const std::filesystem::path& path, int64_t max_bytes);

// Checks JSON text against qmoe's rules (format/SPEC.md section 2.1): valid UTF-8 JSON with no
// byte-order mark (JSON text has none) and no NUL byte, no string or object key holding U+0000
// (written "\u0000"), no duplicate keys in any object, nesting at most 16 levels deep. Throws
// FormatError whose message starts with `context` otherwise. Leading and trailing JSON whitespace
// (space, tab, CR, LF) are allowed.
void check_json_text(std::string_view text, const std::string& context);

struct FaultSlot;  // (file.cpp)

// While alive and not released, `path` is a temporary file of an unfinished write: the handlers
// installed below remove it before the process ends. SafetensorsWriter and ContainerWriter mark
// theirs; other writers of temporary files can too. Movable, not copyable; thread-safe.
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

// Installs a process-wide SIGBUS handler for faults in the mappings of SafetensorsFile objects
// that are alive: it removes the temporary files of the process's unfinished SafetensorsWriter
// and ContainerWriter objects, writes "qmoe: error: <file>: ..." to stderr and ends the process
// with _exit(exit_code). A fault anywhere else goes to the handler that was installed before (or
// the default action). Idempotent; the qmoe command-line tool calls it at start. A library user
// decides whether to: a C++ exception cannot be raised from the fault, so the process ends either
// way, with or without a message.
void install_mapped_file_fault_handler(int exit_code = 2);

// Installs handlers for SIGINT, SIGTERM and SIGHUP that remove the marked temporary files
// (TempFileMark) and then end the process by the same signal, as it would have ended without
// them (so an interrupted run leaves no partial file behind). A signal that is ignored when it is
// called stays ignored. Idempotent; the qmoe command-line tool calls it at start. Not for
// processes that handle these signals themselves.
void install_interrupt_cleanup();

}  // namespace qmoe
