// Element types of stored tensors, named as in safetensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace qmoe {

enum class DType : uint8_t {
  kBool,
  kU8,
  kI8,
  kU16,
  kI16,
  kF16,
  kBF16,
  kU32,
  kI32,
  kF32,
  kU64,
  kI64,
  kF64
};

// Size of one element in bytes.
constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kBool:
    case DType::kU8:
    case DType::kI8:
      return 1;
    case DType::kU16:
    case DType::kI16:
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kU32:
    case DType::kI32:
    case DType::kF32:
      return 4;
    case DType::kU64:
    case DType::kI64:
    case DType::kF64:
      return 8;
  }
  return 0;
}

// The safetensors spelling ("F32", "BF16", ...).
std::string_view dtype_name(DType t);
// Parses a safetensors dtype string; nullopt for unknown names.
std::optional<DType> dtype_from_name(std::string_view s);

// Whether to_float() takes the type: F32, F16, BF16 or F64.
constexpr bool is_float_dtype(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16 || t == DType::kF64;
}

// The elements of `bytes` (little endian, any alignment) as float: exact for F16 and BF16, F64
// rounded to nearest. `out` holds bytes.size() / dtype_size(t) floats. InvalidArgument for a
// type that is not a float type.
void to_float(DType t, std::span<const std::byte> bytes, float* out);

}  // namespace qmoe
