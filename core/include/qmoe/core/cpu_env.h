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

// The level every module's kernels use when a call names none: the one set_cpu_simd() set for the
// process, else requested_cpu_simd() (read on first use), else nullopt (each module's best). Asked
// at each call, so that decoder_cpu's set_simd_level() (which calls set_cpu_simd()) reaches the
// GEMM of core too.
std::optional<std::string_view> cpu_simd();
// Sets the process-wide level ("scalar", "avx2" or "avx512"), or with nullopt goes back to
// QMOE_CPU_SIMD. Throws InvalidArgument for another name. Thread-safe.
void set_cpu_simd(std::optional<std::string_view> level);

// What this CPU runs, detected once: the instruction sets behind each SIMD level of qmoe's
// kernels. Every module with run-time dispatch (decoder_cpu, the GEMM of core that gptq and
// switch use) asks here, so that a level needs the same features everywhere. Whether a build
// has the kernels of a level is the module's to say.
struct CpuFeatures {
  bool avx2 = false;     // AVX2, FMA, BMI1 and BMI2: the "avx2" level
  bool avx512 = false;   // avx2 and AVX-512 F, BW, VL, DQ: the "avx512" level
  bool g4_int8 = false;  // avx512 and VBMI, VBMI2, VNNI, GFNI: qmoe-g4's int8 kernel
};
const CpuFeatures& cpu_features();

}  // namespace qmoe
