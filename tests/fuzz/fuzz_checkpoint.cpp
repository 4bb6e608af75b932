// libFuzzer target: a checkpoint folder (fuzz_files.h: config.json, model.safetensors or shards
// with model.safetensors.index.json, or a qmoe container with its config) opened as
// SwitchSource::open and SwitchModel::load do for `qmoe eval` and `qmoe compress`. Opening must
// either succeed or throw qmoe::Error. A source that opens must then hand out every tensor it
// lists, load as a model, and run a forward pass and a loss on a few tokens without a crash, a
// sanitizer report or an exception other than qmoe::Error: whatever the config says, it was
// checked against the tensors when the source opened. The mutator edits one file at a time
// (fuzz_files.h); half of the inputs get their container header checksums repaired so that
// mutated headers reach the checks behind them.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fuzz_files.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "qmoe/switch/checkpoint.h"
#include "qmoe/switch/forward.h"
#include "qmoe/switch/model.h"
#include "qmoe/switch/tokens.h"

namespace {

// Bound on the work per input: tensors and models larger than this are opened and checked but
// not decoded or run (their sizes were validated; a big one only makes the run slow).
constexpr int64_t kMaxElements = int64_t{1} << 20;

unsigned touch(const std::shared_ptr<const qmoe::sw::SwitchSource>& source) {
  const qmoe::sw::SwitchSource& src = *source;
  unsigned sum = 0;
  int64_t total = 0;
  for (const std::string& name : src.names()) {
    if (const qmoe::CompressedView* v = src.compressed(name)) {
      const int64_t n = v->rows * v->cols;
      if (n > kMaxElements) continue;
      std::vector<float> out(static_cast<size_t>(n));
      qmoe::decode_ref(*v, out.data());
      for (float x : out) sum += x != 0.0f;
      continue;
    }
    try {
      const auto t = src.dense(name);
      total += t.numel();
      for (int64_t i = 0; i < std::min(t.numel(), kMaxElements); ++i) sum += t.data[i] != 0.0f;
    } catch (const qmoe::FormatError&) {
      // a dense tensor of a non-float dtype (not one the model uses: the source checked those)
    }
  }
  const auto& c = src.config();
  if (total > 16 * kMaxElements || c.vocab_size * c.d_model > kMaxElements ||
      c.d_ff * c.d_model > kMaxElements)
    return sum;
  const qmoe::sw::SwitchModel m = qmoe::sw::SwitchModel::load(source);
  // Two short pairs with ids at the edges of the vocabulary, an ignored target and an empty one.
  qmoe::sw::TokenPairs pairs;
  const int32_t top = static_cast<int32_t>(c.vocab_size - 1);
  const int32_t enc0[] = {0, top, 1 % static_cast<int32_t>(c.vocab_size)}, dec0[] = {top, -100};
  const int32_t enc1[] = {top};
  pairs.add(enc0, dec0);
  pairs.add(enc1, std::span<const int32_t>());
  for (const int64_t capacity : {0, 1}) {
    qmoe::sw::ForwardOptions fo;
    fo.expert_capacity = capacity;
    const qmoe::sw::LossResult r = qmoe::sw::cross_entropy(m, pairs, fo);
    sum += static_cast<unsigned>(r.targets);
  }
  return sum;
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  return qmoe::fuzz::mutate_dir(data, size, max_size, seed);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (!qmoe::fuzz::is_dir_input(data, size)) return 0;
  const auto files = qmoe::fuzz::parse_files(data, size);
  const auto& dir = qmoe::fuzz::scratch_dir();
  qmoe::fuzz::write_files(dir, files);
  if ((size & 1) == 0) {
    for (const auto& f : files) {
      if (qmoe::fuzz::plain_name(f.name) && f.name.ends_with(".safetensors"))
        qmoe::fuzz::repair_header_checksum(dir / f.name);
    }
  }
  unsigned sum = 0;
  try {
    const auto src = qmoe::sw::SwitchSource::open(dir);
    sum = touch(src);
  } catch (const qmoe::Error&) {
  }
  if (sum == 0xdeadbeefu) __builtin_trap();  // keeps the reads from being optimised away
  return 0;
}
