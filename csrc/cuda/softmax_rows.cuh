// Device and host building blocks shared by the CUDA softmax losses (cuda/dice_ce_loss.cu,
// cuda/roi_bce_loss.cu): layout [B, K, V], a voxel's K channels V apart; each thread owns VEC
// consecutive voxels per step with all K channels in registers (K <= KM, a compile-time
// bucket); grids (G, B) of grid-stride blocks per item sized to whole waves of resident blocks.
// Included by exactly those two files (everything lives in an anonymous namespace of each); it
// brings the CUDA runtime, or nothing under COLABX_CUDA_EMULATION (tests/cuda_emulation).
#pragma once

#if !defined(COLABX_CUDA_EMULATION)
#include <cuda_runtime.h>

#include "cuda/runtime.h"
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dice_ce_loss.h"
#include "common/dispatch.h"
#include "cuda/dice_ce_loss.h"

namespace colabx::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Buckets of up to 4 channels hold exactly K channels (dispatch_km): each kernel then replaces
// its K argument by the constant KM, so every `k < K` test on the voxel path folds away (with a
// run-time K in a 4-wide bucket those tests stay in the voxel loops and lengthen them by half).
template <int KM>
constexpr bool kExactK = KM <= 4;

template <int KM>
struct Bucket {
  static constexpr int vec = KM <= 4 ? 4 : (KM <= 8 ? 2 : 1);
  static constexpr int64_t tile = int64_t(kThreads) * vec;  // voxels per block step
  static_assert(tile % kDcePartialVoxels == 0, "the workspace holds a partial per tile");
};

// Tiles of V voxels (the last may be ragged): the grid-stride step count, host and device.
template <int KM>
__host__ __device__ __forceinline__ int64_t num_tiles(int64_t V) {
  return (V + Bucket<KM>::tile - 1) / Bucket<KM>::tile;
}

// Tiles a forward thread sums in the accumulator type before its warp flushes them to float64:
// 16 voxels per thread in every bucket.
constexpr int64_t kFlushVoxels = 16 * kThreads;
template <int KM>
constexpr int kFlushTiles = static_cast<int>(kFlushVoxels / Bucket<KM>::tile);

// A row segment of N elements of T moves as 32-bit words with the widest global access its size
// allows (one LDG/STG.128 per 16 bytes). Stores are inline PTX st.global.v4/v2: nvcc splits a
// plain copy of an aligned struct, or of a uint4, into four scalar stores. Segments under 4
// bytes (N uint8 labels, one 16-bit value) stay element-wise.
template <typename T, int N>
constexpr bool kWordVec = sizeof(T) * N >= 4 && (sizeof(T) * N) % 4 == 0;

template <int W>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ src, uint32_t (&w)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 4) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(src) + i / 4);
      w[i] = q.x;
      w[i + 1] = q.y;
      w[i + 2] = q.z;
      w[i + 3] = q.w;
    }
  } else if constexpr (W == 2) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(src));
    w[0] = q.x;
    w[1] = q.y;
  } else {
    static_assert(W == 1, "row segments are 4, 8 or a multiple of 16 bytes");
    w[0] = __ldg(src);
  }
}

template <int W>
__device__ __forceinline__ void store_words(uint32_t* __restrict__ dst, const uint32_t (&w)[W]) {
#if defined(COLABX_CUDA_EMULATION)
  cuda_emu::check_aligned(dst, W % 4 == 0 ? 16 : 4 * W, "store_words: vector store not aligned");
  for (int i = 0; i < W; ++i) dst[i] = w[i];
#else
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 4)
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(
                       __cvta_generic_to_global(dst + i)),
                   "r"(w[i]), "r"(w[i + 1]), "r"(w[i + 2]), "r"(w[i + 3]));
  } else if constexpr (W == 2) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(dst)),
                 "r"(w[0]), "r"(w[1]));
  } else {
    static_assert(W == 1, "row segments are 4, 8 or a multiple of 16 bytes");
    dst[0] = w[0];
  }
#endif
}

// out[j] = row[v0 + j] for j < N; vector access when `aligned` (row + v0 aligned to sizeof(T) * N)
// and the segment is whole, element-wise at the ragged end (zeros past V).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int64_t v0, int64_t V,
                                         bool aligned, T (&out)[N]) {
  if constexpr (kWordVec<T, N>) {
    if (aligned && v0 + N <= V) {
      uint32_t w[sizeof(T) * N / 4];
      load_words(reinterpret_cast<const uint32_t*>(row + v0), w);
      memcpy(out, w, sizeof(w));
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = (v0 + j < V) ? row[v0 + j] : T{};
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ row, int64_t v0, int64_t V, bool aligned,
                                          const T (&in)[N]) {
  if constexpr (kWordVec<T, N>) {
    if (aligned && v0 + N <= V) {
      uint32_t w[sizeof(T) * N / 4];
      memcpy(w, in, sizeof(w));
      store_words(reinterpret_cast<uint32_t*>(row + v0), w);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (v0 + j < V) row[v0 + j] = in[j];
}

// One thread's tile: VEC voxels from v0 of every channel row of the logits and of the targets
// (one row of hard labels, or K rows of soft targets).
template <bool HARD, int KM, int VEC, typename TL, typename TT>
__device__ __forceinline__ void load_tile(const TL* __restrict__ zb, const TT* __restrict__ tb,
                                          int K, int64_t v0, int64_t V, bool aligned,
                                          TL (&zr)[KM][VEC], TT (&yr)[HARD ? 1 : KM][VEC]) {
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) load_vec(zb + k * V, v0, V, aligned, zr[k]);
  if constexpr (HARD) {
    load_vec(tb, v0, V, aligned, yr[0]);
  } else {
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (k < K) load_vec(tb + k * V, v0, V, aligned, yr[k]);
  }
}

// Target of channel k at the tile's voxel j: one-hot of the hard label, or the soft target.
template <bool HARD, typename A, typename TT, int R, int VEC>
__device__ __forceinline__ A target_value(const TT (&yr)[R][VEC], int k, int j) {
  if constexpr (HARD)
    return static_cast<int64_t>(yr[0][j]) == k ? A(1) : A(0);
  else
    return static_cast<A>(yr[k][j]);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Adds the warp's butterfly totals of acc[0..N) to that warp's float64 running sums (lane 0
// writes them) and zeroes acc. All lanes of the warp must call it together.
template <int N, typename A>
__device__ __forceinline__ void flush_to_warp_sums(A (&acc)[N], double* __restrict__ wsum,
                                                   int lane) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const A s = warp_sum(acc[i]);
    if (lane == 0) wsum[i] += static_cast<double>(s);
    acc[i] = A(0);
  }
}

template <typename T>
__device__ __forceinline__ auto load_acc(T x) {
  return static_cast<acc_t<T>>(to_float(x));
}

// Softmax of one voxel's channels (registers), as the CPU's softmax_tile: max, exp(z - max),
// divide by the sum.
template <int KM, typename A>
__device__ __forceinline__ void softmax_regs(int K, A (&p)[KM]) {
  A m = p[0];
#pragma unroll
  for (int k = 1; k < KM; ++k)
    if (k < K) m = p[k] > m ? p[k] : m;
  A s = A(0);
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) {
      p[k] = dce::acc_exp(p[k] - m);
      s += p[k];
    }
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) p[k] = p[k] / s;
}

// fp32 fast path (GPU only; float64 keeps softmax_regs and the exact formulas).
//
// softmax_fast: as softmax_regs but one hardware reciprocal of the sum instead of K IEEE
// divisions (p differs from e/s by at most ~2 ulp). Keeps d[k] = z_k - max and returns
// log(s) so CE can use log-softmax. s = sum of exp(d) >= exp(0) = 1 (normal) for finite z.
//
// ce_log: log(p + 1e-32). For p >= 2^-80, ulp(p) >= 2^-103 ~ 9.9e-32, so p + 1e-32 rounds to p
// in fp32 and log(p + 1e-32) = log p = d - log s (log-softmax; no cancellation: d <= 0 and
// -log s <= 0). Below that (or NaN) log(p + 1e-32) itself is taken. One log per
// voxel instead of K; the rare exact path sits behind a branch taken only when some channel of
// the voxel is tiny.

__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- host helpers -------------------------------------------------------------------------------

template <typename Fn>
void dispatch_km(int64_t K, Fn&& fn) {
  if (K < 2 || K > kDceMaxK)
    throw std::invalid_argument("dice_ce_loss (CUDA): K must be in 2.." + std::to_string(kDceMaxK) +
                                ", got " + std::to_string(K));
  if (K == 2) return fn(std::integral_constant<int, 2>{});
  if (K == 3) return fn(std::integral_constant<int, 3>{});
  if (K == 4) return fn(std::integral_constant<int, 4>{});
  if (K <= 8) return fn(std::integral_constant<int, 8>{});
  return fn(std::integral_constant<int, 16>{});
}


inline bool is_aligned(uintptr_t p, size_t bytes) { return p % bytes == 0; }

uint64_t channel_mask(const std::vector<int64_t>& channels, int64_t K, const char* what) {
  uint64_t m = 0;
  for (int64_t j : channels) {
    if (j < 0 || j >= K)
      throw std::invalid_argument(std::string(what) + ": channel " + std::to_string(j) +
                                  " out of range for K = " + std::to_string(K));
    m |= uint64_t(1) << j;
  }
  return m;
}

void check_sizes(int64_t B, int64_t V, const char* what) {
  if (B > 65535 || B < 1)
    throw std::invalid_argument(std::string(what) + ": batch of " + std::to_string(B) +
                                " items is outside 1..65535 for one launch");
  if (V < 1)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(V) +
                                " voxels per item; the kernels need at least one");
}

// Grid-stride blocks per item (at most `cap`). Blocks get equal work (within one tile), so a
// launch costs about waves x tiles per block, waves = ceil(G B / resident): of the block counts
// that fill 1..8 whole waves, keep the cheapest (the fewest blocks among equals: fewer partials).
// B = 2 at 160^3 gives one wave; B = 67 on 132 slots gives several full waves, not 67 blocks.
inline int64_t blocks_per_item(int64_t resident, int64_t B, int64_t ntiles, int64_t cap) {
  int64_t best = 1, best_cost = -1;
  for (int64_t waves_target = 1; waves_target <= 8; ++waves_target) {
    const int64_t G = std::clamp<int64_t>(waves_target * resident / B, 1, cap);
    const int64_t cost = ((G * B + resident - 1) / resident) * ((ntiles + G - 1) / G);
    if (best_cost < 0 || cost < best_cost) {
      best = G;
      best_cost = cost;
    }
  }
  return best;
}

// Blocks per item for each level of one launch of Kernel, given each level's tiles per item: the
// grid-stride plan of blocks_per_item for all the launch's tiles together, shared out in
// proportion to the levels' tiles (one level keeps the whole plan), so the coarse levels ride in
// the finest level's waves and blocks have about the same work. At most one block per tile, so a
// forward kernel's partials (one per block) fit the workspace (partial_slots). Fewer, longer
// blocks (one per several tiles) leave mid-size inputs at a fraction of a wave, each thread
// waiting on its tiles' loads in turn.
template <auto Kernel>
std::vector<int64_t> level_blocks(int device, int64_t B, const std::vector<int64_t>& tiles) {
  int64_t total = 0;
  for (int64_t t : tiles) total += t;
  const int resident = resident_blocks(reinterpret_cast<const void*>(Kernel), kThreads, 0, device,
                                       "dice_ce_loss");
  const int64_t G = blocks_per_item(resident, B, total, total);
  std::vector<int64_t> blocks;
  for (int64_t t : tiles)
    blocks.push_back(std::clamp<int64_t>((G * t + total - 1) / total, int64_t(1), t));
  return blocks;
}

}  // namespace
}  // namespace colabx::cuda
