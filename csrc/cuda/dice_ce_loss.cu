// CUDA kernels of the fused softmax + CE + Dice loss and the ROI one-vs-all BCE.
//
// Layout [B, K, V]: a voxel's K channels are V apart. Each thread owns VEC consecutive voxels
// per step (one 4..16-byte load per channel row; scalar loads at the ragged end or when the
// rows are not aligned), with all K channels in registers (K <= KM, a compile-time bucket).
//
// Grids are (G, B): G grid-stride blocks per item, each stepping over tiles of kThreads * VEC
// voxels; G fills whole waves of the device's resident blocks (SMs x occupancy; see
// blocks_per_item), at most one block per tile. Few partials to finalize. The CE + Dice kernels
// take every deep-supervision level of a call in the same launch (LevelLaunch: consecutive block
// ranges per level, one launch per target dtype among the levels).
// Forward: each block reduces its 3K+1 sums (tp, Σp, Σŷ per channel and the CE sum): 16 voxels
// per thread in fp32, a fixed butterfly per warp into per-warp float64 running sums, a
// fixed-order sum over warps, written to a float64 partials buffer laid out [B][3K+1][G]; one
// 1024-thread finalize block sums each (level, item, sum) run in fixed order (lane-strided +
// butterfly, in double), writes the stats and the scalar loss. No atomics: bitwise reproducible
// run to run on a given device (G depends on its SM count and the batch).
// Backward: tiles in descending order (each item's last tiles, read last by the forward, are the
// likeliest in L2); each block turns its item's stats + grad_out (read from device memory) into
// per-channel coefficients in shared memory once, recomputes p and writes ∂logits and ∂targets
// together.
//
// tests/cuda_emulation compiles this file for host threads (COLABX_CUDA_EMULATION: the CUDA
// runtime and the inline PTX replaced, launches rewritten) and runs it on CPU test machines.
#if !defined(COLABX_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dice_ce_loss.h"
#include "common/dispatch.h"
#include "cuda/dice_ce_loss.h"
#if !defined(COLABX_CUDA_EMULATION)
#include "cuda/runtime.h"
#endif

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
// 1/x for normal x with |x| in [2^-126, 2^126] (here x in [1e-32, 16]): the hardware reciprocal,
// relative error <= 2^-23 (PTX rcp.approx.ftz.f32), no slow path or subroutine call.
__device__ __forceinline__ float fast_rcp(float x) {
#if defined(COLABX_CUDA_EMULATION)
  return 1.0f / x;
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

constexpr float kLogSoftmaxMinP = 8.2718061255302767e-25f;  // 2^-80

// exp and log of the fp32 CE + Dice path: CUDA's expf (<= 2 ulp; range reduction around MUFU.EX2,
// about half the instructions of exp_poly) and logf (<= 1 ulp; no division, where log_poly's
// f / (2 + f) is an IEEE divide with a slow-path call). This path is issue-bound on that math
// (bf16 logits, with a quarter fewer bytes, ran slower than fp32), and its outputs are well
// conditioned in p (log-softmax CE, sums of p, gradients relative to p). The ROI BCE keeps the
// shared polynomials: its gradient c / (1 - p + 1e-6) near p = 1 turns ulp-level changes of p
// into 1e-5 changes of the result, beyond the GPU tests' tolerance.
__device__ __forceinline__ float dce_exp(float x) { return expf(x); }
__device__ __forceinline__ float dce_log(float x) { return logf(x); }

template <int KM>
__device__ __forceinline__ float softmax_fast(int K, float (&p)[KM], float (&d)[KM]) {
  float m = p[0];
#pragma unroll
  for (int k = 1; k < KM; ++k)
    if (k < K) m = p[k] > m ? p[k] : m;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) {
      d[k] = p[k] - m;
      p[k] = dce_exp(d[k]);
      s += p[k];
    }
  const float inv = fast_rcp(s);
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) p[k] *= inv;
  return dce_log(s);
}

// lp[k] = log(p[k] + 1e-32) for k < K (see ce_log above).
template <int KM>
__device__ __forceinline__ void ce_logs(int K, const float (&p)[KM], const float (&d)[KM],
                                        float logs, float (&lp)[KM]) {
  bool tiny = false;
#pragma unroll
  for (int k = 0; k < KM; ++k)
    if (k < K) {
      lp[k] = d[k] - logs;
      tiny |= !(p[k] >= kLogSoftmaxMinP);
    }
  if (tiny) {
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (k < K && !(p[k] >= kLogSoftmaxMinP)) lp[k] = dce_log(p[k] + dce::kCeEps);
  }
}

// ---- CE + Dice ----------------------------------------------------------------------------------

// The deep-supervision levels one launch covers (every level of the call with this target
// type): blocks first[l] .. first[l + 1] - 1 of each item's row of the grid work on level l, a
// grid-stride loop over its tiles. One launch for all levels instead of one per level saves a
// launch per coarser level in both directions (a CUDA-graph node each, or a host launch).
// Forward fields: partial; backward fields: stats, gz, gy, weight, inv_bv.
template <typename TL, typename TT>
struct LevelLaunch {
  int n;
  int64_t first[kDceMaxLevels + 1];  // first[n]: blocks per item in all
  int64_t V[kDceMaxLevels];
  bool aligned[kDceMaxLevels];
  const TL* z[kDceMaxLevels];
  const TT* tg[kDceMaxLevels];
  double* partial[kDceMaxLevels];  // the level's forward partials, [B][3K+1][blocks]
  const acc_t<TL>* stats[kDceMaxLevels];  // the level's [B][3K+1] stats
  TL* gz[kDceMaxLevels];
  TT* gy[kDceMaxLevels];  // nullptr: ∂targets not wanted (or hard labels)
  double weight[kDceMaxLevels];
  double inv_bv[kDceMaxLevels];  // 1 / (B V_l)
};

// The level blockIdx.x works on (block-uniform; a few levels, so a linear scan).
template <typename TL, typename TT>
__device__ __forceinline__ int block_level(const LevelLaunch<TL, TT>& p) {
  int l = 0;
  while (l + 1 < p.n && int64_t(blockIdx.x) >= p.first[l + 1]) ++l;
  return l;
}

// Returns x as a value the compiler cannot see through, in the wide buckets (KM > 4). Their tile
// loops take their level's V and row pointers through it each tile: these are no longer kernel
// parameters (constant-bank operands), and nvcc would hoist the KM channel rows' addresses out of
// the loop, two registers each (dce_fwd_kernel<float, int64_t, true, 16>: 167 registers and one
// block per SM, against 128 and two; <half_t, int64_t, true, 8>: 98 and two blocks, against 80
// and three). The exact-K kernels keep their registers without it and skip the per-tile
// address arithmetic it costs.
template <int KM, typename T>
__device__ __forceinline__ T per_tile(T x) {
  static_assert(sizeof(T) == 8, "a 64-bit value");
#if !defined(COLABX_CUDA_EMULATION)
  if constexpr (KM > 4) {
    uint64_t u;
    memcpy(&u, &x, 8);
    asm volatile("" : "+l"(u));
    memcpy(&x, &u, 8);
  }
#endif
  return x;
}

template <typename TL, typename TT, bool HARD, int KM>
__global__ void __launch_bounds__(kThreads)
    dce_fwd_kernel(const __grid_constant__ LevelLaunch<TL, TT> p, int K) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int NSM = 3 * KM + 1;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int l = block_level(p);
  const int64_t V = p.V[l];
  const bool aligned = p.aligned[l];
  double* __restrict__ partial = p.partial[l];
  const int64_t blk = blockIdx.x - p.first[l], nblk = p.first[l + 1] - p.first[l], b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  const TL* __restrict__ zb = p.z[l] + b * K * V;
  const TT* __restrict__ tb = HARD ? p.tg[l] + b * V : p.tg[l] + b * K * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Each thread sums at most kFlushTiles tiles (16 voxels) in the accumulator type; then its
  // warp's butterfly total goes into that warp's float64 running sums. A block can walk
  // thousands of tiles (large V or B), which fp32 running sums would not hold to fp32 accuracy.
  __shared__ double wsum[kWarps][NSM];
  A acc[NSM];
#pragma unroll
  for (int i = 0; i < NSM; ++i) {
    acc[i] = A(0);
    if (lane == 0) wsum[warp][i] = 0.0;
  }
  int pending = 0;  // tiles summed in acc since the last flush (block-uniform)
#pragma unroll 1
  for (int64_t t = blk; t < ntiles; t += nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    const int64_t Vt = per_tile<KM>(V);
    if (v0 < V) {  // only the last tile can be ragged
      TL zr[KM][VEC];
      TT yr[HARD ? 1 : KM][VEC];
      load_tile<HARD>(per_tile<KM>(zb), per_tile<KM>(tb), K, v0, Vt, aligned, zr, yr);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (v0 + j >= V) continue;
        A p[KM], lp[KM];  // lp[k] = log(p[k] + 1e-32)
#pragma unroll
        for (int k = 0; k < KM; ++k) p[k] = k < K ? load_acc(zr[k][j]) : A(0);
        if constexpr (std::is_same_v<A, float>) {
          float d[KM];
          const float logs = softmax_fast<KM>(K, p, d);
          ce_logs<KM>(K, p, d, logs, lp);
        } else {
          softmax_regs<KM>(K, p);
#pragma unroll
          for (int k = 0; k < KM; ++k)
            if (k < K) lp[k] = dce::acc_log(p[k] + dce::ce_eps<A>());
        }
#pragma unroll
        for (int k = 0; k < KM; ++k) {
          if (k >= K) continue;
          const A y = target_value<HARD, A>(yr, k, j);
          acc[k] += p[k] * y;
          acc[KM + k] += p[k];
          acc[2 * KM + k] += y;
          acc[3 * KM] += -(y * lp[k]);  // dce::ce_term
        }
      }
    }
    if (++pending == kFlushTiles<KM>) {  // outside the branch: the flush shuffles whole warps
      pending = 0;
      flush_to_warp_sums(acc, wsum[warp], lane);
    }
  }
  flush_to_warp_sums(acc, wsum[warp], lane);
  __syncthreads();
  const int NS = 3 * K + 1;
  for (int i = threadIdx.x; i < NS; i += kThreads) {
    const int src = i < 3 * K ? (i / K) * KM + (i % K) : 3 * KM;
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += wsum[w][src];
    partial[(b * NS + i) * nblk + blk] = s;  // [B][NS][G]: the finalize reads each run coalesced
  }
}

struct LevelTable {
  int n;
  int64_t part_off[kDceMaxLevels];  // offset of the level's partials in the workspace
  int64_t nparts[kDceMaxLevels];    // partials per (item, sum): the level's blocks per item
  double inv_bv[kDceMaxLevels];  // 1 / (B V_l)
  double weight[kDceMaxLevels];
};

__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One block of kFinThreads: one warp per (level, item, sum) at a time, reading that sum's
// partials as one contiguous run (coalesced). Each lane issues kFinUnroll independent loads per
// step into separate accumulators, summed in a fixed order, so the result stays bitwise
// reproducible run to run.
constexpr int kFinThreads = 1024;
constexpr int kFinWarps = kFinThreads / 32;
constexpr int kFinUnroll = 4;

template <typename A>
__global__ void __launch_bounds__(kFinThreads)
    dce_finalize_kernel(const double* __restrict__ partial, const __grid_constant__ LevelTable lv,
                        int B, int K, uint64_t dice_mask, double inv_bj, double smooth,
                        double* __restrict__ sums, A* __restrict__ stats, A* __restrict__ loss) {
  const int NS = 3 * K + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t total = int64_t(lv.n) * B * NS;
  for (int64_t idx = warp; idx < total; idx += kFinWarps) {
    const int l = static_cast<int>(idx / (int64_t(B) * NS));
    const int64_t rem = idx % (int64_t(B) * NS);
    const int64_t b = rem / NS, i = rem % NS;
    const int64_t nc = lv.nparts[l];
    const double* src = partial + lv.part_off[l] + (b * NS + i) * nc;
    double a[kFinUnroll];
#pragma unroll
    for (int u = 0; u < kFinUnroll; ++u) a[u] = 0.0;
    for (int64_t c0 = lane; c0 < nc; c0 += 32 * kFinUnroll) {
      double v[kFinUnroll];
#pragma unroll
      for (int u = 0; u < kFinUnroll; ++u) {
        const int64_t c = c0 + int64_t(u) * 32;
        v[u] = c < nc ? src[c] : 0.0;
      }
#pragma unroll
      for (int u = 0; u < kFinUnroll; ++u) a[u] += v[u];
    }
    double s = a[0];
#pragma unroll
    for (int u = 1; u < kFinUnroll; ++u) s += a[u];
    s = warp_sum_d(s);
    if (lane == 0) {
      sums[idx] = s;
      stats[idx] = static_cast<A>(s);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double out = 0.0;
    for (int l = 0; l < lv.n; ++l) {
      double ce = 0.0, dice = 0.0;
      for (int b = 0; b < B; ++b) {
        const double* sb = sums + (int64_t(l) * B + b) * NS;
        ce += sb[3 * K];
        for (int k = 0; k < K; ++k)
          if ((dice_mask >> k) & 1u) dice += dce::dice_ratio(sb[k], sb[K + k], sb[2 * K + k], smooth);
      }
      out += lv.weight[l] * (ce * lv.inv_bv[l] - dice * inv_bj);
    }
    *loss = static_cast<A>(out);
  }
}

// Resident blocks per SM the backward asks of ptxas, for float math. K <= 4: four (left alone
// ptxas chose one block fewer). Wider buckets: 3 with hard labels and 2 with soft targets; the
// level table would otherwise cost them a block, and with the bound they fit without spilling.
// float64 keeps the default.
template <typename A, int KM, bool HARD>
constexpr int kBwdMinBlocks = sizeof(A) != 4 ? 1 : KM <= 4 ? 4 : HARD ? 3 : 2;

template <typename TL, typename TT, bool HARD, int KM>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks<acc_t<TL>, KM, HARD>)
    dce_bwd_kernel(const __grid_constant__ LevelLaunch<TL, TT> p, int K,
                   const acc_t<TL>* __restrict__ grad_out, double inv_bj, uint64_t dice_mask,
                   double smooth) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int l = block_level(p);
  const int64_t V = p.V[l];
  const bool aligned = p.aligned[l];
  const int64_t blk = blockIdx.x - p.first[l], nblk = p.first[l + 1] - p.first[l], b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  // Per-channel Dice coefficients (aligned, so the voxel loop reads them with vector LDS) and
  // the CE scale.
  __shared__ alignas(16) A alpha_s[KM];
  __shared__ alignas(16) A beta_s[KM];
  __shared__ A ce_scale;
  const int NS = 3 * K + 1;
  if (threadIdx.x <= K) {
    const A gw = grad_out[0] * static_cast<A>(p.weight[l]);
    if (threadIdx.x == K) {
      ce_scale = gw * static_cast<A>(p.inv_bv[l]);
    } else {
      const int k = threadIdx.x;
      A alpha = A(0), beta = A(0);
      if ((dice_mask >> k) & 1u) {
        const A* __restrict__ sb = p.stats[l] + b * NS;
        dce::dice_coeffs<A>(sb[k], sb[K + k], sb[2 * K + k], static_cast<A>(smooth),
                            -gw * static_cast<A>(inv_bj), &alpha, &beta);
      }
      alpha_s[k] = alpha;
      beta_s[k] = beta;
    }
  }
  __syncthreads();
  const A c = ce_scale;
  const TL* __restrict__ zb = p.z[l] + b * K * V;
  const TT* __restrict__ tb = HARD ? p.tg[l] + b * V : p.tg[l] + b * K * V;
  TL* __restrict__ gzb = p.gz[l] + b * K * V;
  TT* __restrict__ gyb = (HARD || p.gy[l] == nullptr) ? nullptr : p.gy[l] + b * K * V;
  const bool want_gy = gyb != nullptr;  // uniform: ∂targets skipped when nobody needs them

  // Tiles in descending order: the forward ends on each item's last tiles, which are then the
  // likeliest to still be in L2.
#pragma unroll 1
  for (int64_t t = ntiles - 1 - blk; t >= 0; t -= nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    const int64_t Vt = per_tile<KM>(V);
    if (v0 >= V) continue;  // ragged end of the last tile
    TL zr[KM][VEC];
    TT yr[HARD ? 1 : KM][VEC];
    load_tile<HARD>(per_tile<KM>(zb), per_tile<KM>(tb), K, v0, Vt, aligned, zr, yr);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A p[KM], g[KM];
#pragma unroll
      for (int k = 0; k < KM; ++k) p[k] = k < K ? load_acc(zr[k][j]) : A(0);
      A dot = A(0);
      if constexpr (std::is_same_v<A, float>) {
        // dce_grad_p / dce_grad_y with one reciprocal instead of a division and log-softmax
        // instead of a log per channel (see softmax_fast / ce_logs).
        float d[KM], lp[KM];
        const float logs = softmax_fast<KM>(K, p, d);
        if constexpr (!HARD)
          if (want_gy) ce_logs<KM>(K, p, d, logs, lp);
#pragma unroll
        for (int k = 0; k < KM; ++k) {
          if (k >= K) continue;
          const float y = target_value<HARD, float>(yr, k, j);
          const float alpha = alpha_s[k], beta = beta_s[k];
          g[k] = (-c * y) * fast_rcp(p[k] + dce::kCeEps) + (alpha * y + beta);
          dot += p[k] * g[k];
          if constexpr (!HARD)
            if (want_gy) yr[k][j] = store_as<TT>(-c * lp[k] + (alpha * p[k] + beta));
        }
      } else {
        softmax_regs<KM>(K, p);
#pragma unroll
        for (int k = 0; k < KM; ++k) {
          if (k >= K) continue;
          const A y = target_value<HARD, A>(yr, k, j);
          g[k] = dce::dce_grad_p(y, p[k], c, alpha_s[k], beta_s[k]);
          dot += p[k] * g[k];
          if constexpr (!HARD)
            if (want_gy)
              yr[k][j] = store_as<TT>(dce::dce_grad_y(p[k], c, alpha_s[k], beta_s[k]));
        }
      }
#pragma unroll
      for (int k = 0; k < KM; ++k)
        if (k < K) zr[k][j] = store_as<TL>(dce::softmax_grad(p[k], g[k], dot));
    }
    TL* const gzt = per_tile<KM>(gzb);
    TT* const gyt = HARD ? nullptr : per_tile<KM>(gyb);
#pragma unroll
    for (int k = 0; k < KM; ++k) {
      if (k >= K) continue;
      store_vec(gzt + k * Vt, v0, Vt, aligned, zr[k]);
      if constexpr (!HARD)
        if (want_gy) store_vec(gyt + k * Vt, v0, Vt, aligned, yr[k]);
    }
  }
}

// ---- ROI BCE ------------------------------------------------------------------------------------

template <typename TL, typename L, int KM>
__global__ void __launch_bounds__(kThreads)
    bce_fwd_kernel(const TL* __restrict__ z, const L* __restrict__ lab, int K, int64_t V,
                   bool aligned, uint64_t roi_mask, double* __restrict__ partial) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int64_t blk = blockIdx.x, nblk = gridDim.x, b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  const TL* zb = z + b * K * V;
  const L* lb = lab + b * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ double wsum[kWarps];  // per-warp float64 running sums, as in dce_fwd_kernel
  if (lane == 0) wsum[warp] = 0.0;
  A acc[1] = {A(0)};
  int pending = 0;
#pragma unroll 1
  for (int64_t t = blk; t < ntiles; t += nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    if (v0 < V) {
      TL zr[KM][VEC];
      L lr[VEC];
#pragma unroll
      for (int k = 0; k < KM; ++k)
        if (k < K) load_vec(zb + k * V, v0, V, aligned, zr[k]);
      load_vec(lb, v0, V, aligned, lr);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (v0 + j >= V) continue;
        A p[KM];
#pragma unroll
        for (int k = 0; k < KM; ++k) p[k] = k < K ? load_acc(zr[k][j]) : A(0);
        softmax_regs<KM>(K, p);
        const int64_t y = static_cast<int64_t>(lr[j]);
#pragma unroll
        for (int k = 0; k < KM; ++k)
          if (k < K && ((roi_mask >> k) & 1u)) acc[0] += dce::bce_term(y == k, p[k]);
      }
    }
    if (++pending == kFlushTiles<KM>) {
      pending = 0;
      flush_to_warp_sums(acc, &wsum[warp], lane);
    }
  }
  flush_to_warp_sums(acc, &wsum[warp], lane);
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += wsum[w];
    partial[b * nblk + blk] = total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bce_finalize_kernel(const double* __restrict__ partial, int64_t n, double scale,
                        A* __restrict__ loss) {
  __shared__ double red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = warp_sum_d(s);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += red[w];
    *loss = static_cast<A>(-t * scale);
  }
}

template <typename TL, typename L, int KM>
__global__ void __launch_bounds__(kThreads)
    bce_bwd_kernel(const TL* __restrict__ z, const L* __restrict__ lab, int K, int64_t V,
                   bool aligned, uint64_t roi_mask, const acc_t<TL>* __restrict__ grad_out,
                   double inv_bv, TL* __restrict__ gz) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int64_t blk = blockIdx.x, nblk = gridDim.x, b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  const A c = grad_out[0] * static_cast<A>(inv_bv);
  const TL* zb = z + b * K * V;
  const L* lb = lab + b * V;
  TL* gzb = gz + b * K * V;
#pragma unroll 1
  for (int64_t t = ntiles - 1 - blk; t >= 0; t -= nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    if (v0 >= V) continue;
    TL zr[KM][VEC];
    L lr[VEC];
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (k < K) load_vec(zb + k * V, v0, V, aligned, zr[k]);
    load_vec(lb, v0, V, aligned, lr);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A p[KM], g[KM];
#pragma unroll
      for (int k = 0; k < KM; ++k) p[k] = k < K ? load_acc(zr[k][j]) : A(0);
      softmax_regs<KM>(K, p);
      const int64_t y = static_cast<int64_t>(lr[j]);
      A dot = A(0);
#pragma unroll
      for (int k = 0; k < KM; ++k) {
        g[k] = (k < K && ((roi_mask >> k) & 1u)) ? dce::bce_grad_p(y == k, p[k], c) : A(0);
        dot += p[k] * g[k];
      }
#pragma unroll
      for (int k = 0; k < KM; ++k)
        if (k < K) zr[k][j] = store_as<TL>(dce::softmax_grad(p[k], g[k], dot));
    }
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (k < K) store_vec(gzb + k * V, v0, V, aligned, zr[k]);
  }
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
// forward kernel's partials (one per block) fit the workspace (partial_slots). Capping the
// forward at one block per 4096 voxels instead left 2x3x80^3 at a quarter wave of blocks on an
// H200, each thread waiting on 4 tiles' loads in turn (10.3 us against the backward's 11.3 us,
// which moves twice the bytes).
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

// Level indices grouped by target dtype code, in order of first appearance: one launch per
// group, so one in all when every level's targets share a dtype (as in training).
std::vector<std::vector<size_t>> target_groups(const std::vector<int>& codes) {
  std::vector<int> seen;
  std::vector<std::vector<size_t>> groups;
  for (size_t l = 0; l < codes.size(); ++l) {
    const auto it = std::find(seen.begin(), seen.end(), codes[l]);
    if (it == seen.end()) {
      seen.push_back(codes[l]);
      groups.push_back({l});
    } else {
      groups[static_cast<size_t>(it - seen.begin())].push_back(l);
    }
  }
  return groups;
}

// The launch table of one group of levels for Kernel (bucket KM): block ranges, sizes, inputs,
// and whether each level's logits and targets allow vector access (callers add their outputs).
template <auto Kernel, int KM, typename TL, typename TT>
LevelLaunch<TL, TT> plan_levels(const std::vector<size_t>& group,
                                const std::vector<uintptr_t>& logits,
                                const std::vector<uintptr_t>& targets, int64_t B,
                                const std::vector<int64_t>& V, int device) {
  constexpr int VEC = Bucket<KM>::vec;
  std::vector<int64_t> tiles;
  for (size_t l : group) tiles.push_back(num_tiles<KM>(V[l]));
  const std::vector<int64_t> blocks = level_blocks<Kernel>(device, B, tiles);
  LevelLaunch<TL, TT> p{};
  p.n = static_cast<int>(group.size());
  for (size_t i = 0; i < group.size(); ++i) {
    const size_t l = group[i];
    p.first[i + 1] = p.first[i] + blocks[i];
    p.V[i] = V[l];
    p.aligned[i] = V[l] % VEC == 0 && is_aligned(logits[l], sizeof(TL) * VEC) &&
                   is_aligned(targets[l], sizeof(TT) * VEC);
    p.z[i] = reinterpret_cast<const TL*>(logits[l]);
    p.tg[i] = reinterpret_cast<const TT*>(targets[l]);
  }
  return p;
}

template <typename TL, typename TT>
dim3 level_grid(const LevelLaunch<TL, TT>& p, int64_t B) {
  return dim3(static_cast<unsigned>(p.first[p.n]), static_cast<unsigned>(B));
}

// The launches of one CE + Dice call, one per target dtype among its levels: calls
// fn(TypeTag<TL>, integral_constant<int, KM>, TypeTag<TT>, bool_constant<HARD>, levels).
template <typename Fn>
void for_each_launch(int logits_code, int64_t K, const std::vector<int>& target_codes, Fn&& fn) {
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    dispatch_km(K, [&](auto km) {
      for (const std::vector<size_t>& group : target_groups(target_codes))
        dce::dispatch_targets<typename decltype(ltag)::type>(
            target_codes[group[0]], "dice_ce_loss (CUDA)",
            [&](auto tt, auto hard) { fn(ltag, km, tt, hard, group); });
    });
  });
}

// The kernel types of one ROI BCE call: calls fn(TypeTag<TL>, TypeTag<label type>,
// integral_constant<int, KM>).
template <typename Fn>
void for_bce_types(int logits_code, int label_code, int64_t K, Fn&& fn) {
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    dispatch_labels(label_code, "roi_bce_loss labels",
                    [&](auto ttag) { dispatch_km(K, [&](auto km) { fn(ltag, ttag, km); }); });
  });
}

}  // namespace
}  // namespace colabx::cuda

namespace colabx {

using namespace colabx::cuda;

void dice_ce_loss_forward_cuda(const std::vector<uintptr_t>& logits,
                               const std::vector<uintptr_t>& targets, int logits_code,
                               const std::vector<int>& target_codes, int64_t B, int64_t K,
                               const std::vector<int64_t>& V,
                               const std::vector<int64_t>& dice_channels,
                               const std::vector<double>& weights, double smooth, uintptr_t stats,
                               uintptr_t loss, uintptr_t workspace, int device, uintptr_t stream) {
  const size_t L = logits.size();
  if (L < 1 || L > size_t(kDceMaxLevels) || targets.size() != L || target_codes.size() != L ||
      V.size() != L || weights.size() != L)
    throw std::invalid_argument("dice_ce_loss_forward_cuda: bad per-level argument lengths");
  const uint64_t dmask = channel_mask(dice_channels, K, "dice_ce_loss");
  cudaStream_t st = static_cast<cudaStream_t>(prepare(device, stream, "dice_ce_loss"));
  const int64_t NS = 3 * K + 1;
  double* work = reinterpret_cast<double*>(workspace);
  LevelTable lv{};
  lv.n = static_cast<int>(L);
  int64_t capacity = 0;  // the partials of the workspace: B * NS per partial slot
  for (size_t l = 0; l < L; ++l) {
    check_sizes(B, V[l], "dice_ce_loss");
    lv.inv_bv[l] = 1.0 / (double(B) * double(V[l]));
    lv.weight[l] = weights[l];
    capacity += B * partial_slots(V[l]) * NS;
  }
  double* sums = work + capacity;  // L * B * NS doubles after the partials
  int64_t off = 0;
  for_each_launch(logits_code, K, target_codes,
                  [&](auto ltag, auto km, auto tt, auto hard, const std::vector<size_t>& group) {
    using TL = typename decltype(ltag)::type;
    using TT = typename decltype(tt)::type;
    constexpr int KM = decltype(km)::value;
    constexpr auto kernel = dce_fwd_kernel<TL, TT, decltype(hard)::value, KM>;
    auto p = plan_levels<kernel, KM, TL, TT>(group, logits, targets, B, V, device);
    for (int i = 0; i < p.n; ++i) {
      const size_t l = group[i];
      lv.part_off[l] = off;
      lv.nparts[l] = p.first[i + 1] - p.first[i];
      p.partial[i] = work + off;
      off += B * lv.nparts[l] * NS;
    }
    kernel<<<level_grid(p, B), kThreads, 0, st>>>(p, static_cast<int>(K));
    check_launch("dice_ce_loss forward");
  });
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    using A = acc_t<typename decltype(ltag)::type>;
    dce_finalize_kernel<A><<<1, kFinThreads, 0, st>>>(
        work, lv, static_cast<int>(B), static_cast<int>(K), dmask,
        1.0 / (double(B) * double(dice_channels.size())), smooth, sums,
        reinterpret_cast<A*>(stats), reinterpret_cast<A*>(loss));
    check_launch("dice_ce_loss finalize");
  });
}

void dice_ce_loss_backward_cuda(uintptr_t grad_out, const std::vector<uintptr_t>& logits,
                                const std::vector<uintptr_t>& targets, int logits_code,
                                const std::vector<int>& target_codes, int64_t B, int64_t K,
                                const std::vector<int64_t>& V,
                                const std::vector<int64_t>& dice_channels,
                                const std::vector<double>& weights, double smooth, uintptr_t stats,
                                const std::vector<uintptr_t>& grad_logits,
                                const std::vector<uintptr_t>& grad_targets, int device,
                                uintptr_t stream) {
  const size_t L = logits.size();
  if (L < 1 || L > size_t(kDceMaxLevels) || targets.size() != L || target_codes.size() != L ||
      V.size() != L || weights.size() != L || grad_logits.size() != L ||
      grad_targets.size() != L)
    throw std::invalid_argument("dice_ce_loss_backward_cuda: bad per-level argument lengths");
  for (int64_t v : V) check_sizes(B, v, "dice_ce_loss");  // every level before any launch
  const uint64_t dmask = channel_mask(dice_channels, K, "dice_ce_loss");
  cudaStream_t st = static_cast<cudaStream_t>(prepare(device, stream, "dice_ce_loss"));
  const int64_t NS = 3 * K + 1;
  const double inv_bj = 1.0 / (double(B) * double(dice_channels.size()));
  for_each_launch(logits_code, K, target_codes,
                  [&](auto ltag, auto km, auto tt, auto hard, const std::vector<size_t>& group) {
    using TL = typename decltype(ltag)::type;
    using TT = typename decltype(tt)::type;
    using A = acc_t<TL>;
    constexpr int KM = decltype(km)::value;
    constexpr bool HARD = decltype(hard)::value;
    constexpr int VEC = Bucket<KM>::vec;
    constexpr auto kernel = dce_bwd_kernel<TL, TT, HARD, KM>;
    auto p = plan_levels<kernel, KM, TL, TT>(group, logits, targets, B, V, device);
    for (int i = 0; i < p.n; ++i) {
      const size_t l = group[i];
      const uintptr_t gy = HARD ? 0 : grad_targets[l];
      p.aligned[i] = p.aligned[i] && is_aligned(grad_logits[l], sizeof(TL) * VEC) &&
                     (gy == 0 || is_aligned(gy, sizeof(TT) * VEC));
      p.stats[i] = reinterpret_cast<const A*>(stats) + int64_t(l) * B * NS;
      p.gz[i] = reinterpret_cast<TL*>(grad_logits[l]);
      p.gy[i] = reinterpret_cast<TT*>(gy);
      p.weight[i] = weights[l];
      p.inv_bv[i] = 1.0 / (double(B) * double(V[l]));
    }
    kernel<<<level_grid(p, B), kThreads, 0, st>>>(
        p, static_cast<int>(K), reinterpret_cast<const A*>(grad_out), inv_bj, dmask, smooth);
    check_launch("dice_ce_loss backward");
  });
}

void roi_bce_loss_forward_cuda(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                               int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t loss,
                               uintptr_t workspace, int device, uintptr_t stream) {
  const uint64_t roi = channel_mask(roi_channels, K, "roi_bce_loss");
  cudaStream_t st = static_cast<cudaStream_t>(prepare(device, stream, "roi_bce_loss"));
  check_sizes(B, V, "roi_bce_loss");
  double* work = reinterpret_cast<double*>(workspace);
  int64_t n_part = 0;
  for_bce_types(logits_code, label_code, K, [&](auto ltag, auto ttag, auto km) {
    using TL = typename decltype(ltag)::type;
    using Lb = typename decltype(ttag)::type;
    constexpr int KM = decltype(km)::value;
    constexpr int VEC = Bucket<KM>::vec;
    const bool aligned = V % VEC == 0 && is_aligned(logits, sizeof(TL) * VEC) &&
                         is_aligned(labels, sizeof(Lb) * VEC);
    constexpr auto kernel = bce_fwd_kernel<TL, Lb, KM>;
    const int64_t G = level_blocks<kernel>(device, B, {num_tiles<KM>(V)})[0];
    n_part = B * G;
    const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(B));
    kernel<<<grid, kThreads, 0, st>>>(
        reinterpret_cast<const TL*>(logits), reinterpret_cast<const Lb*>(labels),
        static_cast<int>(K), V, aligned, roi, work);
    check_launch("roi_bce_loss forward");
  });
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    using A = acc_t<typename decltype(ltag)::type>;
    bce_finalize_kernel<A><<<1, kThreads, 0, st>>>(work, n_part, 1.0 / (double(B) * double(V)),
                                                   reinterpret_cast<A*>(loss));
    check_launch("roi_bce_loss finalize");
  });
}

void roi_bce_loss_backward_cuda(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                                int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                                const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                                int device, uintptr_t stream) {
  const uint64_t roi = channel_mask(roi_channels, K, "roi_bce_loss");
  cudaStream_t st = static_cast<cudaStream_t>(prepare(device, stream, "roi_bce_loss"));
  check_sizes(B, V, "roi_bce_loss");
  for_bce_types(logits_code, label_code, K, [&](auto ltag, auto ttag, auto km) {
    using TL = typename decltype(ltag)::type;
    using Lb = typename decltype(ttag)::type;
    using A = acc_t<TL>;
    constexpr int KM = decltype(km)::value;
    constexpr int VEC = Bucket<KM>::vec;
    const bool aligned = V % VEC == 0 && is_aligned(logits, sizeof(TL) * VEC) &&
                         is_aligned(grad_logits, sizeof(TL) * VEC) &&
                         is_aligned(labels, sizeof(Lb) * VEC);
    constexpr auto kernel = bce_bwd_kernel<TL, Lb, KM>;
    const int64_t G = level_blocks<kernel>(device, B, {num_tiles<KM>(V)})[0];
    const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(B));
    kernel<<<grid, kThreads, 0, st>>>(
        reinterpret_cast<const TL*>(logits), reinterpret_cast<const Lb*>(labels),
        static_cast<int>(K), V, aligned, roi, reinterpret_cast<const A*>(grad_out),
        1.0 / (double(B) * double(V)), reinterpret_cast<TL*>(grad_logits));
    check_launch("roi_bce_loss backward");
  });
}

}  // namespace colabx
