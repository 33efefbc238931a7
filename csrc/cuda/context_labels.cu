// context_labels CUDA kernels: forward and backward each emit / consume ALL levels in ONE launch.
//
// * Single level at full resolution (the common non-deep-supervision case): a flat kernel, one
//   thread per voxel, grid (voxel blocks, batch), coalesced loads/stores on every channel plane.
// * Pooled levels: a block owns a tile aligned to the coarsest stride (cuda/context_labels_tile.h
//   plans it). Its threads read every voxel once (softmax once per voxel, level 0 written on the
//   way), reduce the q sums / M minima of the first pooled level's cells ("P1 cells") and park
//   them in shared memory, and each coarser level is reduced from the finer one. Backward: P1
//   cell minima of M -> per-level pooled gradients scattered into P1 cells in shared memory (one
//   barrier per level, levels in order, so the sums are deterministic) -> one softmax-backward
//   pass over the voxels.
// Every thread uses a fixed summation order: results are bitwise reproducible run to run.
//
// tests/cuda_emulation compiles this file for host threads (COLABX_CUDA_EMULATION: the CUDA
// headers left out, launches rewritten) and runs it on CPU test machines.
#if !defined(COLABX_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/context_labels.h"
#include "common/dispatch.h"
#include "common/fast_divmod.h"
#include "cuda/context_labels_tile.h"
#if !defined(COLABX_CUDA_EMULATION)
#include "cuda/runtime.h"
#endif

namespace colabx {
namespace {

using ctxlab::Plan;

template <typename A>
struct LevelPtrs {
  A* p[ctxlab::kMaxLevels];
};

template <typename A>
__device__ __forceinline__ A inf_of();
template <>
__device__ __forceinline__ float inf_of<float>() {
  return __int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double inf_of<double>() {
  return __longlong_as_double(0x7ff0000000000000ll);
}

// The number of contexts a kernel of bucket TMAX sees: buckets up to 4 hold exactly TMAX
// (dispatch_tmax), so t is a compile-time constant there and every `k < t` test on the voxel
// path folds away; the wide bucket reads it from the plan.
template <int TMAX>
__host__ __device__ __forceinline__ int exact_t(int64_t t) {
  return TMAX <= 4 ? TMAX : static_cast<int>(t);
}

// One voxel's t logits (channel stride V) into raw[0..t).
template <typename T, int TMAX, typename I>
__device__ __forceinline__ void voxel_load(const T* __restrict__ o, I V, int t, T (&raw)[TMAX]) {
#pragma unroll
  for (int k = 0; k < TMAX; ++k)
    if (k < t) raw[k] = o[k * V];
}

// Softmax of one voxel's t logits raw[0..t) into q[0..t).
template <typename T, int TMAX>
__device__ __forceinline__ void softmax_of(const T (&raw)[TMAX], int t, acc_t<T> (&q)[TMAX]) {
  using A = acc_t<T>;
  A mx = static_cast<A>(to_float(raw[0]));
  q[0] = mx;
#pragma unroll
  for (int k = 1; k < TMAX; ++k) {
    if (k < t) {
      q[k] = static_cast<A>(to_float(raw[k]));
      mx = q[k] > mx ? q[k] : mx;
    }
  }
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < TMAX; ++k) {
    if (k < t) {
      q[k] = ctxlab::exp_acc(q[k] - mx);
      sum += q[k];
    }
  }
  const A inv = A(1) / sum;
#pragma unroll
  for (int k = 0; k < TMAX; ++k)
    if (k < t) q[k] *= inv;
}

// Softmax of one voxel's t logits (channel stride V) into q[0..t).
template <typename T, int TMAX, typename I>
__device__ __forceinline__ void voxel_softmax(const T* __restrict__ o, I V, int t, acc_t<T> (&q)[TMAX]) {
  T raw[TMAX];
  voxel_load<T, TMAX>(o, V, t, raw);
  softmax_of<T, TMAX>(raw, t, q);
}

// Writes one voxel's K labels (channel stride Vo) and its mask.
template <typename A, typename L, int TMAX, typename I>
__device__ __forceinline__ void voxel_write(const A (&q)[TMAX], A M, L y, int t, I c,
                                            A* __restrict__ out, I Vo, A* __restrict__ mask) {
  const bool roi = y > L(0);
  out[0] = roi ? A(0) : ctxlab::context0_label(M, q[0]);
  for (I j = 1; j < c; ++j) out[j * Vo] = ctxlab::roi_label<A>(static_cast<int64_t>(y), static_cast<int64_t>(j));
#pragma unroll
  for (int k = 1; k < TMAX; ++k)
    if (k < t) out[(c - 1 + k) * Vo] = roi ? A(0) : ctxlab::contextk_label(M, q[k]);
  if (mask) *mask = roi ? A(1) : M;
}

// ------------------------------------------------------------------------------ flat kernels

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256)
    fwd_flat(const __grid_constant__ Plan p, const T* __restrict__ o, const L* __restrict__ y,
             const acc_t<T>* __restrict__ d, acc_t<T>* __restrict__ out,
             acc_t<T>* __restrict__ mask, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t V = p.voxels();
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= V) return;
  const int t = exact_t<TMAX>(p.t);
  A q[TMAX];
  voxel_softmax<T, TMAX>(o + b * p.t * V + v, V, t, q);
  const A M = ctxlab::mask_of_distance(d[b * V + v], margin, tau);
  voxel_write<A, L, TMAX>(q, M, y[b * V + v], t, p.c, out + b * p.K * V + v, V,
                          mask ? mask + b * V + v : nullptr);
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256)
    bwd_flat(const __grid_constant__ Plan p, const acc_t<T>* __restrict__ g,
             const T* __restrict__ o, const L* __restrict__ y, const acc_t<T>* __restrict__ d,
             T* __restrict__ grad_o, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t V = p.voxels();
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= V) return;
  const int t = exact_t<TMAX>(p.t);
  A q[TMAX];
  voxel_softmax<T, TMAX>(o + b * p.t * V + v, V, t, q);
  A gq[TMAX];
  const bool bg = !(y[b * V + v] > L(0)) && g != nullptr;
  const A M = bg ? ctxlab::mask_of_distance(d[b * V + v], margin, tau) : A(0);
  const A* gb = g ? g + b * p.K * V + v : nullptr;
  A dot = A(0);
#pragma unroll
  for (int k = 0; k < TMAX; ++k) {
    if (k < t) {
      gq[k] = bg ? M * gb[ctxlab::context_channel(k, p.c) * V] : A(0);
      dot += q[k] * gq[k];
    }
  }
  T* go = grad_o + b * p.t * V + v;
#pragma unroll
  for (int k = 0; k < TMAX; ++k)
    if (k < t) go[k * V] = store_as<T>(ctxlab::softmax_backward(q[k], gq[k], dot));
}

// ------------------------------------------------------------------ coalesced tiled kernels
//
// Preconditions (checked on the host by ctxlab::make_tile; Python routes other calls to the
// twin): K * V and the tile counts fit int32, the first pooled level's x stride s1x divides 32, TW (the tile's x
// extent and its threads along x) is a multiple of 32 and of the coarsest x stride.
// Block = TW x R threads; thread (lx, r) owns voxel column x = x0 + lx and the P1 cell rows
// r, r + R, ... of the tile (a cell row = one P1 cell extent in z and y). A warp lies in one r,
// so its 32 lanes read / write 32 consecutive voxels of one (z, y) row (coalesced, as the flat
// kernels), every loop bound is warp-uniform, and the s1x lanes of one P1 cell combine their
// partial sums with xor shuffles (all 32 lanes active). Pooled levels are reduced
// hierarchically in shared memory: level l's per-cell sums / minima from level l-1's, one
// barrier per level; each level's statistics are laid out [t][n_l] values then [n_l] values.
// All index math divides by host-built FastDivmods (a run-time integer division is ~20
// instructions, and the backward's gradient gather needs several per voxel).
//
// A block's tile and a thread's place in it.
struct TilePos {
  int tz, ty, tx;  // tile index per axis
  int z0, y0, x0;  // tile origin (voxels)
  int lx, r;       // thread column (x0 + lx) and row group
};

__device__ __forceinline__ TilePos tile_pos(const ctxlab::Tile& tl) {
  TilePos tp;
  const int q = tl.div_ntx.divmod(static_cast<int>(blockIdx.x), &tp.tx);
  tp.tz = tl.div_nty.divmod(q, &tp.ty);
  tp.z0 = tp.tz * tl.TD;
  tp.y0 = tp.ty * tl.TH;
  tp.x0 = tp.tx * tl.TW;
  tp.r = tl.div_TW.divmod(static_cast<int>(threadIdx.x), &tp.lx);
  return tp;
}

// Tile-local cell index of a level -> its (z, y, x) in the tile.
__device__ __forceinline__ void cell_coords(const ctxlab::TileLevel& lv, int cell, int* cz, int* cy, int* cx) {
  *cz = lv.div_ny.divmod(lv.div_nx.divmod(cell, cx), cy);
}

// fn(sub) for each cell `sub` of the finer level fl inside cell `cell` of level lv, z-major (the
// fixed order of the hierarchical sums and minima).
template <typename Fn>
__device__ __forceinline__ void for_finer_cells(const ctxlab::TileLevel& lv, const ctxlab::TileLevel& fl, int cell,
                                                Fn&& fn) {
  int cz, cy, cx;
  cell_coords(lv, cell, &cz, &cy, &cx);
  for (int a = 0; a < lv.fz; ++a)
    for (int e = 0; e < lv.fy; ++e)
      for (int f = 0; f < lv.fx; ++f)
        fn(((cz * lv.fz + a) * fl.ny + cy * lv.fy + e) * fl.nx + cx * lv.fx + f);
}

// Voxels of a P1 cell row one thread loads before using any (all their loads in flight at once;
// one voxel at a time, a thread waits on each voxel's loads in turn, at about half the flat
// kernels' bytes/s). Wider t loads more per voxel and batches fewer, so the values stay in
// registers (t <= 2: 4 voxels, t <= 4: 2, wider: 1).
template <int TMAX>
constexpr int kRowBatch = TMAX <= 2 ? 4 : (TMAX <= 4 ? 2 : 1);

// Voxel i (0 <= i < s1z * s1y, z-major) of the P1 cell row starting at (zc, yc) in column x:
// its index, or -1 past the row or the volume.
__device__ __forceinline__ int row_voxel(const ctxlab::Tile& tl, int i, int zc, int yc, int x, int D,
                                         int H, int W) {
  int e;
  const int z = zc + tl.div_s1y.divmod(i, &e), yy = yc + e;
  return (i < tl.s1z * tl.s1y && z < D && yy < H) ? (z * H + yy) * W + x : -1;
}

template <typename A>
__device__ __forceinline__ A min_keep(A cur, A v) {  // NaN v never replaces (as the cell loops above)
  return v < cur ? v : cur;
}

// Cells of one pooled level a thread takes at once in the level steps: their global loads (the
// centre label; in the backward also the incoming gradient) are all issued before any is used,
// one round trip per batch where one cell at a time waited on each in turn.
template <int TMAX>
constexpr int kLevelBatch = TMAX <= 2 ? 8 : (TMAX <= 4 ? 4 : 1);

// Global index of the centre voxel of tile-local cell `cell` of a level (whose labels decide the
// level's ROI), or -1 when the cell lies past the level's extent (a partial cell: no output).
// *out_index: the cell's index in the level's output plane. The tile's origin in the level's
// cells is (tz nz, ty ny, tx nx): the tile extent is a multiple of every level's stride.
__device__ __forceinline__ int cell_center(const ctxlab::TileLevel& lv, const TilePos& tp, int cell, int H,
                                           int W, int* out_index) {
  int cz, cy, cx;
  cell_coords(lv, cell, &cz, &cy, &cx);
  const int rz = tp.tz * lv.nz + cz, ry = tp.ty * lv.ny + cy, rx = tp.tx * lv.nx + cx;
  if (rz >= lv.Slz || ry >= lv.Sly || rx >= lv.Slx) return -1;
  *out_index = (rz * lv.Sly + ry) * lv.Slx + rx;
  return ((rz * lv.sz + (lv.sz >> 1)) * H + ry * lv.sy + (lv.sy >> 1)) * W + rx * lv.sx + (lv.sx >> 1);
}

// A level's cells c0, c0 + blockDim.x, ... (NC of them): their centre labels yl and their indices
// oi in the level's output plane, all loads issued before any is used; per_cell(j, in) adds a
// cell's own loads (in: the cell has an output). oi[j] = -1 (label 0) for a cell past the
// level's extent or the tile, and for every cell when !wanted.
template <int NC, typename L, typename PerCell>
__device__ __forceinline__ void load_cells(const ctxlab::TileLevel& lv, const TilePos& tp, int c0, bool wanted,
                                           int H, int W, const L* __restrict__ yb, int (&oi)[NC],
                                           L (&yl)[NC], PerCell&& per_cell) {
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int cell = c0 + j * static_cast<int>(blockDim.x);
    const int ci = wanted && cell < lv.n ? cell_center(lv, tp, cell, H, W, &oi[j]) : -1;
    if (ci < 0) oi[j] = -1;
    yl[j] = ci < 0 ? L(0) : yb[ci];
    per_cell(j, ci >= 0);
  }
}

// Registers cap occupancy: the common case (fp32 accumulation, t <= 4) runs 3 blocks of 256, the
// 80 registers its batched row loads (kRowBatch) need without spilling, so that each thread keeps
// 4 voxels' loads in flight; other cases 2.
template <typename A, int TMAX>
constexpr int tiled_min_blocks() {
  return (sizeof(A) == 4 && TMAX <= 4) ? 3 : 2;
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256, tiled_min_blocks<acc_t<T>, TMAX>())
    fwd_tiled(const __grid_constant__ Plan p, const __grid_constant__ ctxlab::Tile tl,
               const T* __restrict__ o, const L* __restrict__ y, const acc_t<T>* __restrict__ d,
               const __grid_constant__ LevelPtrs<acc_t<T>> outs,
               const __grid_constant__ LevelPtrs<acc_t<T>> masks, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int t = exact_t<TMAX>(p.t), c = static_cast<int>(p.c), K = static_cast<int>(p.K);
  const int D = static_cast<int>(p.S[0]), H = static_cast<int>(p.S[1]), W = static_cast<int>(p.S[2]);
  const int HW = H * W, V = D * HW;  // K * V < 2^31 (host precondition)
  const TilePos tp = tile_pos(tl);
  const int64_t b = blockIdx.y;
  const int lx = tp.lx, r = tp.r, z0 = tp.z0, y0 = tp.y0;
  const int x = tp.x0 + lx;
  const bool xin = x < W;
  const T* ob = o + b * t * V;
  const L* yb = y + b * V;
  const A* db = d + b * V;
  A* out0 = p.level0_full ? outs.p[0] + b * K * V : nullptr;
  A* mask0 = p.level0_full && masks.p[0] ? masks.p[0] + b * V : nullptr;
  const int fp = p.first_pooled;

  // 1. voxels: softmax once, level 0 written, P1 cell sums of q / minima of M into shared memory.
  {
    constexpr int NB = kRowBatch<TMAX>;
    const ctxlab::TileLevel& l1 = tl.lv[fp];
    const int nrow = tl.s1z * tl.s1y;
    A* sq = sm + l1.off;
    A* smn = sq + t * l1.n;
    for (int cr = r; cr < l1.nz * l1.ny; cr += tl.R) {  // warp-uniform
      int cy;
      const int cz = l1.div_ny.divmod(cr, &cy);
      A qs[TMAX];
#pragma unroll
      for (int k = 0; k < TMAX; ++k) qs[k] = A(0);
      A mn = inf_of<A>();
      const int zc = z0 + cz * tl.s1z, yc = y0 + cy * tl.s1y;
      for (int i0 = 0; xin && i0 < nrow; i0 += NB) {
        int vv[NB];
        T raw[NB][TMAX];
        A dv[NB];
        L yv[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) {
          vv[j] = row_voxel(tl, i0 + j, zc, yc, x, D, H, W);
          if (vv[j] >= 0) {
            voxel_load<T, TMAX>(ob + vv[j], V, t, raw[j]);
            dv[j] = db[vv[j]];
            if (out0) yv[j] = yb[vv[j]];
          }
        }
#pragma unroll
        for (int j = 0; j < NB; ++j) {
          if (vv[j] < 0) continue;
          A q[TMAX];
          softmax_of<T, TMAX>(raw[j], t, q);
          const A M = ctxlab::mask_of_distance(dv[j], margin, tau);
          if (out0)
            voxel_write<A, L, TMAX>(q, M, yv[j], t, c, out0 + vv[j], V, mask0 ? mask0 + vv[j] : nullptr);
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) qs[k] += q[k];
          mn = min_keep(mn, M);
        }
      }
      // the s1x lanes of a P1 cell (aligned groups: s1x | 32, x0 % s1x == 0); all lanes active
      for (int sh = 1; sh < tl.s1x; sh <<= 1) {
#pragma unroll
        for (int k = 0; k < TMAX; ++k)
          if (k < t) qs[k] += __shfl_xor_sync(0xffffffffu, qs[k], sh);
        mn = min_keep(mn, __shfl_xor_sync(0xffffffffu, mn, sh));
      }
      int lane_in_cell;
      const int cx = tl.div_s1x.divmod(lx, &lane_in_cell);
      if (lane_in_cell == 0) {
        const int cell = cr * l1.nx + cx;
#pragma unroll
        for (int k = 0; k < TMAX; ++k)
          if (k < t) sq[k * l1.n + cell] = qs[k];
        smn[cell] = mn;
      }
    }
  }
  __syncthreads();

  // 2. pooled levels, coarser from finer; each level's cells written to global memory.
  constexpr int NC = kLevelBatch<TMAX>;
  for (int l = fp; l < p.nlev; ++l) {
    const ctxlab::TileLevel& lc = tl.lv[l];
    const ctxlab::TileLevel& pc = tl.lv[l > fp ? l - 1 : l];  // the finer level (itself for the first)
    A* sq = sm + lc.off;
    A* smn = sq + t * lc.n;
    const A* pq = sm + pc.off;
    const A* pmn = pq + t * pc.n;
    const int Vl = static_cast<int>(p.level_voxels(l));
    const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
    for (int c0 = threadIdx.x; c0 < lc.n; c0 += NC * blockDim.x) {
      int oi[NC];
      L yl[NC];
      load_cells<NC>(lc, tp, c0, true, H, W, yb, oi, yl, [](int, bool) {});
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const int cell = c0 + j * static_cast<int>(blockDim.x);
        if (cell >= lc.n) break;
        A qs[TMAX];
        A mn;
        if (l == fp) {
#pragma unroll
          for (int k = 0; k < TMAX; ++k) qs[k] = k < t ? sq[k * lc.n + cell] : A(0);
          mn = smn[cell];
        } else {
#pragma unroll
          for (int k = 0; k < TMAX; ++k) qs[k] = A(0);
          mn = inf_of<A>();
          for_finer_cells(lc, pc, cell, [&](int sub) {
#pragma unroll
            for (int k = 0; k < TMAX; ++k)
              if (k < t) qs[k] += pq[k * pc.n + sub];
            mn = min_keep(mn, pmn[sub]);
          });
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) sq[k * lc.n + cell] = qs[k];
          smn[cell] = mn;
        }
        if (oi[j] < 0) continue;  // partial cell: no output
        if (yl[j] > L(0)) mn = A(1);
#pragma unroll
        for (int k = 0; k < TMAX; ++k)
          if (k < t) qs[k] *= inv_vol;
        voxel_write<A, L, TMAX>(qs, mn, yl[j], t, c, outs.p[l] + b * K * Vl + oi[j], Vl,
                                masks.p[l] ? masks.p[l] + b * Vl + oi[j] : nullptr);
      }
    }
    if (l + 1 < p.nlev) __syncthreads();  // the next level reads this level's stats
  }
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256, tiled_min_blocks<acc_t<T>, TMAX>())
    bwd_tiled(const __grid_constant__ Plan p, const __grid_constant__ ctxlab::Tile tl,
               const __grid_constant__ LevelPtrs<const acc_t<T>> grads, const T* __restrict__ o,
               const L* __restrict__ y, const acc_t<T>* __restrict__ d, T* __restrict__ grad_o,
               acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int t = exact_t<TMAX>(p.t), c = static_cast<int>(p.c), K = static_cast<int>(p.K);
  const int D = static_cast<int>(p.S[0]), H = static_cast<int>(p.S[1]), W = static_cast<int>(p.S[2]);
  const int HW = H * W, V = D * HW;
  const TilePos tp = tile_pos(tl);
  const int64_t b = blockIdx.y;
  const int lx = tp.lx, r = tp.r, z0 = tp.z0, y0 = tp.y0;
  const int x = tp.x0 + lx;
  const bool xin = x < W;
  const T* ob = o + b * t * V;
  const L* yb = y + b * V;
  const A* db = d + b * V;
  const int fp = p.first_pooled;
  bool any_pooled = false;
  for (int l = fp; l < p.nlev; ++l) any_pooled |= grads.p[l] != nullptr;  // block-uniform

  // Per cell of a pooled level: its centre label and incoming gradient, NC cells per thread at
  // once (one round trip). The first batch of the first pooled level loads before step 1, in
  // flight through the minima pass. oi[j] < 0: no gradient there (partial cell, or none given).
  constexpr int NC = kLevelBatch<TMAX>;
  L yl[NC];
  int oi[NC];
  A gv[NC][TMAX];
  auto load_level = [&](int l, int c0) {
    const int Vl = static_cast<int>(p.level_voxels(l));
    const A* gl = grads.p[l] ? grads.p[l] + b * K * Vl : nullptr;
    load_cells<NC>(tl.lv[l], tp, c0, gl != nullptr, H, W, yb, oi, yl, [&](int j, bool in) {
#pragma unroll
      for (int k = 0; k < TMAX; ++k)
        gv[j][k] = in && k < t ? gl[static_cast<int>(ctxlab::context_channel(k, c)) * Vl + oi[j]] : A(0);
    });
  };
  if (any_pooled) load_level(fp, threadIdx.x);

  if (any_pooled) {
    // 1. P1 cell minima of M.
    constexpr int NB = 2 * kRowBatch<TMAX>;  // one value per voxel
    const ctxlab::TileLevel& l1 = tl.lv[fp];
    const int nrow = tl.s1z * tl.s1y;
    A* smn = sm + l1.off + t * l1.n;
    for (int cr = r; cr < l1.nz * l1.ny; cr += tl.R) {  // warp-uniform
      int cy;
      const int cz = l1.div_ny.divmod(cr, &cy);
      const int zc = z0 + cz * tl.s1z, yc = y0 + cy * tl.s1y;
      A mn = inf_of<A>();
      for (int i0 = 0; xin && i0 < nrow; i0 += NB) {
        int vv[NB];
        A dv[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) {
          vv[j] = row_voxel(tl, i0 + j, zc, yc, x, D, H, W);
          if (vv[j] >= 0) dv[j] = db[vv[j]];
        }
#pragma unroll
        for (int j = 0; j < NB; ++j)
          if (vv[j] >= 0) mn = min_keep(mn, ctxlab::mask_of_distance(dv[j], margin, tau));
      }
      for (int sh = 1; sh < tl.s1x; sh <<= 1) mn = min_keep(mn, __shfl_xor_sync(0xffffffffu, mn, sh));
      int lane_in_cell;
      const int cx = tl.div_s1x.divmod(lx, &lane_in_cell);
      if (lane_in_cell == 0) smn[cr * l1.nx + cx] = mn;
    }
    __syncthreads();

    // 2. per level cell: minima (coarser from finer) and the pooled gradient [y_l = 0] M_l g_l /
    //    vol_l per context (0 for partial cells, ROI cells and levels without a gradient).
    for (int l = fp; l < p.nlev; ++l) {
      const ctxlab::TileLevel& lc = tl.lv[l];
      const ctxlab::TileLevel& pc = tl.lv[l > fp ? l - 1 : l];  // the finer level (itself for the first)
      A* sg = sm + lc.off;
      A* smnl = sg + t * lc.n;
      const A* pmn = sm + pc.off + t * pc.n;
      const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
      for (int c0 = threadIdx.x; c0 < lc.n; c0 += NC * blockDim.x) {
        if (l > fp || c0 != static_cast<int>(threadIdx.x)) load_level(l, c0);
#pragma unroll
        for (int j = 0; j < NC; ++j) {
          const int cell = c0 + j * static_cast<int>(blockDim.x);
          if (cell >= lc.n) break;
          A mn;
          if (l == fp) {
            mn = smnl[cell];
          } else {
            mn = inf_of<A>();
            for_finer_cells(lc, pc, cell, [&](int sub) { mn = min_keep(mn, pmn[sub]); });
            smnl[cell] = mn;
          }
          const A coef = mn * inv_vol;
          const bool live = oi[j] >= 0 && !(yl[j] > L(0));
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) sg[k * lc.n + cell] = live ? coef * gv[j][k] : A(0);
        }
      }
      __syncthreads();  // the next level reads these minima; step 3 reads the gradients
    }
  }

  // 3. softmax backward per voxel: level-0 gradient plus the pooled gradients of its cells,
  //    summed in level order (as the kernel above: 0 + level fp + level fp+1 + ...).
  const A* g0 = p.level0_full && grads.p[0] ? grads.p[0] + b * K * V : nullptr;
  T* gob = grad_o + b * t * V;
  constexpr int NB = kRowBatch<TMAX>;
  const int nrow = tl.s1z * tl.s1y;
  const ctxlab::TileLevel& l1 = tl.lv[fp];
  for (int cr = r; cr < l1.nz * l1.ny; cr += tl.R) {
    int cy;
    const int cz = l1.div_ny.divmod(cr, &cy);
    A gp[TMAX];
#pragma unroll
    for (int k = 0; k < TMAX; ++k) gp[k] = A(0);
    if (any_pooled) {
      for (int l = fp; l < p.nlev; ++l) {
        const ctxlab::TileLevel& lc = tl.lv[l];
        const A* sg = sm + lc.off;
        const int cell = (lc.div_pz.div(cz) * lc.ny + lc.div_py.div(cy)) * lc.nx + lc.div_sx.div(lx);
#pragma unroll
        for (int k = 0; k < TMAX; ++k)
          if (k < t) gp[k] += sg[k * lc.n + cell];
      }
    }
    if (!xin) continue;  // no shuffles below
    const int zc = z0 + cz * tl.s1z, yc = y0 + cy * tl.s1y;
    for (int i0 = 0; i0 < nrow; i0 += NB) {
      int vv[NB];
      T raw[NB][TMAX];
      L yv[NB];
      A dv[NB], gv[NB][TMAX];  // the level-0 gradient's context channels
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        vv[j] = row_voxel(tl, i0 + j, zc, yc, x, D, H, W);
        if (vv[j] < 0) continue;
        voxel_load<T, TMAX>(ob + vv[j], V, t, raw[j]);
        if (g0) {
          yv[j] = yb[vv[j]];
          dv[j] = db[vv[j]];
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) gv[j][k] = g0[static_cast<int>(ctxlab::context_channel(k, c)) * V + vv[j]];
        }
      }
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        if (vv[j] < 0) continue;
        A q[TMAX];
        softmax_of<T, TMAX>(raw[j], t, q);
        const bool bg = g0 != nullptr && !(yv[j] > L(0));
        const A M = bg ? ctxlab::mask_of_distance(dv[j], margin, tau) : A(0);
        A gq[TMAX];
        A dot = A(0);
#pragma unroll
        for (int k = 0; k < TMAX; ++k) {
          if (k < t) {
            gq[k] = gp[k] + (bg ? M * gv[j][k] : A(0));
            dot += q[k] * gq[k];
          }
        }
#pragma unroll
        for (int k = 0; k < TMAX; ++k)
          if (k < t) gob[k * V + vv[j]] = store_as<T>(ctxlab::softmax_backward(q[k], gq[k], dot));
      }
    }
  }
}

// ------------------------------------------------------------------------------------- host

dim3 tile_grid(const Plan& p, const ctxlab::Tile& tl) {
  return dim3(static_cast<unsigned>(static_cast<int64_t>(tl.ntz) * tl.nty * tl.ntx), static_cast<unsigned>(p.B));
}

// Calls fn(std::integral_constant<int, TMAX>) for the register-array bound covering t: t itself
// up to 4 (exact_t), else one wide bucket.
template <typename Fn>
void dispatch_tmax(int64_t t, Fn&& fn) {
  if (t == 1) return fn(std::integral_constant<int, 1>{});
  if (t == 2) return fn(std::integral_constant<int, 2>{});
  if (t == 3) return fn(std::integral_constant<int, 3>{});
  if (t == 4) return fn(std::integral_constant<int, 4>{});
  if (t <= ctxlab::kCudaMaxT) return fn(std::integral_constant<int, ctxlab::kCudaMaxT>{});
  throw std::invalid_argument("context_labels (CUDA): t must be <= " + std::to_string(ctxlab::kCudaMaxT));
}

dim3 flat_grid(const Plan& p) {
  if (p.B > 65535) throw std::invalid_argument("context_labels (CUDA): batch larger than 65535");
  return dim3(static_cast<unsigned>(ctxlab::ceil_div(p.voxels(), 256)), static_cast<unsigned>(p.B));
}

// Thread rows per block of the coalesced tiled kernels (sets tl->R; returns blockDim.x). The
// most rows whose blocks all fit in one wave, else 2: a block's level steps (barriers, per-cell
// loads) stall all its warps, so smaller blocks keep more warps streaming voxels, as long as
// there are enough of them; while all blocks fit one wave, more rows per block finish sooner.
template <typename Kernel>
unsigned tile_threads(Kernel kernel, const Plan& p, ctxlab::Tile* tl, size_t smem, int device) {
  const int most = tl->R;
  int rows = std::min(2, most);
  const int64_t blocks = p.B * int64_t(tl->ntz) * tl->nty * tl->ntx;
  for (int r = most; r > 2; r = r / 2) {
    if (blocks <= cuda::resident_blocks(reinterpret_cast<const void*>(kernel), tl->TW * r, smem,
                                        device, "context_labels")) {
      rows = r;
      break;
    }
  }
  tl->R = rows;
  return static_cast<unsigned>(tl->TW * rows);
}

// The tile of a call with pooled levels for `kernel` (accumulation type A), with its dynamic
// shared memory and the threads per block to launch it with.
template <typename A, typename Kernel>
ctxlab::Tile pooled_tile(Kernel kernel, const Plan& p, int device, size_t* smem,
                         unsigned* threads) {
  ctxlab::Tile tl;
  if (!ctxlab::make_tile(p, sizeof(A), &tl, smem))
    throw std::invalid_argument("context_labels (CUDA): no tile for these levels "
                                "(context_labels_cuda_supported is false)");
  *threads = tile_threads(kernel, p, &tl, *smem, device);
  return tl;
}

// The kernel instantiation of one call: fn(TypeTag<logits type>, TypeTag<label type>,
// integral_constant<int, TMAX>).
template <typename Fn>
void for_kernel_types(const Plan& p, int o_dtype, int y_dtype, Fn&& fn) {
  dispatch_floating(o_dtype, "context_labels gen_logits", [&](auto tag) {
    dispatch_labels(y_dtype, "context_labels labels",
                    [&](auto ltag) { dispatch_tmax(p.t, [&](auto tm) { fn(tag, ltag, tm); }); });
  });
}

}  // namespace

void context_labels_forward_cuda(const Plan& p, uintptr_t o, int o_dtype, uintptr_t y, int y_dtype,
                                 uintptr_t d, const std::vector<uintptr_t>& outs,
                                 const std::vector<uintptr_t>& masks, double margin, double tau,
                                 int device, uintptr_t stream) {
  const cuda::DeviceScope scope(device, "context_labels");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (p.B == 0 || p.voxels() == 0) return;
  for_kernel_types(p, o_dtype, y_dtype, [&](auto tag, auto ltag, auto tm) {
    using T = typename decltype(tag)::type;
    using L = typename decltype(ltag)::type;
    using A = acc_t<T>;
    constexpr int TMAX = decltype(tm)::value;
    LevelPtrs<A> op{}, mp{};
    for (int l = 0; l < p.nlev; ++l) {
      op.p[l] = reinterpret_cast<A*>(outs[l]);
      mp.p[l] = masks.empty() ? nullptr : reinterpret_cast<A*>(masks[l]);
    }
    const auto* ot = reinterpret_cast<const T*>(o);
    const auto* yt = reinterpret_cast<const L*>(y);
    const auto* dt = reinterpret_cast<const A*>(d);
    if (!p.has_pooled()) {
      fwd_flat<T, L, TMAX><<<flat_grid(p), 256, 0, st>>>(
          p, ot, yt, dt, op.p[0], mp.p[0], static_cast<A>(margin), static_cast<A>(tau));
      cuda::check_launch("context_labels forward (flat)");
      return;
    }
    constexpr auto kernel = fwd_tiled<T, L, TMAX>;
    size_t smem = 0;
    unsigned threads = 0;
    const ctxlab::Tile tl = pooled_tile<A>(kernel, p, device, &smem, &threads);
    kernel<<<tile_grid(p, tl), threads, smem, st>>>(p, tl, ot, yt, dt, op, mp,
                                                    static_cast<A>(margin), static_cast<A>(tau));
    cuda::check_launch("context_labels forward (tiled)");
  });
}

void context_labels_backward_cuda(const Plan& p, const std::vector<uintptr_t>& grads, uintptr_t o,
                                  int o_dtype, uintptr_t y, int y_dtype, uintptr_t d, uintptr_t grad_o,
                                  double margin, double tau, int device, uintptr_t stream) {
  const cuda::DeviceScope scope(device, "context_labels");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (p.B == 0 || p.voxels() == 0) return;
  for_kernel_types(p, o_dtype, y_dtype, [&](auto tag, auto ltag, auto tm) {
    using T = typename decltype(tag)::type;
    using L = typename decltype(ltag)::type;
    using A = acc_t<T>;
    constexpr int TMAX = decltype(tm)::value;
    LevelPtrs<const A> gp{};
    for (int l = 0; l < p.nlev; ++l) gp.p[l] = reinterpret_cast<const A*>(grads[l]);
    const auto* ot = reinterpret_cast<const T*>(o);
    const auto* yt = reinterpret_cast<const L*>(y);
    const auto* dt = reinterpret_cast<const A*>(d);
    auto* go = reinterpret_cast<T*>(grad_o);
    if (!p.has_pooled()) {
      bwd_flat<T, L, TMAX><<<flat_grid(p), 256, 0, st>>>(
          p, gp.p[0], ot, yt, dt, go, static_cast<A>(margin), static_cast<A>(tau));
      cuda::check_launch("context_labels backward (flat)");
      return;
    }
    constexpr auto kernel = bwd_tiled<T, L, TMAX>;
    size_t smem = 0;
    unsigned threads = 0;
    const ctxlab::Tile tl = pooled_tile<A>(kernel, p, device, &smem, &threads);
    kernel<<<tile_grid(p, tl), threads, smem, st>>>(p, tl, gp, ot, yt, dt, go,
                                                    static_cast<A>(margin), static_cast<A>(tau));
    cuda::check_launch("context_labels backward (tiled)");
  });
}

}  // namespace colabx
