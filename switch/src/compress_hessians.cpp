// Hessians for `qmoe compress --hessians FILE`: accumulator files as format/HESSIANS.md
// specifies them, read lazily through the mapping (one matrix at a time), so that a file with
// thousands of d_ff x d_ff sums never has to fit in memory.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/switch/compress.h"

namespace qmoe::sw {
namespace {

class HessianFile final : public HessianProvider {
 public:
  explicit HessianFile(const std::filesystem::path& path)
      : path_(path), file_(SafetensorsFile::open(path)) {
    const auto& md = file_.metadata();
    auto it = md.find("format");
    if (it == md.end() || it->second != "qmoe-hessian")
      throw FormatError(error_context(
          path.string(), "", "not a Hessian file (metadata format is not \"qmoe-hessian\")"));
    it = md.find("format_version");
    if (it == md.end() || it->second != "1")
      throw FormatError(
          error_context(path.string(), "", "unsupported Hessian file version (expected \"1\")"));
  }

  std::string describe() const override { return path_.filename().string(); }

  std::string fingerprint() const override {
    // Names, shapes, offsets and the file size: enough to tell two accumulator files apart in
    // practice without reading gigabytes.
    nlohmann::json j = nlohmann::json::array();
    for (const auto& t : file_.tensors()) j.push_back({t.name, t.shape, t.begin, t.end});
    return std::to_string(std::filesystem::file_size(path_)) + ":" +
           std::to_string(std::hash<std::string>{}(j.dump()));
  }

  void validate(std::span<const ExpertMatrix> experts) const override {
    std::set<std::string> known;
    for (const auto& m : experts) {
      const std::string base = stem(m);
      known.insert(base);
      const TensorInfo* x = file_.find(base + ".xtx");
      if (!x)
        throw FormatError(
            error_context(path_.string(), base + ".xtx", "no Hessian for expert matrix " + m.name));
      if (x->shape.size() != 2 || x->shape[0] != x->shape[1])
        throw FormatError(
            error_context(path_.string(), x->name, "Hessian sum is not a square matrix"));
      if (x->shape[0] != m.cols)
        throw FormatError(error_context(path_.string(), x->name,
                                        "Hessian is " + std::to_string(x->shape[0]) + " x " +
                                            std::to_string(x->shape[1]) + " but " + m.name +
                                            " has " + std::to_string(m.cols) +
                                            " inputs: it does not belong to this expert"));
      if (x->dtype != DType::kF64 && x->dtype != DType::kF32)
        throw FormatError(
            error_context(path_.string(), x->name,
                          "dtype " + std::string(dtype_name(x->dtype)) + ", expected F64 or F32"));
      const TensorInfo* n = file_.find(base + ".tokens");
      if (!n || n->dtype != DType::kI64 || n->numel() != 1)
        throw FormatError(
            error_context(path_.string(), base + ".tokens", "missing or not one I64 token count"));
    }
    for (const auto& t : file_.tensors()) {
      const auto dot = t.name.rfind('.');
      const std::string base = dot == std::string::npos ? t.name : t.name.substr(0, dot);
      if (!known.count(base))
        throw FormatError(
            error_context(path_.string(), t.name,
                          "Hessian for a matrix that is not an expert of this checkpoint"));
    }
  }

  std::vector<float> hessian(const ExpertMatrix& m, int64_t& tokens) const override {
    const std::string base = stem(m);
    const TensorInfo* x = file_.find(base + ".xtx");
    const TensorInfo* n = file_.find(base + ".tokens");
    if (!x || !n) throw FormatError(error_context(path_.string(), base + ".xtx", "missing"));
    int64_t count = 0;
    std::memcpy(&count, file_.bytes(*n).data(), 8);
    if (count < 0)
      throw FormatError(error_context(path_.string(), n->name, "negative token count"));
    tokens = count;
    if (count == 0) return {};
    const int64_t d = x->shape[0];
    const auto raw = file_.bytes(*x);
    auto at = [&](int64_t i, int64_t j) -> double {
      if (x->dtype == DType::kF64) {
        double v;
        std::memcpy(&v, raw.data() + 8 * (i * d + j), 8);
        return v;
      }
      float v;
      std::memcpy(&v, raw.data() + 4 * (i * d + j), 4);
      return v;
    };
    // H = (2/n) S; the upper triangle is authoritative (format/HESSIANS.md).
    std::vector<float> h(static_cast<size_t>(d * d));
    const double scale = 2.0 / static_cast<double>(count);
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i; j < d; ++j) {
        const double v = at(i, j);
        if (!std::isfinite(v))
          throw FormatError(error_context(
              path_.string(), x->name,
              "non-finite entry (" + std::to_string(i) + ", " + std::to_string(j) + ")"));
        if (i == j && v < 0)
          throw FormatError(error_context(path_.string(), x->name,
                                          "negative diagonal entry " + std::to_string(i)));
        const float f = static_cast<float>(v * scale);
        h[static_cast<size_t>(i * d + j)] = f;
        h[static_cast<size_t>(j * d + i)] = f;
      }
    }
    release(raw);
    return h;
  }

 private:
  static std::string stem(const ExpertMatrix& m) {
    const std::string suffix = ".weight";
    return m.name.size() > suffix.size() && m.name.ends_with(suffix)
               ? m.name.substr(0, m.name.size() - suffix.size())
               : m.name;
  }
  static void release(std::span<const std::byte> b) {
    static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto p = reinterpret_cast<uintptr_t>(b.data());
    const uintptr_t a = (p + page - 1) / page * page, e = (p + b.size()) / page * page;
    if (e > a) ::madvise(reinterpret_cast<void*>(a), e - a, MADV_DONTNEED);
  }

  std::filesystem::path path_;
  SafetensorsFile file_;
};

}  // namespace

std::unique_ptr<HessianProvider> open_hessian_file(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path))
    throw FormatError(error_context(path.string(), "", "no such Hessian file"));
  return std::make_unique<HessianFile>(path);
}

}  // namespace qmoe::sw
