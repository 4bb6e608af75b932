// The CPU kernel level asked for through the environment. Every module with run-time SIMD dispatch
// (the decode kernels of decoder_cpu, the product kernels of gptq) reads it through here, so the
// variable has one spelling, one set of values and one error message.
#pragma once

#include <optional>
#include <string_view>

namespace qmoe {

// QMOE_CPU_SIMD, read at the call: nullopt when unset or empty, else "scalar", "avx2" or
// "avx512". Throws InvalidArgument naming the variable and its value for anything else. Whether
// this CPU and build run the level is for the caller to check.
std::optional<std::string_view> requested_cpu_simd();

}  // namespace qmoe
