// The CUDA emulation itself: correct programs run correctly, and synchronisation bugs that a GPU
// may or may not survive (divergent barriers, exited lanes in collectives) fail loudly.
#include <gtest/gtest.h>

#include <vector>

#include "emu/runtime.h"

namespace qmoe::emu {
namespace {

constexpr unsigned kAll = 0xffffffffu;

// ---- kernels under test (CUDA spelling, compiled by the host compiler) ----------------------

__global__ void block_sum_kernel(const int* in, int* out) {
  __shared__ int buf[128];
  buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) __syncthreads();  // the other threads skip it: UB on a GPU
}

__global__ void two_barrier_sites_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_shuffle_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(kAll, static_cast<int>(threadIdx.x), 0);
}

__global__ void mismatched_collectives_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kAll, 1, 1);
  } else {
    out[threadIdx.x] = static_cast<int>(__ballot_sync(kAll, 1));
  }
}

__global__ void warp_ops_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int v = lane * 10;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(kAll, v, 7);
  o[1] = __shfl_up_sync(kAll, v, 3);
  o[2] = __shfl_down_sync(kAll, v, 5);
  o[3] = __shfl_xor_sync(kAll, v, 6);
  o[4] = __shfl_down_sync(kAll, v, 2, 8);  // 8-lane segments
  o[5] = static_cast<int>(__ballot_sync(kAll, lane % 3 == 0));
  o[6] = __any_sync(kAll, lane == 17);
  o[7] = __all_sync(kAll, lane < 31);
  __syncwarp(kAll);
}

__global__ void per_block_shared_kernel(int* out) {
  __shared__ int tag;
  if (threadIdx.x == 0) tag = static_cast<int>(blockIdx.x) * 100 + static_cast<int>(blockIdx.y);
  __syncthreads();
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x] = tag;
}

__global__ void atomic_kernel(int* counter) {
  atomicAdd(counter, 1);
}

__global__ void partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(kAll, 1, 0);
}

// ---- tests --------------------------------------------------------------------------------------

TEST(Emulator, BlockReductionWithBarriers) {
  std::vector<int> in(3 * 128), out(3, -1);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i);
  launch(dim3(3), dim3(128), [&] { block_sum_kernel(in.data(), out.data()); });
  for (int b = 0; b < 3; ++b) {
    int want = 0;
    for (int i = 0; i < 128; ++i) want += b * 128 + i;
    EXPECT_EQ(out[b], want);
  }
}

TEST(Emulator, DivergentBarrierIsReported) {
  try {
    launch(dim3(1), dim3(64), [] { divergent_barrier_kernel(); });
    FAIL() << "divergent barrier not detected";
  } catch (const EmulationError& e) {
    EXPECT_NE(std::string(e.what()).find("divergent __syncthreads"), std::string::npos) << e.what();
  }
}

TEST(Emulator, BarriersAtDifferentSitesAreReported) {
  EXPECT_THROW(launch(dim3(1), dim3(64), [] { two_barrier_sites_kernel(); }), EmulationError);
}

TEST(Emulator, ExitedThreadBeforeBarrierIsReported) {
  std::vector<int> out(64, 0);
  try {
    launch(dim3(1), dim3(64), [&] { early_exit_kernel(out.data()); });
    FAIL() << "barrier skipped by an exited thread not detected";
  } catch (const EmulationError& e) {
    EXPECT_NE(std::string(e.what()).find("exited"), std::string::npos) << e.what();
  }
}

TEST(Emulator, ShuffleWithExitedLaneDeadlocks) {
  std::vector<int> out(32, 0);
  try {
    launch(dim3(1), dim3(32), [&] { exited_lane_shuffle_kernel(out.data()); });
    FAIL() << "deadlock not detected";
  } catch (const EmulationError& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
}

TEST(Emulator, MismatchedCollectivesAreReported) {
  std::vector<int> out(32, 0);
  EXPECT_THROW(launch(dim3(1), dim3(32), [&] { mismatched_collectives_kernel(out.data()); }),
               EmulationError);
}

TEST(Emulator, MaskNamingMissingLanesIsReported) {
  std::vector<int> out(40, 0);
  EXPECT_THROW(launch(dim3(1), dim3(40), [&] { partial_warp_kernel(out.data()); }), EmulationError);
}

TEST(Emulator, WarpOperationsFollowCudaSemantics) {
  std::vector<int> out(64 * 8, -1);
  launch(dim3(1), dim3(64), [&] { warp_ops_kernel(out.data()); });
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    const int* o = out.data() + t * 8;
    EXPECT_EQ(o[0], 70);
    EXPECT_EQ(o[1], lane >= 3 ? (lane - 3) * 10 : lane * 10);
    EXPECT_EQ(o[2], lane + 5 < 32 ? (lane + 5) * 10 : lane * 10);
    EXPECT_EQ(o[3], (lane ^ 6) * 10);
    EXPECT_EQ(o[4], lane % 8 + 2 < 8 ? (lane + 2) * 10 : lane * 10);
    unsigned ballot = 0;
    for (int i = 0; i < 32; i += 3) ballot |= 1u << i;
    EXPECT_EQ(static_cast<unsigned>(o[5]), ballot);
    EXPECT_EQ(o[6], 1);
    EXPECT_EQ(o[7], 0);
  }
}

TEST(Emulator, SharedMemoryIsPerBlockAndIndicesAreRight) {
  std::vector<int> out(3 * 2 * 16, -1);
  launch(dim3(3, 2), dim3(16), [&] { per_block_shared_kernel(out.data()); });
  for (int by = 0; by < 2; ++by) {
    for (int bx = 0; bx < 3; ++bx) {
      for (int t = 0; t < 16; ++t) EXPECT_EQ(out[(by * 3 + bx) * 16 + t], bx * 100 + by);
    }
  }
}

TEST(Emulator, AtomicsAndMultiDimensionalBlocks) {
  int counter = 0;
  launch(dim3(2, 1, 3), dim3(8, 4, 2), [&] { atomic_kernel(&counter); });
  EXPECT_EQ(counter, 2 * 3 * 8 * 4 * 2);
}

TEST(Emulator, RejectsBadLaunches) {
  EXPECT_THROW(launch(dim3(0), dim3(32), [] {}), EmulationError);
  EXPECT_THROW(launch(dim3(1), dim3(2048), [] {}), EmulationError);
  EXPECT_THROW((void)thread_idx(), EmulationError);
}

}  // namespace
}  // namespace qmoe::emu
