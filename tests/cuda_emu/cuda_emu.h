// CUDA on the CPU, for testing: runs the kernels of csrc/cuda/*.cu on host memory, one thread block
// at a time, each CUDA thread a cooperative fiber (ucontext) on the calling OS thread.
//
// Why: the CI machines have no GPU, and the kernels must not first run on the day one is lent.
// tests/cuda_emu/translate.py rewrites a .cu file into C++ that includes this header (kernel
// launches, __shared__ declarations and the few inline-PTX instructions become calls into it), and
// tests/test_cuda_emulated.py checks the results against the plain-PyTorch references.
//
// What it models, and checks (a violation raises a RuntimeError naming the kernel and the rule):
//   * grid / block indices and the launch limits (block <= 1024 threads, grid.y/z <= 65535, no
//     empty grid: CUDA's "invalid configuration argument");
//   * __syncthreads as a block barrier: every thread of the block must reach it, at the same call
//     site; a barrier some threads skipped (returned early, other branch) is reported;
//   * warp shuffles (__shfl_sync / _up / _down / _xor) with their width and mask rules: every lane
//     named in the mask must execute the same shuffle, the calling lane must be in it, and a lane
//     may not read from a lane outside the mask (undefined on the device). Warps are *not* run in
//     lockstep, so code that relies on implicit warp synchrony fails here as it may on Volta+;
//   * __shared__ memory: one arena per block, filled with 0xFF bytes (NaN for floats) at the start
//     of every block, so a read before any write shows up as a NaN or a garbage key;
//   * atomics (trivially atomic: fibers switch only at barriers and shuffles);
//   * CUDA_KERNEL_ASSERT: a failure is reported after the launch, as a device-side assert is;
//   * out-of-bounds global (and local) accesses, when built with AddressSanitizer
//     (JSIGR_CUDA_EMU_ASAN=1; the fiber switches are annotated for it).
// Threads run in index order between synchronisation points, or in reverse order with
// JSIGR_CUDA_EMU_ORDER=reverse: a missing barrier then reads data not yet written in one of the two.
//
// What it does not model: timing and performance, memory coalescing, the device's float
// intrinsics (__expf, --use_fast_math, -ftz: the host's IEEE operations run instead; the PTX of
// the flags is checked by tests/test_cuda_compile.py), and data races between threads that do not
// synchronise (no preemption). Out-of-bounds accesses within one allocation (row n reading row
// n + 1 of the same tensor) are invisible even to ASan.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- AddressSanitizer (JSIGR_CUDA_EMU_ASAN=1 builds with -fsanitize=address): told about every
// switch between the scheduler's stack and a fiber's, so it checks the kernels' memory accesses
// without mistaking the switches for stack corruption ----
#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif

// ---- CUDA's vector types and built-in variables ----
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- the host side of the CUDA runtime the .cu files use ----
using cudaStream_t = struct CUstream_st*;
namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace cuda_emu {

enum class State : uint8_t { Run, Barrier, Shuffle, Done };
enum class ShuffleKind : uint8_t { Idx, Up, Down, Xor };

struct Fiber {
  ucontext_t ctx;
  State state = State::Done;
  int barrier_line = 0;
  // the pending shuffle
  ShuffleKind kind = ShuffleKind::Idx;
  unsigned mask = 0;
  int arg = 0, width = 32, line = 0;
  uint64_t in = 0, out = 0;
  void* asan_fake_stack = nullptr;
};

struct Runtime {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  int threads = 0;
  std::function<void()> body;
  const char* kernel = "";
  std::string error;  // the first rule broken in this launch
  void* asan_fake_stack = nullptr;  // the scheduler's, while a fiber runs
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  // __shared__ arena: slots are registered on first use and keep their offset for the process
  std::vector<unsigned char> shared = std::vector<unsigned char>(1 << 20);
  size_t shared_used = 0;
};

inline Runtime& runtime() {
  static thread_local Runtime rt;
  return rt;
}

inline uint3 thread_index(int linear) {
  const unsigned bx = blockDim.x, by = blockDim.y;
  return {unsigned(linear) % bx, (unsigned(linear) / bx) % by, unsigned(linear) / (bx * by)};
}

[[noreturn]] inline void fail(const std::string& what) {
  Runtime& rt = runtime();
  TORCH_CHECK(false, "CUDA emulation: kernel ", rt.kernel, " block (", blockIdx.x, ",", blockIdx.y, ",", blockIdx.z,
              "): ", what);
}

// called from a fiber: note the first broken rule; the launch reports it when the block ends
inline void record(const std::string& what) {
  Runtime& rt = runtime();
  if (rt.error.empty()) {
    std::ostringstream s;
    s << "thread (" << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << "): " << what;
    rt.error = s.str();
  }
}

inline void yield_to_scheduler() {
  Runtime& rt = runtime();
  Fiber& f = rt.fibers[rt.current];
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.asan_fake_stack, rt.scheduler_stack, rt.scheduler_stack_size);
#endif
  swapcontext(&f.ctx, &rt.scheduler);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(rt.fibers[rt.current].asan_fake_stack, nullptr, nullptr);
#endif
}

inline void syncthreads(int line) {
  Runtime& rt = runtime();
  Fiber& f = rt.fibers[rt.current];
  f.state = State::Barrier;
  f.barrier_line = line;
  yield_to_scheduler();
}

template <typename T>
T shuffle(ShuffleKind kind, unsigned mask, T v, int arg, int width, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    record("shuffle at line " + std::to_string(line) + " with width " + std::to_string(width) +
           ": must be a power of 2 no larger than warpSize");
    width = 32;
  }
  Runtime& rt = runtime();
  Fiber& f = rt.fibers[rt.current];
  f.kind = kind;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.line = line;
  f.in = 0;
  std::memcpy(&f.in, &v, sizeof(T));
  f.state = State::Shuffle;
  yield_to_scheduler();
  T r;
  std::memcpy(&r, &rt.fibers[rt.current].out, sizeof(T));
  return r;
}

// __shfl_*_sync(mask, v, arg, width = warpSize), remembering the call site for the error messages
struct ShuffleAt {
  ShuffleKind kind;
  int line;
  template <typename T>
  T operator()(unsigned mask, T v, int arg, int width = warpSize) const {
    return shuffle(kind, mask, v, arg, width, line);
  }
};

template <typename T>
T atomic_add(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomic_max(T* p, T v) {
  const T old = *p;
  *p = std::max(old, v);
  return old;
}

// ---- __shared__: `__shared__ T name[..]` becomes `auto& name = shared_array<T[..], id>()` ----
inline size_t register_shared(size_t size, size_t align) {
  Runtime& rt = runtime();
  const size_t off = (rt.shared_used + align - 1) / align * align;
  TORCH_CHECK(size <= 48 * 1024, "CUDA emulation: a __shared__ array of ", size, " bytes exceeds the 48 KiB static limit");
  TORCH_CHECK(off + size <= rt.shared.size(), "CUDA emulation: __shared__ arena full");
  rt.shared_used = off + size;
  std::memset(rt.shared.data() + off, 0xFF, size);
  return off;
}
template <typename T, int ID>
T& shared_array() {
  static const size_t off = register_shared(sizeof(T), alignof(T));
  return *reinterpret_cast<T*>(runtime().shared.data() + off);
}

// ---- the fibers' stacks: mapped once, reused by every launch ----
constexpr size_t kStack = 256 * 1024;
inline char* stack_of(int i) {
  static std::vector<char*> stacks;
  while (int(stacks.size()) <= i) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[i];
}

inline void fiber_entry() {
  Runtime& rt = runtime();
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt.scheduler_stack, &rt.scheduler_stack_size);
#endif
  try {
    rt.body();
  } catch (const std::exception& e) {
    record(std::string("exception in device code: ") + e.what());
  }
  rt.fibers[rt.current].state = State::Done;
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, rt.scheduler_stack, rt.scheduler_stack_size);  // this fiber ends
#endif
  // returning resumes uc_link, the scheduler
}

inline const char* state_name(State s) {
  switch (s) {
    case State::Run: return "running";
    case State::Barrier: return "__syncthreads";
    case State::Shuffle: return "shuffle";
    case State::Done: return "exited";
  }
  return "?";
}

inline std::string describe(const Runtime& rt) {
  std::ostringstream s;
  int counts[4] = {0, 0, 0, 0};
  for (const Fiber& f : rt.fibers) counts[int(f.state)]++;
  s << "threads: " << counts[int(State::Barrier)] << " at __syncthreads, " << counts[int(State::Shuffle)]
    << " at a shuffle, " << counts[int(State::Done)] << " exited";
  return s.str();
}

// lane `lane` of a warp of `lanes` lanes; returns the source lane of its shuffle (or -1: own value)
inline int shuffle_source(const Fiber& f, int lane) {
  const int w = f.width, seg = lane / w * w;
  switch (f.kind) {
    case ShuffleKind::Idx: return seg + ((f.arg % w) + w) % w;
    case ShuffleKind::Up: return lane - f.arg >= seg ? lane - f.arg : -1;
    case ShuffleKind::Down: return lane + f.arg < seg + w ? lane + f.arg : -1;
    case ShuffleKind::Xor: {
      const int src = lane ^ f.arg;
      return src < seg + w ? src : -1;
    }
  }
  return -1;
}

// Resolve the shuffles of warp `w` whose named lanes have all arrived; false if none did.
inline bool resolve_warp(Runtime& rt, int w) {
  const int first = w * 32, lanes = std::min(32, rt.threads - first);
  int leader = -1;
  for (int l = 0; l < lanes; ++l) {
    if (rt.fibers[first + l].state == State::Shuffle) {
      leader = l;
      break;
    }
  }
  if (leader < 0) return false;
  const Fiber& lf = rt.fibers[first + leader];
  const unsigned mask = lf.mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= lanes) {
      fail("shuffle at line " + std::to_string(lf.line) + " names lane " + std::to_string(l) + " in its mask, but warp " +
           std::to_string(w) + " has only " + std::to_string(lanes) + " lanes (block of " + std::to_string(rt.threads) +
           " threads): undefined on the device");
    }
    const Fiber& f = rt.fibers[first + l];
    if (f.state == State::Done) {
      fail("shuffle at line " + std::to_string(lf.line) + " names lane " + std::to_string(l) + " of warp " +
           std::to_string(w) + " in its mask, but that lane has exited: undefined on the device");
    }
    if (f.state != State::Shuffle) {
      fail("deadlock: lanes of warp " + std::to_string(w) + " wait at the shuffle at line " + std::to_string(lf.line) +
           " while lane " + std::to_string(l) + " waits at " + state_name(f.state) + " (line " +
           std::to_string(f.barrier_line) + ")");
    }
    if (f.mask != mask || f.line != lf.line || f.kind != lf.kind || f.width != lf.width) {
      fail("lanes of warp " + std::to_string(w) + " meet at different shuffles (lines " + std::to_string(lf.line) +
           " and " + std::to_string(f.line) + ") or with different masks / widths");
    }
  }
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = rt.fibers[first + l];
    if (f.state == State::Shuffle && !(f.mask >> l & 1u)) {
      fail("lane " + std::to_string(l) + " of warp " + std::to_string(w) + " calls a shuffle whose mask does not name it");
    }
  }
  for (int l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = rt.fibers[first + l];
    const int src = shuffle_source(f, l);
    if (src >= 0 && !(mask >> src & 1u)) {
      fail("lane " + std::to_string(l) + " of warp " + std::to_string(w) + " reads lane " + std::to_string(src) +
           ", which is not in the shuffle's mask (line " + std::to_string(f.line) + "): undefined on the device");
    }
    f.out = src >= 0 ? rt.fibers[first + src].in : f.in;
  }
  for (int l = 0; l < lanes; ++l) {
    if (mask >> l & 1u) rt.fibers[first + l].state = State::Run;
  }
  return true;
}

inline bool reverse_order() {
  const char* o = std::getenv("JSIGR_CUDA_EMU_ORDER");
  if (o == nullptr || *o == '\0' || std::strcmp(o, "forward") == 0) return false;
  TORCH_CHECK(std::strcmp(o, "reverse") == 0, "CUDA emulation: JSIGR_CUDA_EMU_ORDER must be forward or reverse, got '", o,
              "'");
  return true;
}

inline void run_block(Runtime& rt, bool reverse) {
  const int T = rt.threads;
  std::memset(rt.shared.data(), 0xFF, rt.shared_used);
  for (int i = 0; i < T; ++i) {
    Fiber& f = rt.fibers[i];
    f.state = State::Run;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_of(i);
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &rt.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    for (int k = 0; k < T; ++k) {
      const int i = reverse ? T - 1 - k : k;
      if (rt.fibers[i].state != State::Run) continue;
      rt.current = i;
      threadIdx = thread_index(i);
#if CUDA_EMU_ASAN
      __sanitizer_start_switch_fiber(&rt.asan_fake_stack, stack_of(i), kStack);
#endif
      swapcontext(&rt.scheduler, &rt.fibers[i].ctx);
#if CUDA_EMU_ASAN
      __sanitizer_finish_switch_fiber(rt.asan_fake_stack, nullptr, nullptr);
#endif
    }
    if (!rt.error.empty()) fail(rt.error);
    int done = 0, barrier = 0, shuffle = 0;
    for (const Fiber& f : rt.fibers) {
      done += f.state == State::Done;
      barrier += f.state == State::Barrier;
      shuffle += f.state == State::Shuffle;
    }
    if (done == T) return;
    bool released = false;
    if (shuffle > 0) {
      for (int w = 0; w * 32 < T; ++w) released |= resolve_warp(rt, w);
    } else if (barrier == T - done) {
      if (done > 0) {
        fail("__syncthreads (line " + std::to_string(rt.fibers[0].barrier_line) + ") reached by " + std::to_string(barrier) +
             " threads while " + std::to_string(done) + " have exited: a barrier not every thread of the block reaches");
      }
      const int line = rt.fibers[0].barrier_line;
      for (Fiber& f : rt.fibers) {
        if (f.barrier_line != line) {
          fail("threads wait at different __syncthreads (lines " + std::to_string(line) + " and " +
               std::to_string(f.barrier_line) + "): a barrier in divergent code");
        }
        f.state = State::Run;
      }
      released = true;
    }
    if (!released) fail("deadlock: " + describe(rt));
  }
}

template <typename S, typename... P, typename... A>
void launch(const char* name, dim3 grid, dim3 block, size_t smem, S&&, void (*kernel)(P...), A&&... args) {
  Runtime& rt = runtime();
  rt.kernel = name;
  rt.error.clear();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && threads >= 1 && threads <= 1024 && block.z <= 64 &&
                  grid.y <= 65535 && grid.z <= 65535,
              "CUDA emulation: kernel ", name, " launched with grid (", grid.x, ",", grid.y, ",", grid.z, ") block (",
              block.x, ",", block.y, ",", block.z, "): invalid configuration argument on the device");
  TORCH_CHECK(smem == 0, "CUDA emulation: dynamic shared memory is not modelled (kernel ", name, ")");
  // the arguments are converted to the kernel's parameter types once, as the launch copies them
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  rt.body = [&] { std::apply(kernel, params); };
  rt.threads = int(threads);
  rt.fibers.assign(threads, Fiber{});
  gridDim = grid;
  blockDim = block;
  const bool reverse = reverse_order();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block(rt, reverse);
      }
    }
  }
  rt.body = nullptr;
}

}  // namespace cuda_emu

// ---- device intrinsics ----
#define __syncthreads() ::cuda_emu::syncthreads(__LINE__)
#define __shfl_sync ::cuda_emu::ShuffleAt{::cuda_emu::ShuffleKind::Idx, __LINE__}
#define __shfl_up_sync ::cuda_emu::ShuffleAt{::cuda_emu::ShuffleKind::Up, __LINE__}
#define __shfl_down_sync ::cuda_emu::ShuffleAt{::cuda_emu::ShuffleKind::Down, __LINE__}
#define __shfl_xor_sync ::cuda_emu::ShuffleAt{::cuda_emu::ShuffleKind::Xor, __LINE__}

template <typename T, typename U>
T atomicAdd(T* p, U v) {
  return ::cuda_emu::atomic_add(p, static_cast<T>(v));
}
template <typename T, typename U>
T atomicMax(T* p, U v) {
  return ::cuda_emu::atomic_max(p, static_cast<T>(v));
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// A failed device-side assert is reported once the launch is over (the device's
// "device-side assert triggered"), naming the condition.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) ::cuda_emu::record("device-side assert failed: " #cond " (line " + std::to_string(__LINE__) + ")"); \
  } while (0)
