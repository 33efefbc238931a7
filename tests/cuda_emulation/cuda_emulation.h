// Host-thread emulation of the CUDA device code the colabx kernels use, so their index math,
// barriers and warp shuffles are exercised by the test suite on machines without a GPU.
//
// A launch runs the grid's blocks one after another; each block's threads are OS threads, so
// __syncthreads() and __shfl_xor_sync() block as they do on a GPU, and a thread that returns
// stops counting at later barriers (as an exited GPU thread does). Supported: 1-D blocks, one
// `extern __shared__` array per kernel named smem_raw (filled with 0xff bytes, NaN as floats,
// before each block so reads of unwritten shared memory show), __syncthreads, __shfl_xor_sync on
// full warps. Not emulated: timing, occupancy, memory ordering between unsynchronised threads.
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

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emu {

constexpr size_t kSharedBytes = 228 * 1024;

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

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned tid = threadIdx.x, w = tid / 32;
  const unsigned src = (tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(lane_mask));
  if (src >= blockDim.x) fail("__shfl_xor_sync: source lane outside the block");
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

// Runs kernel(args...) on grid x block threads; `shared` points at the kernel's smem_raw.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 threads, size_t smem, unsigned char* shared,
            Args... args) {
  if (threads.y != 1 || threads.z != 1) throw std::logic_error("emulation: 1-D blocks only");
  if (smem > kSharedBytes) throw std::logic_error("emulation: more shared memory than a GPU has");
  gridDim = grid;
  blockDim = threads;
  const unsigned n = threads.x, nwarps = (n + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.all = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < nwarps; ++w)
          b.warp.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        b.lanes.assign(n, 0);
        block = &b;
        std::memset(shared, 0xff, kSharedBytes);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (unsigned tx = 0; tx < n; ++tx)
          pool.emplace_back([&, tx] {
            threadIdx = dim3(tx, 0, 0);
            blockIdx = dim3(bx, by, bz);
            kernel(args...);
            b.warp[tx / 32]->arrive_and_drop();
            b.all->arrive_and_drop();
          });
        for (auto& th : pool) th.join();
        block = nullptr;
      }
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::block->all->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return cuda_emu::shfl_xor(v, lane_mask);
}

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
