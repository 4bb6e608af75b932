// Fiber scheduler behind emu/runtime.h. See the header for the execution model.
#include "runtime.h"

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define QMOE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QMOE_EMU_ASAN 1
#endif
#endif
#if defined(QMOE_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

#include <memory>
#include <vector>

namespace qmoe::emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t ctx{};
  std::unique_ptr<char[]> stack;
  uint3 tid;
  State state = State::kDone;
  const char* file = nullptr;  // where it waits
  int line = 0;
};

struct Warp {
  unsigned arrived = 0;
  unsigned mask = 0;
  Collective kind = Collective::kSync;
  int width = 32;
  const char* file = nullptr;
  int line = 0;
  uint64_t in[32] = {};
  int arg[32] = {};
  uint64_t out[32] = {};
};

struct Launch {
  dim3 grid, block;
  uint3 block_id;
  const std::function<void()>* body = nullptr;
  int nthreads = 0;
  int current = -1;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler{};
  std::string error;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer's fiber annotations
  size_t scheduler_stack_size = 0;
};

// Thrown inside a fiber to unwind its stack (running destructors) after an error was recorded.
struct FiberAbort {};

thread_local Launch* g_launch = nullptr;

// AddressSanitizer must be told about every stack switch, or it reports false stack errors.
#if defined(QMOE_EMU_ASAN)
void asan_enter_fiber(void** fake, const Fiber& f) {
  __sanitizer_start_switch_fiber(fake, f.stack.get(), kStackBytes);
}
void asan_back_in_scheduler(void* fake) {
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
}
void asan_leave_fiber(void** fake, const Launch& l) {
  __sanitizer_start_switch_fiber(fake, l.scheduler_stack, l.scheduler_stack_size);
}
void asan_in_fiber(void* fake, Launch& l) {
  __sanitizer_finish_switch_fiber(fake, &l.scheduler_stack, &l.scheduler_stack_size);
}
#else
void asan_enter_fiber(void**, const Fiber&) {}
void asan_back_in_scheduler(void*) {}
void asan_leave_fiber(void**, const Launch&) {}
void asan_in_fiber(void*, Launch&) {}
#endif

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ")";
}

std::string block_name(const Launch& l) {
  return "block (" + std::to_string(l.block_id.x) + "," + std::to_string(l.block_id.y) + "," +
         std::to_string(l.block_id.z) + ")";
}

void fiber_entry() {
  Launch& l = *g_launch;
  asan_in_fiber(nullptr, l);
  try {
    (*l.body)();
  } catch (const FiberAbort&) {
    // l.error holds the reason; the stack is unwound.
  } catch (const std::exception& e) {
    if (l.error.empty())
      l.error = block_name(l) + " " + thread_name(l.fibers[l.current]) + ": exception: " + e.what();
  } catch (...) {
    if (l.error.empty()) l.error = block_name(l) + ": unknown exception in kernel body";
  }
  l.fibers[l.current].state = State::kDone;
  asan_leave_fiber(nullptr, l);  // this fiber's stack is finished
  // uc_link returns to the scheduler.
}

Launch& active() {
  if (g_launch == nullptr || g_launch->current < 0) {
    throw EmulationError("CUDA emulation: device intrinsic called outside an emulated kernel");
  }
  return *g_launch;
}

// Gives the CPU back to the scheduler from the running fiber.
void yield_to_scheduler(Launch& l) {
  Fiber& f = l.fibers[l.current];
  void* fake = nullptr;
  asan_leave_fiber(&fake, l);
  swapcontext(&f.ctx, &l.scheduler);
  asan_in_fiber(fake, l);
}

// Records the first error and unwinds the calling fiber; the scheduler then stops the launch.
[[noreturn]] void fail(Launch& l, const std::string& msg) {
  if (l.error.empty()) l.error = msg;
  throw FiberAbort{};
}

// getcontext/swapcontext return twice as far as the compiler knows; keeping them in small
// non-inlined functions keeps the scheduler's loop variables out of their frames.
[[gnu::noinline]] void init_fiber(Launch& l, int t) {
  Fiber& f = l.fibers[t];
  if (!f.stack) f.stack = std::make_unique<char[]>(kStackBytes);
  f.tid = {static_cast<unsigned>(t % l.block.x), static_cast<unsigned>((t / l.block.x) % l.block.y),
           static_cast<unsigned>(t / (l.block.x * l.block.y))};
  f.state = State::kReady;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &l.scheduler;
  makecontext(&f.ctx, fiber_entry, 0);
}

[[gnu::noinline]] void resume(Launch& l, int t) {
  l.current = t;
  void* fake = nullptr;
  asan_enter_fiber(&fake, l.fibers[t]);
  swapcontext(&l.scheduler, &l.fibers[t].ctx);
  asan_back_in_scheduler(fake);
  l.current = -1;
}

void run_block(Launch& l) {
  for (auto& w : l.warps) w = Warp{};
  for (int t = 0; t < l.nthreads; ++t) init_fiber(l, t);
  for (;;) {
    bool ran = false;
    for (int t = 0; t < l.nthreads && l.error.empty(); ++t) {
      if (l.fibers[t].state != State::kReady) continue;
      resume(l, t);
      ran = true;
    }
    if (!l.error.empty()) throw EmulationError("CUDA emulation: " + l.error);
    if (ran) continue;
    // Nothing runnable: finished, a barrier to release, or a deadlock.
    int done = 0, at_barrier = 0, at_warp = 0;
    const Fiber* first_barrier = nullptr;
    const Fiber* first_done = nullptr;
    const Fiber* first_warp = nullptr;
    const Fiber* other_site = nullptr;
    for (int t = 0; t < l.nthreads; ++t) {
      const Fiber& f = l.fibers[t];
      if (f.state == State::kDone) {
        ++done;
        if (!first_done) first_done = &f;
      } else if (f.state == State::kBarrier) {
        ++at_barrier;
        if (!first_barrier) {
          first_barrier = &f;
        } else if (!other_site && (f.line != first_barrier->line ||
                                   std::strcmp(f.file, first_barrier->file) != 0)) {
          other_site = &f;
        }
      } else {
        ++at_warp;
        if (!first_warp) first_warp = &f;
      }
    }
    if (done == l.nthreads) return;
    const std::string where = block_name(l) + ": ";
    if (at_barrier == l.nthreads - done && done == 0 && !other_site) {
      for (auto& f : l.fibers) {
        if (f.state == State::kBarrier) f.state = State::kReady;
      }
      continue;
    }
    std::string msg;
    if (other_site) {
      msg = "divergent __syncthreads: " + thread_name(*first_barrier) + " waits at " +
            site(first_barrier->file, first_barrier->line) + " but " + thread_name(*other_site) +
            " waits at " + site(other_site->file, other_site->line);
    } else if (at_barrier > 0 && done > 0) {
      msg = "divergent __syncthreads at " + site(first_barrier->file, first_barrier->line) + ": " +
            std::to_string(at_barrier) + " of " + std::to_string(l.nthreads) +
            " threads wait but " + std::to_string(done) +
            " exited (first: " + thread_name(*first_done) + ")";
    } else {
      msg = "deadlock: " + std::to_string(at_warp) +
            " threads wait at warp collectives (first: " + thread_name(*first_warp) + " at " +
            site(first_warp->file, first_warp->line) + "), " + std::to_string(at_barrier) +
            " at __syncthreads, " + std::to_string(done) + " exited";
    }
    throw EmulationError("CUDA emulation: " + where + msg);
  }
}

}  // namespace

const uint3& thread_idx() {
  Launch& l = active();
  return l.fibers[l.current].tid;
}
const uint3& block_idx() {
  return active().block_id;
}
const dim3& block_dim() {
  return active().block;
}
const dim3& grid_dim() {
  return active().grid;
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (g_launch != nullptr) throw EmulationError("CUDA emulation: nested launch");
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0) {
    throw EmulationError("CUDA emulation: launch with a zero grid or block dimension");
  }
  if (nthreads > kMaxThreads) {
    throw EmulationError("CUDA emulation: block of " + std::to_string(nthreads) +
                         " threads exceeds 1024");
  }
  thread_local Launch l;  // fiber stacks are kept between launches
  l.grid = grid;
  l.block = block;
  l.body = &body;
  l.nthreads = static_cast<int>(nthreads);
  if (l.fibers.size() < nthreads) l.fibers.resize(nthreads);
  l.warps.assign((nthreads + 31) / 32, Warp{});
  l.error.clear();
  l.current = -1;
  g_launch = &l;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          l.block_id = {x, y, z};
          run_block(l);
        }
      }
    }
  } catch (...) {
    g_launch = nullptr;
    throw;
  }
  g_launch = nullptr;
}

void syncthreads(const char* file, int line) {
  Launch& l = active();
  Fiber& f = l.fibers[l.current];
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler(l);
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line) {
  Launch& l = active();
  const int t = l.current;
  const int lane = t % 32;
  Warp& w = l.warps[t / 32];
  // Built only on error: collectives are the emulator's hot path.
  auto who = [&] {
    return block_name(l) + " " + thread_name(l.fibers[t]) + " at " + site(file, line) + ": ";
  };
  if (((mask >> lane) & 1u) == 0)
    fail(l, who() + "warp collective with a mask that excludes the calling lane");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(l, who() + "shuffle width must be a power of two <= 32");
  const int warp_base = (t / 32) * 32;
  const unsigned existing =
      l.nthreads - warp_base >= 32 ? 0xffffffffu : ((1u << (l.nthreads - warp_base)) - 1u);
  if ((mask & ~existing) != 0)
    fail(l, who() + "warp collective mask names lanes that do not exist in the block");
  if (w.arrived == 0) {
    w.mask = mask;
    w.kind = kind;
    w.width = width;
    w.file = file;
    w.line = line;
  } else if (w.mask != mask || w.kind != kind || w.width != width) {
    fail(l, who() + "warp divergence: lanes meet at different collectives (other lanes wait at " +
                site(w.file, w.line) + ")");
  }
  w.in[lane] = value;
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived != w.mask) {
    Fiber& f = l.fibers[t];
    f.state = State::kWarp;
    f.file = file;
    f.line = line;
    yield_to_scheduler(l);
    return w.out[lane];
  }
  // Last lane: compute every lane's result, then wake the others.
  unsigned ballot = 0;
  for (int i = 0; i < 32; ++i) {
    if ((mask >> i) & 1u) ballot |= (w.in[i] != 0 ? 1u : 0u) << i;
  }
  for (int i = 0; i < 32; ++i) {
    if (((mask >> i) & 1u) == 0) continue;
    const int seg = i & ~(width - 1);
    const int pos = i & (width - 1);
    int src = i;
    switch (kind) {
      case Collective::kSync:
        break;
      case Collective::kShfl:
        src = seg + (w.arg[i] & (width - 1));
        break;
      case Collective::kShflUp:
        src = pos >= w.arg[i] ? i - w.arg[i] : i;
        break;
      case Collective::kShflDown:
        src = pos + w.arg[i] < width ? i + w.arg[i] : i;
        break;
      case Collective::kShflXor: {
        const int s = i ^ w.arg[i];
        src = (s & ~(width - 1)) == seg ? s : i;
        break;
      }
      case Collective::kBallot:
      case Collective::kAny:
      case Collective::kAll:
        break;
    }
    if (((mask >> src) & 1u) == 0)
      fail(l, who() + "shuffle reads lane " + std::to_string(src) + " which is not in the mask");
    switch (kind) {
      case Collective::kBallot:
        w.out[i] = ballot;
        break;
      case Collective::kAny:
        w.out[i] = ballot != 0;
        break;
      case Collective::kAll:
        w.out[i] = ballot == mask;
        break;
      default:
        w.out[i] = w.in[src];
        break;
    }
    if (i != lane) l.fibers[warp_base + i].state = State::kReady;
  }
  w.arrived = 0;
  return w.out[lane];
}

}  // namespace qmoe::emu
