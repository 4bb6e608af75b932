#include "qmoe/format/dtype.h"

#include <array>
#include <utility>

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

}  // namespace qmoe
