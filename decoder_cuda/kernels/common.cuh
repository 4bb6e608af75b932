// Shared by every qmoe CUDA kernel: platform switch (nvcc or the CPU emulation), activation
// element traits and warp helpers. Kernel headers in this folder compile both ways; see
// emu/runtime.h for the emulated execution model.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define QMOE_DEV __device__ __forceinline__
#define QMOE_UNROLL _Pragma("unroll")
#define QMOE_NO_UNROLL _Pragma("unroll 1")
#else
#define QMOE_UNROLL
#define QMOE_NO_UNROLL
#include <cmath>
#include <cstring>

#include "../emu/runtime.h"
#define QMOE_DEV inline
#endif

#include "qmoe/core/bf16.h"
#include "qmoe/decoder_cuda/launch.h"
#include "qmoe/format/codec_layout.h"

namespace qmoe::cuda::kern {

inline constexpr unsigned kFullMask = 0xffffffffu;

// Activation element types: storage type S and exact conversions to and from fp32.
struct Bf16 {
  using S = uint16_t;
  static QMOE_DEV float load(S v) { return bf16_to_float(v); }
  static QMOE_DEV S store(float f) { return float_to_bf16(f); }
};
struct F16 {
  using S = uint16_t;
#if defined(__CUDA_ARCH__)
  // Hardware cvt instructions; both directions are exact / round-to-nearest-even like the host
  // path.
  static QMOE_DEV float load(S v) {
    return __half2float(__ushort_as_half(v));
  }
  static QMOE_DEV S store(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
#else
  static QMOE_DEV float load(S v) {
    return fp16_to_float(v);
  }
  static QMOE_DEV S store(float f) {
    return float_to_fp16(f);
  }
#endif
};
struct F32 {
  using S = float;
  static QMOE_DEV float load(S v) { return v; }
  static QMOE_DEV S store(float f) { return f; }
};

// Read-only loads of immutable data (codes, table, levels, activations): __ldg routes them
// through the non-coherent texture path, which caches the hot dictionary entries in L1.
template <class T>
QMOE_DEV T ldg(const T* p) {
  return __ldg(p);
}

// Four consecutive floats of shared memory (16-byte aligned): one LDS.128 instead of four.
QMOE_DEV float4 load_float4(const float* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const float4*>(p);
#else
  float4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

// Inclusive prefix sum over the 32 lanes (Kogge-Stone, 5 shuffles).
QMOE_DEV int warp_inclusive_sum(int v, int lane) {
  QMOE_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(kFullMask, v, d);  // lanes < d get their own value back
    if (lane >= d) v += u;
  }
  return v;
}

QMOE_DEV float warp_sum(float v) {
  QMOE_UNROLL
  for (int m = 16; m >= 1; m >>= 1)
    v += __shfl_xor_sync(kFullMask, v, m);  // butterfly: all lanes get the sum
  return v;
}

}  // namespace qmoe::cuda::kern
