// libFuzzer target: arbitrary bytes as one of the other files qmoe reads, chosen by the first
// byte: a Hessian file (read_hessians), a token file (TokenPairs::load, with and without a
// vocabulary bound) or a checkpoint's config.json (SwitchConfig::load). Each must either succeed
// or throw qmoe::Error; a successful read must yield objects whose contents can all be touched (and
// Hessians that can be merged, or refuse to be with qmoe::Error).
// Anything else (crash, sanitizer report, other exception, hang) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "qmoe/format/error.h"
#include "qmoe/gptq/hessian.h"
#include "qmoe/switch/checkpoint.h"
#include "qmoe/switch/tokens.h"

namespace {

int memory_file() {
  static const int fd = memfd_create("qmoe-fuzz-inputs", 0);
  return fd;
}

unsigned touch_hessians(const std::string& path) {
  unsigned sum = 0;
  for (const auto& [name, acc] : qmoe::read_hessians(path)) {
    if (acc.dim() > 512) continue;  // bounded memory; the shape was validated already
    const auto h = acc.hessian();
    for (double v : h) sum += static_cast<unsigned>(v != 0.0);
    qmoe::HessianAccumulator twice = acc;  // counts may be anything the file holds
    twice.merge(acc);
    sum += static_cast<unsigned>(twice.tokens());
    sum += static_cast<unsigned>(acc.tokens()) + static_cast<unsigned>(acc.dropped()) +
           static_cast<unsigned>(name.size());
  }
  return sum;
}

unsigned touch_tokens(const std::string& path, int64_t vocab) {
  const qmoe::sw::TokenPairs t = qmoe::sw::TokenPairs::load(path, vocab);
  unsigned sum = 0;
  for (int64_t i = 0; i < t.num_pairs(); ++i) {
    for (int32_t id : t.encoder(i)) sum += static_cast<unsigned>(id);
    for (int32_t id : t.decoder(i)) sum += static_cast<unsigned>(id);
  }
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int fd = memory_file();
  if (fd < 0) __builtin_trap();
  if (ftruncate(fd, 0) != 0) __builtin_trap();
  size_t done = 1;  // byte 0 picks the reader
  while (done < size) {
    const ssize_t w = pwrite(fd, data + done, size - done, static_cast<off_t>(done - 1));
    if (w <= 0) __builtin_trap();
    done += static_cast<size_t>(w);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  unsigned sum = 0;
  try {
    switch (data[0] % 4) {
      case 0:
        sum = touch_hessians(path);
        break;
      case 1:
        sum = touch_tokens(path, 0);
        break;
      case 2:
        sum = touch_tokens(path, 32128);
        break;
      default: {
        const qmoe::sw::SwitchConfig c = qmoe::sw::SwitchConfig::load(path);
        sum = static_cast<unsigned>(c.d_model + c.d_ff + c.num_experts);
        break;
      }
    }
  } catch (const qmoe::Error&) {
  }
  if (sum == 0xdeadbeefu) __builtin_trap();  // keeps the reads from being optimised away
  return 0;
}
