// Hessian files: named accumulators in a safetensors file (format/HESSIANS.md).
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>

#include "qmoe/format/error.h"
#include "qmoe/format/safetensors.h"
#include "qmoe/gptq/hessian.h"

namespace qmoe {
namespace {

constexpr std::string_view kSumSuffix = ".xtx";
constexpr std::string_view kTokensSuffix = ".tokens";
constexpr std::string_view kDroppedSuffix = ".dropped";
constexpr std::string_view kFormatKey = "format";
constexpr std::string_view kFormatValue = "qmoe-hessian";
constexpr std::string_view kVersionKey = "format_version";
constexpr std::string_view kVersionValue = "1";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

template <class T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

int64_t read_count(const SafetensorsFile& f, const std::string& name, bool required) {
  const TensorInfo* t = f.find(name);
  if (t == nullptr) {
    if (!required) return 0;
    throw FormatError(error_context(f.path().string(), name, "missing token count tensor"));
  }
  if (t->dtype != DType::kI64 || t->numel() != 1) {
    throw FormatError(error_context(f.path().string(), name, "must be I64 with one element"));
  }
  const int64_t v = f.as<int64_t>(*t, DType::kI64)[0];
  if (v < 0) throw FormatError(error_context(f.path().string(), name, "negative count"));
  return v;
}

}  // namespace

void write_hessians(const std::filesystem::path& path,
                    const std::map<std::string, HessianAccumulator>& accumulators) {
  SafetensorsWriter out(path);
  out.set_metadata(std::string(kFormatKey), std::string(kFormatValue));
  out.set_metadata(std::string(kVersionKey), std::string(kVersionValue));
  for (const auto& [name, acc] : accumulators) {
    if (name.empty() || ends_with(name, kSumSuffix) || ends_with(name, kTokensSuffix) ||
        ends_with(name, kDroppedSuffix)) {
      throw InvalidArgument("write_hessians: invalid accumulator name '" + name + "'");
    }
    const int64_t d = acc.dim();
    out.add(name + std::string(kSumSuffix), DType::kF64, {d, d}, as_bytes_of(acc.sum()));
    const std::vector<int64_t> tokens{acc.tokens()}, dropped{acc.dropped()};
    out.add(name + std::string(kTokensSuffix), DType::kI64, {1}, as_bytes_of(tokens));
    out.add(name + std::string(kDroppedSuffix), DType::kI64, {1}, as_bytes_of(dropped));
  }
  out.finish();
}

std::map<std::string, HessianAccumulator> read_hessians(const std::filesystem::path& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  const std::string file = f.path().string();
  const auto& meta = f.metadata();
  const auto fmt = meta.find(std::string(kFormatKey));
  if (fmt == meta.end() || fmt->second != kFormatValue) {
    throw FormatError(
        error_context(file, "", "not a Hessian file (metadata format != qmoe-hessian)"));
  }
  const auto ver = meta.find(std::string(kVersionKey));
  if (ver == meta.end() || ver->second != kVersionValue) {
    throw FormatError(error_context(file, "", "unsupported Hessian file version"));
  }
  std::map<std::string, HessianAccumulator> out;
  for (const TensorInfo& t : f.tensors()) {
    if (ends_with(t.name, kTokensSuffix) || ends_with(t.name, kDroppedSuffix)) {
      const std::string_view suffix =
          ends_with(t.name, kTokensSuffix) ? kTokensSuffix : kDroppedSuffix;
      const std::string base = t.name.substr(0, t.name.size() - suffix.size());
      if (f.find(base + std::string(kSumSuffix)) == nullptr) {
        throw FormatError(error_context(file, t.name, "count without a matching .xtx tensor"));
      }
      continue;
    }
    if (!ends_with(t.name, kSumSuffix)) {
      throw FormatError(error_context(file, t.name, "unexpected tensor in a Hessian file"));
    }
    const std::string name = t.name.substr(0, t.name.size() - kSumSuffix.size());
    if (name.empty()) throw FormatError(error_context(file, t.name, "empty accumulator name"));
    if (t.shape.size() != 2 || t.shape[0] != t.shape[1]) {
      throw FormatError(error_context(file, t.name, "must be a square matrix"));
    }
    const int64_t d = t.shape[0];
    std::vector<double> sum(static_cast<size_t>(d * d));
    if (t.dtype == DType::kF64) {
      const auto v = f.as<double>(t, DType::kF64);
      std::memcpy(sum.data(), v.data(), sum.size() * sizeof(double));
    } else if (t.dtype == DType::kF32) {
      const auto v = f.as<float>(t, DType::kF32);
      for (size_t i = 0; i < sum.size(); ++i) sum[i] = v[i];
    } else {
      throw FormatError(error_context(file, t.name, "dtype must be F64 or F32"));
    }
    // The upper triangle is authoritative (a float32 X^T X from a framework need not be exactly
    // symmetric); the lower one is replaced by its mirror.
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i; j < d; ++j) {
        const double a = sum[i * d + j];
        if (!std::isfinite(a)) throw FormatError(error_context(file, t.name, "non-finite entry"));
        sum[j * d + i] = a;
      }
      if (sum[i * d + i] < 0)
        throw FormatError(error_context(file, t.name, "negative diagonal entry"));
    }
    const int64_t tokens = read_count(f, name + std::string(kTokensSuffix), true);
    const int64_t dropped = read_count(f, name + std::string(kDroppedSuffix), false);
    HessianAccumulator acc(d);
    acc.assign(std::move(sum), tokens, dropped);
    out.emplace(name, std::move(acc));
  }
  return out;
}

}  // namespace qmoe
