// CPU emulation of the CUDA execution model, so that the exact kernel sources in
// decoder_cuda/kernels/ compile as host C++ and run in the test suite on machines without a GPU.
//
// Model: blocks run one after another; inside a block every thread is a fiber (ucontext) and all
// of them are live at once. Fibers are scheduled cooperatively and deterministically (round robin
// in thread order); a fiber gives up the CPU only at a block barrier or a warp collective. This
// makes synchronisation bugs exact rather than timing dependent:
//   * __syncthreads() releases only when every thread of the block waits at the same call site;
//     a thread that exited, or waits at another barrier, is reported as a divergent barrier;
//   * warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) release
//     only when every lane named in the mask has arrived at the same kind of collective;
//   * when no fiber can run and not all have finished, the launch fails with a deadlock report.
// Every such failure throws qmoe::emu::EmulationError from the launch call.
//
// Limits: one collective group per warp at a time (masks of lanes arriving together must be
// equal); shared memory declared `__shared__` inside a kernel is a thread_local static, i.e. one
// arena per kernel instantiation reused by every block (blocks run sequentially, so this is
// per-block storage); no dynamic shared memory. Never include this header in a TU compiled by nvcc
// or one that includes the CUDA runtime headers.
#pragma once

#if defined(__CUDACC__)
#error "qmoe emulation header included in a CUDA translation unit"
#endif

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

// ---- CUDA vocabulary ---------------------------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint2 {
  unsigned x, y;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace qmoe::emu {

// A synchronisation error found while emulating a launch (divergent barrier, deadlock, mismatched
// warp collective) or an exception escaping a kernel body.
class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Per-fiber view of the launch, valid only inside a running kernel body.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Runs `body` once per thread of every block of grid x block. Throws EmulationError on a
// synchronisation error or when block/grid dimensions are zero or a block exceeds 1024 threads.
// Not re-entrant; one launch at a time per OS thread.
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

// Block barrier; `site` identifies the call site (file:line) for divergence reports.
void syncthreads(const char* file, int line);

enum class Collective : int { kSync, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
// A warp collective: every lane in `mask` contributes (value, arg) and receives the result.
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace qmoe::emu

#define threadIdx (::qmoe::emu::thread_idx())
#define blockIdx (::qmoe::emu::block_idx())
#define blockDim (::qmoe::emu::block_dim())
#define gridDim (::qmoe::emu::grid_dim())
#define __syncthreads() ::qmoe::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(mask)                                                                         \
  (void)::qmoe::emu::warp_collective(::qmoe::emu::Collective::kSync, (mask), 0, 0, 32, __FILE__, \
                                     __LINE__)

#define QMOE_EMU_SHFL(kind, mask, v, arg, width)                                                   \
  ::qmoe::emu::from_bits<std::remove_cvref_t<decltype(v)>>(                                        \
      ::qmoe::emu::warp_collective(::qmoe::emu::Collective::kind, (mask), ::qmoe::emu::to_bits(v), \
                                   (arg), (width), __FILE__, __LINE__))
#define QMOE_EMU_W(width, ...) width
#define __shfl_sync(mask, v, src, ...) \
  QMOE_EMU_SHFL(kShfl, mask, v, src, QMOE_EMU_W(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_up_sync(mask, v, d, ...) \
  QMOE_EMU_SHFL(kShflUp, mask, v, d, QMOE_EMU_W(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_down_sync(mask, v, d, ...) \
  QMOE_EMU_SHFL(kShflDown, mask, v, d, QMOE_EMU_W(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __shfl_xor_sync(mask, v, m, ...) \
  QMOE_EMU_SHFL(kShflXor, mask, v, m, QMOE_EMU_W(__VA_ARGS__ __VA_OPT__(, ) 32))
#define __ballot_sync(mask, p)                                                                 \
  static_cast<unsigned>(::qmoe::emu::warp_collective(::qmoe::emu::Collective::kBallot, (mask), \
                                                     (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p)                                                            \
  static_cast<int>(::qmoe::emu::warp_collective(::qmoe::emu::Collective::kAny, (mask), \
                                                (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p)                                                            \
  static_cast<int>(::qmoe::emu::warp_collective(::qmoe::emu::Collective::kAll, (mask), \
                                                (p) ? 1u : 0u, 0, 32, __FILE__, __LINE__))

// ---- intrinsics the kernels use (semantics of the CUDA math/integer intrinsics) --------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __ffs(int v) {
  return v == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(v)) + 1;
}
inline int __ffs(unsigned v) {
  return v == 0 ? 0 : __builtin_ctz(v) + 1;
}
inline int __popc(unsigned v) {
  return __builtin_popcount(v);
}
// Fibers never run concurrently, so a plain read-modify-write is atomic.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}

struct float4 {
  float x, y, z, w;
};
