// CUDA kernels of the fused softmax + CE + Dice loss (the row layout, vector access, softmax in
// registers and grid sizing they share with the ROI BCE are in cuda/softmax_rows.cuh).
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
#include <cstring>

#include "cuda/softmax_rows.cuh"

namespace colabx::cuda {
namespace {

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
  const cuda::DeviceScope scope(device, "dice_ce_loss");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
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
  const cuda::DeviceScope scope(device, "dice_ce_loss");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
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

}  // namespace colabx
