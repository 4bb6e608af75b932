// check_compressed(): a container against the checkpoint it came from (the main job's last step).
#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include <nlohmann/json.hpp>

#include "qmoe/core/bf16.h"
#include "qmoe/encoder/encode.h"
#include "qmoe/format/container.h"
#include "qmoe/format/error.h"
#include "qmoe/format/reference.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/checkpoint.h"
#include "qmoe/switch/compress.h"

namespace qmoe::sw {
namespace fs = std::filesystem;

CheckSummary check_compressed(const fs::path& checkpoint, const fs::path& container, int threads) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const Container c = Container::open(container, {.verify_checksums = true});
  // The checkpoint as compress reads it: its own shards (the index's, or model.safetensors), not
  // whatever else lies in the folder (token files, say).
  const auto src = SwitchSource::open(checkpoint);
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> stored;
  for (const auto& f : src->shards())
    for (const auto& t : f.tensors()) stored[t.name] = {&f, &t};
  auto q = c.metadata().find("quantizer");
  bool rtn = q == c.metadata().end() || q->second == "rtn";
  // Round to nearest with other ternary options or a target size is not ternarize_rtn().
  if (auto o = c.metadata().find("compress.options"); rtn && o != c.metadata().end()) {
    const auto j = nlohmann::json::parse(o->second, nullptr, false);
    if (j.is_object() && (j.contains("ternary") || j.contains("rate"))) rtn = false;
  }

  CheckSummary s;
  for (const auto& [name, ft] : stored) {
    if (c.find_compressed(name)) continue;
    const DenseEntry* d = c.find_dense(name);
    if (!d)
      throw FormatError(
          error_context(container.string(), name, "tensor of the checkpoint is missing"));
    const auto want = ft.first->bytes(*ft.second);
    bool same = d->dtype == ft.second->dtype && d->bytes.size() == want.size() &&
                std::memcmp(d->bytes.data(), want.data(), want.size()) == 0;
    if (!same && d->dtype == DType::kBF16 && ft.second->dtype == DType::kF32 &&
        d->bytes.size() * 2 == want.size()) {  // --cast-bf16
      same = true;
      for (size_t i = 0; same && i < d->bytes.size() / 2; ++i) {
        float f;
        uint16_t h;
        std::memcpy(&f, want.data() + 4 * i, 4);
        std::memcpy(&h, d->bytes.data() + 2 * i, 2);
        same = h == float_to_bf16(f);
      }
    }
    if (!same)
      throw FormatError(
          error_context(container.string(), name, "differs from the checkpoint's tensor"));
    ++s.passthrough_tensors;
  }

  const auto& comp = c.compressed();
  std::mutex mu;
  std::exception_ptr err;
  double err2 = 0, ref2 = 0, decode_s = 0;
  int64_t exact = 0, weights = 0;
  const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(+ : err2, ref2, decode_s, exact, weights)
  for (size_t k = 0; k < comp.size(); ++k) {
    try {
      const CompressedEntry& e = comp[k];
      auto it = stored.find(e.name);
      if (it == stored.end())
        throw FormatError(error_context(container.string(), e.name, "not in the checkpoint"));
      const TensorInfo& t = *it->second.second;
      const int64_t n = e.view.rows * e.view.cols;
      std::vector<float> dec(static_cast<size_t>(n));
      const auto td = clock::now();
      decode_ref(e.view, dec.data());
      decode_s += std::chrono::duration<double>(clock::now() - td).count();
      const auto bytes = it->second.first->bytes(t);
      if (rtn) {
        const TernaryMatrix want = ternarize_rtn(bytes.data(), t.dtype, t.shape[0], t.shape[1]);
        if (want.to_dense() != dec)
          throw FormatError(error_context(
              container.string(), e.name,
              "does not decode to the round-to-nearest ternarization of the original"));
        ++exact;
      }
      std::vector<float> orig(static_cast<size_t>(n));
      to_float(t.dtype, bytes.first(static_cast<size_t>(n * dtype_size(t.dtype))), orig.data());
      for (int64_t i = 0; i < n; ++i) {
        const float w = orig[static_cast<size_t>(i)];
        const double dlt = static_cast<double>(w) - dec[static_cast<size_t>(i)];
        err2 += dlt * dlt;
        ref2 += static_cast<double>(w) * w;
      }
      weights += n;
    } catch (...) {
      std::lock_guard lk(mu);
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
  s.expert_matrices = static_cast<int64_t>(comp.size());
  s.expert_weights = weights;
  s.exact_matrices = exact;
  s.relative_error = ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;
  s.decode_seconds = decode_s;
  s.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return s;
}

}  // namespace qmoe::sw
