#include "qmoe/core/dtype.h"

#include <array>
#include <cstring>
#include <string>
#include <utility>

#include "qmoe/core/bf16.h"
#include "qmoe/core/error.h"

namespace qmoe {
namespace {

// Every DType with its safetensors spelling, in enum order.
constexpr std::array<std::pair<DType, std::string_view>, 13> kNames = {{
    {DType::kBool, "BOOL"},
    {DType::kU8, "U8"},
    {DType::kI8, "I8"},
    {DType::kU16, "U16"},
    {DType::kI16, "I16"},
    {DType::kF16, "F16"},
    {DType::kBF16, "BF16"},
    {DType::kU32, "U32"},
    {DType::kI32, "I32"},
    {DType::kF32, "F32"},
    {DType::kU64, "U64"},
    {DType::kI64, "I64"},
    {DType::kF64, "F64"},
}};

}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& [d, name] : kNames) {
    if (d == t) return name;
  }
  return "UNKNOWN";
}

std::optional<DType> dtype_from_name(std::string_view s) {
  for (const auto& [d, name] : kNames) {
    if (name == s) return d;
  }
  return std::nullopt;
}

void to_float(DType t, std::span<const std::byte> bytes, float* out) {
  const size_t n = bytes.size() / static_cast<size_t>(dtype_size(t));
  const std::byte* p = bytes.data();
  switch (t) {
    case DType::kF32:
      std::memcpy(out, p, 4 * n);
      return;
    case DType::kF16:
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = t == DType::kBF16 ? bf16_to_float(h) : fp16_to_float(h);
      }
      return;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, p + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      return;
    default:
      throw InvalidArgument("to_float: " + std::string(dtype_name(t)) + " is not a float type");
  }
}

}  // namespace qmoe
