// Host-thread emulation of the CUDA device code the colabx kernels use, so their index math,
// barriers and warp shuffles are exercised by the test suite on machines without a GPU.
//
// A launch runs the grid's blocks one after another; each block's threads are OS threads, so
// __syncthreads() and __shfl_xor_sync() block as they do on a GPU, and a thread that returns
// stops counting at later barriers (as an exited GPU thread does). Supported: 1-D blocks;
// __syncthreads, the __shfl*_sync family on full warps, __ldg, the __pipeline_* copies
// (synchronous here), device min / max; shared memory either as one `extern
// __shared__` array per kernel named smem_raw (filled with 0xff bytes, NaN as floats, before
// each block so reads of unwritten shared memory show) or, where a translation unit defines
// __shared__ as `static`, as fixed-size arrays (blocks run in turn, so one copy serves them all).
// Host side: `kernel<<<grid, block, smem, stream>>>(args)` must be rewritten to
// `cuda_emu::launcher(kernel, grid, block, smem, stream)(args)` (tests/test_cuda_emulation.py
// does it on the source text), and colabx::cuda's runtime helpers are stand-ins here (an
// occupancy of `resident` blocks on the whole device, settable). Loads through __ldg, the
// __pipeline_* copies and the loss's vector stores must be aligned to their size, as a GPU
// requires (x86 would not fault). Not emulated: timing, occupancy, memory ordering between
// unsynchronised threads.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#define COLABX_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emu {

constexpr size_t kSharedBytes = 228 * 1024;
inline int shared_optin = static_cast<int>(kSharedBytes);

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<uint64_t> lanes;  // one exchange slot per thread
};
inline Block* block = nullptr;

// A misuse inside a kernel thread cannot unwind to the caller: report it and stop.
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// A GPU faults on a global or shared access not aligned to its size (a 16-byte vector load
// needs a 16-byte address); x86 does not, so the emulation checks.
inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(what);
}

// Every lane of the warp publishes v and reads lane src_lane(lane)'s value (its own when that
// is outside 0..31, as __shfl_up/down_sync keep a lane's value past the warp's ends).
template <typename T, typename SrcLane>
T shfl(T v, SrcLane src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned tid = threadIdx.x, w = tid / 32;
  const int lane = static_cast<int>(tid & 31u), from = src_lane(lane);
  const unsigned src = (tid & ~31u) | static_cast<unsigned>(from >= 0 && from < 32 ? from : lane);
  if (src >= blockDim.x) fail("__shfl*_sync: source lane outside the block");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  block->lanes[tid] = bits;
  block->warp[w]->arrive_and_wait();
  bits = block->lanes[src];
  block->warp[w]->arrive_and_wait();  // every lane has read before the slots are reused
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Dynamic shared memory for launcher(): the array the translation unit defined for its kernels'
// `extern __shared__` declaration (set it before launching), else a buffer of its own.
alignas(16) inline unsigned char own_shared[kSharedBytes];
inline unsigned char* dynamic_shared = own_shared;

// Runs kernel(args...) on grid x block threads; `shared` points at the kernel's dynamic shared
// array. One OS thread per thread of a block, reused for every block: a gate barrier between
// blocks, whose completion step (one thread, all others waiting) sets up the next block.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 threads, size_t smem, unsigned char* shared,
            Args... args) {
  if (threads.y != 1 || threads.z != 1) throw std::logic_error("emulation: 1-D blocks only");
  if (smem > static_cast<size_t>(shared_optin))
    throw std::logic_error("emulation: more shared memory than the device grants a block");
  gridDim = grid;
  blockDim = threads;
  const unsigned n = threads.x, nwarps = (n + 31) / 32;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (n == 0 || nblocks == 0) return;
  uint64_t next = 0;
  std::unique_ptr<Block> current;
  auto setup_next = [&]() noexcept {
    if (next == nblocks) {
      block = nullptr;
      return;
    }
    current = std::make_unique<Block>();
    current->all = std::make_unique<std::barrier<>>(n);
    for (unsigned w = 0; w < nwarps; ++w)
      current->warp.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
    current->lanes.assign(n, 0);
    block = current.get();
    std::memset(shared, 0xff, kSharedBytes);
    ++next;
  };
  std::barrier gate(static_cast<std::ptrdiff_t>(n), setup_next);
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (unsigned tx = 0; tx < n; ++tx)
    pool.emplace_back([&, tx] {
      for (;;) {
        gate.arrive_and_wait();
        Block* b = block;
        if (b == nullptr) return;
        const uint64_t i = next - 1;
        threadIdx = dim3(tx, 0, 0);
        blockIdx = dim3(unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                        unsigned(i / (uint64_t(grid.x) * grid.y)));
        kernel(args...);
        b->warp[tx / 32]->arrive_and_drop();
        b->all->arrive_and_drop();
      }
    });
  for (auto& th : pool) th.join();
}

// What `kernel<<<grid, threads, smem, stream>>>` becomes: launcher(kernel, grid, threads, smem,
// stream)(args...).
template <typename Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid, threads;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    launch(kernel, grid, threads, smem, dynamic_shared, args...);
  }
};

template <typename Kernel>
Launcher<Kernel> launcher(Kernel kernel, dim3 grid, dim3 threads, size_t smem = 0,
                          cudaStream_t = nullptr) {
  return Launcher<Kernel>{kernel, grid, threads, smem};
}

// Blocks resident on the emulated device at once (what occupancy queries answer).
inline int resident = 132;

// The C entry points' error convention: fn()'s return code (0 when it returns nothing), or 1
// with the exception's message in err.
template <typename Fn>
int guarded(char* err, int errlen, Fn&& fn) {
  try {
    if constexpr (std::is_void_v<decltype(fn())>) {
      fn();
      return 0;
    } else {
      return fn();
    }
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
}

// A C array argument as the std::vector the host entry points take.
template <typename T>
std::vector<T> vec(const T* p, int n) {
  return std::vector<T>(p, p + n);
}

}  // namespace cuda_emu

// The occupancy the emulated device reports, settable from Python (defined here, not inline: each
// emulation library is one translation unit, and the symbol must be exported).
extern "C" void emu_set_resident_blocks(int blocks) { cuda_emu::resident = blocks; }
// The opt-in shared memory per block the emulated device reports (sm_75: 64 KB, sm_86: 99 KB).
extern "C" void emu_set_shared_optin(int bytes) { cuda_emu::shared_optin = bytes; }

inline void __syncthreads() { cuda_emu::block->all->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return cuda_emu::shfl(v, [=](int lane) { return lane ^ lane_mask; });
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane) {
  return cuda_emu::shfl(v, [=](int) { return src_lane & 31; });
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  return cuda_emu::shfl(v, [=](int lane) { return lane - static_cast<int>(delta); });
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
  return cuda_emu::shfl(v, [=](int lane) { return lane + static_cast<int>(delta); });
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
  cuda_emu::check_aligned(dst, bytes, "__pipeline_memcpy_async: destination misaligned");
  cuda_emu::check_aligned(src, bytes, "__pipeline_memcpy_async: source misaligned");
  std::memcpy(dst, src, bytes);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

// The runtime calls the colabx sources make outside colabx::cuda's helpers.
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = cuda_emu::shared_optin;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int bytes) {
  return bytes <= cuda_emu::shared_optin ? cudaSuccess : 1;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline double __longlong_as_double(long long i) {
  double f;
  std::memcpy(&f, &i, 8);
  return f;
}

template <typename T>
T __ldg(const T* p) {
  if constexpr ((sizeof(T) & (sizeof(T) - 1)) == 0)
    cuda_emu::check_aligned(p, sizeof(T), "__ldg: address not aligned to the load's size");
  return *p;
}

// colabx::cuda's runtime helpers (csrc/cuda/runtime.h), for the emulated device.
namespace colabx::cuda {
struct DeviceScope {
  DeviceScope(int, const char*) {}
};
inline void check_launch(const char*) {}
inline int resident_blocks(const void*, int, size_t, int, const char*) { return cuda_emu::resident; }
}  // namespace colabx::cuda
