// libFuzzer target: a container, as one file (arbitrary bytes) or as a sharded folder (an index
// and shards, in the folder layout of fuzz_files.h, which the mutator edits one file at a time).
// Container::open must either succeed or throw qmoe::Error; on success every matrix must decode
// and every tensor's bytes be readable. Anything else (crash, sanitizer report, other exception,
// hang) is a finding.
//
// Every container file carries a header checksum (format/SPEC.md 2.6), so nearly every mutation
// of a header is refused by it. For inputs of even size the target rewrites each file's header
// checksum to match the mutated header first, so that those mutations reach the checks behind
// it; odd sizes keep the checksum as mutated (and verify the tensor checksums too).
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_files.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"

namespace {

unsigned touch(const qmoe::Container& c) {
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
  (void)c.format_version();
  return sum;
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  return qmoe::fuzz::mutate_dir(data, size, max_size, seed);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& dir = qmoe::fuzz::scratch_dir();
  const bool repair = (size & 1) == 0;
  std::filesystem::path path;
  if (qmoe::fuzz::is_dir_input(data, size)) {
    const auto files = qmoe::fuzz::parse_files(data, size);
    qmoe::fuzz::write_files(dir, files);
    if (repair) {
      for (const auto& f : files) {
        if (qmoe::fuzz::plain_name(f.name) && f.name.ends_with(".safetensors"))
          qmoe::fuzz::repair_header_checksum(dir / f.name);
      }
    }
    path = dir;
  } else {
    path = dir / "one.safetensors";
    qmoe::fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
    if (repair) qmoe::fuzz::repair_header_checksum(path);
  }
  unsigned sum = 0;
  try {
    const qmoe::Container c = qmoe::Container::open(path, {.verify_checksums = !repair});
    sum = touch(c);
  } catch (const qmoe::Error&) {
  }
  if (sum == 0xdeadbeefu) __builtin_trap();  // keeps the reads from being optimised away
  return 0;
}
