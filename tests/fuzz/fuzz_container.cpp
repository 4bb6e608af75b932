// libFuzzer target: arbitrary bytes as a container file. Container::open must either succeed or
// throw qmoe::Error; on success every matrix must decode and every tensor's bytes be readable.
// Anything else (crash, sanitizer report, other exception, hang) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace {

// One in-memory file for the whole run, rewritten for every input.
int memory_file() {
  static const int fd = memfd_create("qmoe-fuzz-container", 0);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memory_file();
  if (fd < 0) __builtin_trap();
  if (ftruncate(fd, 0) != 0) __builtin_trap();
  size_t done = 0;
  while (done < size) {
    const ssize_t w = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (w <= 0) __builtin_trap();
    done += static_cast<size_t>(w);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    // Checksums are verified on odd sizes only, so that mutated files which keep a stale checksum
    // still reach the code checks on the other half of the inputs.
    const qmoe::Container c = qmoe::Container::open(path, {.verify_checksums = (size & 1) != 0});
    for (const auto& e : c.compressed()) {
      const int64_t n = e.view.rows * e.view.cols;
      if (n > (int64_t{1} << 22)) continue;  // bounded memory; sizes were validated already
      std::vector<float> out(static_cast<size_t>(n));
      qmoe::decode_ref(e.view, out.data());
    }
    unsigned sum = 0;
    for (const auto& d : c.dense()) {
      for (std::byte b : d.bytes) sum += static_cast<unsigned>(b);
    }
    (void)c.mismatched_checksums();
    (void)c.names();
    if (sum == 0xdeadbeefu) __builtin_trap();  // keeps the reads from being optimised away
  } catch (const qmoe::Error&) {
  }
  return 0;
}
