#include "qmoe/format/dtype.h"

#include <array>
#include <utility>

namespace qmoe {
namespace {
constexpr std::array<std::pair<DType, std::string_view>, 13> kNames = {{
    {DType::kBool, "BOOL"}, {DType::kU8, "U8"},   {DType::kI8, "I8"},   {DType::kU16, "U16"},
    {DType::kI16, "I16"},   {DType::kF16, "F16"}, {DType::kBF16, "BF16"}, {DType::kU32, "U32"},
    {DType::kI32, "I32"},   {DType::kF32, "F32"}, {DType::kU64, "U64"}, {DType::kI64, "I64"},
    {DType::kF64, "F64"},
}};
}  // namespace

std::string_view dtype_name(DType t) {
  for (const auto& [d, n] : kNames) {
    if (d == t) return n;
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view s) {
  for (const auto& [d, n] : kNames) {
    if (n == s) return d;
  }
  return std::nullopt;
}

}  // namespace qmoe
