// context_labels CUDA kernels: forward and backward each emit / consume ALL levels in ONE launch.
//
// * Single level at full resolution (the common non-deep-supervision case): a flat kernel, one
//   thread per voxel, grid (voxel blocks, batch), coalesced loads/stores on every channel plane.
// * Pooled levels: a block owns a tile aligned to the coarsest stride (coarse[0] x coarse[1] x
//   mW * coarse[2] voxels). Each thread owns cells of the first pooled level ("P1 cells"): it
//   reads their voxels once (softmax once per voxel, level 0 written on the way), reduces the
//   q sums / M minima in registers and parks them in shared memory; after one barrier every
//   pooled level is written from those statistics. Backward: P1 cell minima of M -> per-level
//   pooled gradients scattered into P1 cells in shared memory (one barrier per level, levels in
//   order, so the sums are deterministic) -> one softmax-backward pass over the voxels.
// Every thread uses a fixed summation order: results are bitwise reproducible run to run.
//
// tests/cuda_emulation compiles this file for host threads (COLABX_CUDA_EMULATION: the CUDA
// headers left out, launches rewritten) and runs it on CPU test machines.
#if !defined(COLABX_CUDA_EMULATION)
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/context_labels.h"
#include "common/dispatch.h"
#include "common/fast_divmod.h"
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

// Tile geometry of the pooled kernels (host computed, passed by value).
struct Tile {
  int64_t TD, TH, TW;     // tile extent in voxels
  int64_t s1z, s1y, s1x;  // first pooled level's stride (P1 cell size)
  int64_t n1z, n1y, n1x;  // P1 cells per tile per axis
  int64_t n1;             // P1 cells per tile
  int64_t ntz, nty, ntx;  // tiles per axis
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

// ----------------------------------------------------------------------------- tiled kernels

struct TileCoords {
  int64_t b, z0, y0, x0;
};

__device__ __forceinline__ TileCoords tile_coords(const Tile& tl) {
  int64_t i = blockIdx.x;
  TileCoords tc;
  const int64_t tx = i % tl.ntx;
  i /= tl.ntx;
  const int64_t ty = i % tl.nty;
  i /= tl.nty;
  const int64_t tz = i % tl.ntz;
  tc.b = i / tl.ntz;
  tc.z0 = tz * tl.TD;
  tc.y0 = ty * tl.TH;
  tc.x0 = tx * tl.TW;
  return tc;
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256, 2)
    fwd_tiled(const __grid_constant__ Plan p, const __grid_constant__ Tile tl,
              const T* __restrict__ o, const L* __restrict__ y, const acc_t<T>* __restrict__ d,
              const __grid_constant__ LevelPtrs<acc_t<T>> outs,
              const __grid_constant__ LevelPtrs<acc_t<T>> masks, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_q = reinterpret_cast<A*>(smem_raw);  // [t][n1] cell sums of q
  A* s_m = s_q + p.t * tl.n1;               // [n1]    cell minima of M
  const TileCoords tc = tile_coords(tl);
  const int t = exact_t<TMAX>(p.t);
  const int64_t D = p.S[0], H = p.S[1], W = p.S[2], HW = H * W, V = p.voxels();
  const int64_t s1[3] = {tl.s1z, tl.s1y, tl.s1x};
  const T* ob = o + tc.b * p.t * V;
  const L* yb = y + tc.b * V;
  const A* db = d + tc.b * V;

  for (int64_t cell = threadIdx.x; cell < tl.n1; cell += blockDim.x) {
    const int64_t cx = cell % tl.n1x, cy = (cell / tl.n1x) % tl.n1y, cz = cell / (tl.n1x * tl.n1y);
    A qs[TMAX];
#pragma unroll
    for (int k = 0; k < TMAX; ++k) qs[k] = A(0);
    A mn = inf_of<A>();
    for (int64_t a = 0; a < s1[0]; ++a) {
      const int64_t z = tc.z0 + cz * s1[0] + a;
      if (z >= D) break;
      for (int64_t bb = 0; bb < s1[1]; ++bb) {
        const int64_t yy = tc.y0 + cy * s1[1] + bb;
        if (yy >= H) break;
        for (int64_t e = 0; e < s1[2]; ++e) {
          const int64_t x = tc.x0 + cx * s1[2] + e;
          if (x >= W) break;
          const int64_t v = z * HW + yy * W + x;
          A q[TMAX];
          voxel_softmax<T, TMAX>(ob + v, V, t, q);
          const A M = ctxlab::mask_of_distance(db[v], margin, tau);
          if (p.level0_full)
            voxel_write<A, L, TMAX>(q, M, yb[v], t, p.c, outs.p[0] + tc.b * p.K * V + v, V,
                                    masks.p[0] ? masks.p[0] + tc.b * V + v : nullptr);
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) qs[k] += q[k];
          mn = M < mn ? M : mn;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < TMAX; ++k)
      if (k < t) s_q[k * tl.n1 + cell] = qs[k];
    s_m[cell] = mn;
  }
  __syncthreads();

  for (int l = p.first_pooled; l < p.nlev; ++l) {
    const int64_t* s = p.st[l];
    const int64_t fz = s[0] / s1[0], fy = s[1] / s1[1], fx = s[2] / s1[2];
    const int64_t nlx = tl.TW / s[2], nly = tl.TH / s[1], nlz = tl.TD / s[0];
    const int64_t Vl = p.level_voxels(l), SlW = p.Sl[l][2], SlHW = p.Sl[l][1] * SlW;
    const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
    for (int64_t cell = threadIdx.x; cell < nlx * nly * nlz; cell += blockDim.x) {
      const int64_t lx = cell % nlx, ly = (cell / nlx) % nly, lz = cell / (nlx * nly);
      const int64_t rz = tc.z0 / s[0] + lz, ry = tc.y0 / s[1] + ly, rx = tc.x0 / s[2] + lx;
      if (rz >= p.Sl[l][0] || ry >= p.Sl[l][1] || rx >= SlW) continue;
      A qs[TMAX];
#pragma unroll
      for (int k = 0; k < TMAX; ++k) qs[k] = A(0);
      A Ml = inf_of<A>();
      for (int64_t a = 0; a < fz; ++a)
        for (int64_t bb = 0; bb < fy; ++bb)
          for (int64_t e = 0; e < fx; ++e) {
            const int64_t sub = ((lz * fz + a) * tl.n1y + ly * fy + bb) * tl.n1x + lx * fx + e;
#pragma unroll
            for (int k = 0; k < TMAX; ++k)
              if (k < t) qs[k] += s_q[k * tl.n1 + sub];
            Ml = s_m[sub] < Ml ? s_m[sub] : Ml;
          }
      const L yl = yb[(rz * s[0] + s[0] / 2) * HW + (ry * s[1] + s[1] / 2) * W + rx * s[2] + s[2] / 2];
      const bool roi = yl > L(0);
      if (roi) Ml = A(1);
#pragma unroll
      for (int k = 0; k < TMAX; ++k)
        if (k < t) qs[k] *= inv_vol;
      const int64_t oi = rz * SlHW + ry * SlW + rx;
      voxel_write<A, L, TMAX>(qs, Ml, yl, t, p.c, outs.p[l] + tc.b * p.K * Vl + oi, Vl,
                              masks.p[l] ? masks.p[l] + tc.b * Vl + oi : nullptr);
    }
  }
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256, 2)
    bwd_tiled(const __grid_constant__ Plan p, const __grid_constant__ Tile tl,
              const __grid_constant__ LevelPtrs<const acc_t<T>> grads, const T* __restrict__ o,
              const L* __restrict__ y, const acc_t<T>* __restrict__ d, T* __restrict__ grad_o,
              acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_g = reinterpret_cast<A*>(smem_raw);  // [t][n1] pooled gradient per P1 cell
  A* s_m = s_g + p.t * tl.n1;               // [n1]    cell minima of M
  const TileCoords tc = tile_coords(tl);
  const int t = exact_t<TMAX>(p.t);
  const int64_t D = p.S[0], H = p.S[1], W = p.S[2], HW = H * W, V = p.voxels();
  const int64_t s1[3] = {tl.s1z, tl.s1y, tl.s1x};
  const T* ob = o + tc.b * p.t * V;
  const L* yb = y + tc.b * V;
  const A* db = d + tc.b * V;
  bool any_pooled = false;
  for (int l = p.first_pooled; l < p.nlev; ++l) any_pooled |= grads.p[l] != nullptr;

  // 1. P1 cell minima of M; zero the pooled-gradient cells.
  for (int64_t cell = threadIdx.x; cell < tl.n1; cell += blockDim.x) {
    for (int k = 0; k < t; ++k) s_g[k * tl.n1 + cell] = A(0);
    if (!any_pooled) continue;
    const int64_t cx = cell % tl.n1x, cy = (cell / tl.n1x) % tl.n1y, cz = cell / (tl.n1x * tl.n1y);
    A mn = inf_of<A>();
    for (int64_t a = 0; a < s1[0]; ++a) {
      const int64_t z = tc.z0 + cz * s1[0] + a;
      if (z >= D) break;
      for (int64_t bb = 0; bb < s1[1]; ++bb) {
        const int64_t yy = tc.y0 + cy * s1[1] + bb;
        if (yy >= H) break;
        for (int64_t e = 0; e < s1[2]; ++e) {
          const int64_t x = tc.x0 + cx * s1[2] + e;
          if (x >= W) break;
          const A M = ctxlab::mask_of_distance(db[z * HW + yy * W + x], margin, tau);
          mn = M < mn ? M : mn;
        }
      }
    }
    s_m[cell] = mn;
  }
  __syncthreads();

  // 2. pooled gradients [y_l = 0] M_l g_l / vol_l, level by level into the P1 cells.
  for (int l = p.first_pooled; l < p.nlev; ++l) {
    if (grads.p[l] == nullptr) continue;  // uniform across the block
    const int64_t* s = p.st[l];
    const int64_t fz = s[0] / s1[0], fy = s[1] / s1[1], fx = s[2] / s1[2];
    const int64_t nlx = tl.TW / s[2], nly = tl.TH / s[1], nlz = tl.TD / s[0];
    const int64_t Vl = p.level_voxels(l), SlW = p.Sl[l][2], SlHW = p.Sl[l][1] * SlW;
    const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
    const A* gl = grads.p[l] + tc.b * p.K * Vl;
    for (int64_t cell = threadIdx.x; cell < nlx * nly * nlz; cell += blockDim.x) {
      const int64_t lx = cell % nlx, ly = (cell / nlx) % nly, lz = cell / (nlx * nly);
      const int64_t rz = tc.z0 / s[0] + lz, ry = tc.y0 / s[1] + ly, rx = tc.x0 / s[2] + lx;
      if (rz >= p.Sl[l][0] || ry >= p.Sl[l][1] || rx >= SlW) continue;
      const L yl = yb[(rz * s[0] + s[0] / 2) * HW + (ry * s[1] + s[1] / 2) * W + rx * s[2] + s[2] / 2];
      if (yl > L(0)) continue;
      A Ml = inf_of<A>();
      for (int64_t a = 0; a < fz; ++a)
        for (int64_t bb = 0; bb < fy; ++bb)
          for (int64_t e = 0; e < fx; ++e) {
            const int64_t sub = ((lz * fz + a) * tl.n1y + ly * fy + bb) * tl.n1x + lx * fx + e;
            Ml = s_m[sub] < Ml ? s_m[sub] : Ml;
          }
      const A coef = Ml * inv_vol;
      const int64_t oi = rz * SlHW + ry * SlW + rx;
      for (int k = 0; k < t; ++k) {
        const A v = coef * gl[ctxlab::context_channel(k, p.c) * Vl + oi];
        for (int64_t a = 0; a < fz; ++a)
          for (int64_t bb = 0; bb < fy; ++bb)
            for (int64_t e = 0; e < fx; ++e)
              s_g[k * tl.n1 + ((lz * fz + a) * tl.n1y + ly * fy + bb) * tl.n1x + lx * fx + e] += v;
      }
    }
    __syncthreads();  // the next level adds into the same cells
  }

  // 3. softmax backward over the voxels of each P1 cell.
  const A* g0 = p.level0_full ? grads.p[0] : nullptr;
  for (int64_t cell = threadIdx.x; cell < tl.n1; cell += blockDim.x) {
    const int64_t cx = cell % tl.n1x, cy = (cell / tl.n1x) % tl.n1y, cz = cell / (tl.n1x * tl.n1y);
    A gp[TMAX];
#pragma unroll
    for (int k = 0; k < TMAX; ++k) gp[k] = k < t ? s_g[k * tl.n1 + cell] : A(0);
    for (int64_t a = 0; a < s1[0]; ++a) {
      const int64_t z = tc.z0 + cz * s1[0] + a;
      if (z >= D) break;
      for (int64_t bb = 0; bb < s1[1]; ++bb) {
        const int64_t yy = tc.y0 + cy * s1[1] + bb;
        if (yy >= H) break;
        for (int64_t e = 0; e < s1[2]; ++e) {
          const int64_t x = tc.x0 + cx * s1[2] + e;
          if (x >= W) break;
          const int64_t v = z * HW + yy * W + x;
          A q[TMAX];
          voxel_softmax<T, TMAX>(ob + v, V, t, q);
          const bool bg = g0 != nullptr && !(yb[v] > L(0));
          const A M = bg ? ctxlab::mask_of_distance(db[v], margin, tau) : A(0);
          const A* gv = g0 ? g0 + tc.b * p.K * V + v : nullptr;
          A gq[TMAX];
          A dot = A(0);
#pragma unroll
          for (int k = 0; k < TMAX; ++k) {
            if (k < t) {
              gq[k] = gp[k] + (bg ? M * gv[ctxlab::context_channel(k, p.c) * V] : A(0));
              dot += q[k] * gq[k];
            }
          }
          T* go = grad_o + tc.b * p.t * V + v;
#pragma unroll
          for (int k = 0; k < TMAX; ++k)
            if (k < t) go[k * V] = store_as<T>(ctxlab::softmax_backward(q[k], gq[k], dot));
        }
      }
    }
  }
}

// ------------------------------------------------------------------ coalesced tiled kernels
//
// Preconditions (checked on the host by make_tile2; otherwise the kernels above run): K * V and
// the tile counts fit int32, the first pooled level's x stride s1x divides 32, TW (the tile's x
// extent and its threads along x) is a multiple of 32 and of the coarsest x stride.
// Block = TW x R threads; thread (lx, r) owns voxel column x = x0 + lx and the P1 cell rows
// r, r + R, ... of the tile (a cell row = one P1 cell extent in z and y). A warp lies in one r,
// so its 32 lanes read / write 32 consecutive voxels of one (z, y) row (coalesced, as the flat
// kernels), every loop bound is warp-uniform, and the s1x lanes of one P1 cell combine their
// partial sums with xor shuffles (all 32 lanes active). Pooled levels are reduced
// hierarchically in shared memory: level l's per-cell sums / minima from level l-1's, one
// barrier per level; each level's statistics are laid out [t][n_l] values then [n_l] values.
// All index math divides by host-built FastDivmods: the run-time integer divisions it replaced
// were ~20 instructions each, several per voxel in the backward's gradient gather.
//
// One pooled level in tile-local terms.
struct Level2 {
  int sz, sy, sx;           // stride: the level's cell size in voxels
  int nz, ny, nx, n;        // cells per tile per axis, and in all
  int fz, fy, fx;           // cells of the previous pooled level per cell and axis (first: 1)
  int Slz, Sly, Slx;        // the level's output size (cells past it are partial: no output)
  int off;                  // shared-memory offset (elements) of the level's statistics
  FastDivmod div_nx, div_ny;          // tile-local cell index -> (z, y, x)
  FastDivmod div_pz, div_py, div_sx;  // P1 cell row (z, y), lane x -> this level's cell (z, y, x)
};

struct Tile2 {
  int TD, TH, TW, R;        // tile extent in voxels; row groups of threads (blockDim.x = TW * R)
  int s1z, s1y, s1x;        // first pooled level's stride (P1 cell size)
  int ntz, nty, ntx;        // tiles per axis (per batch item)
  FastDivmod div_TW, div_s1y, div_s1x, div_ntx, div_nty;
  Level2 lv[ctxlab::kMaxLevels];  // pooled levels first_pooled..nlev-1
};

// A block's tile and a thread's place in it.
struct TilePos {
  int tz, ty, tx;  // tile index per axis
  int z0, y0, x0;  // tile origin (voxels)
  int lx, r;       // thread column (x0 + lx) and row group
};

__device__ __forceinline__ TilePos tile_pos(const Tile2& tl) {
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
__device__ __forceinline__ void cell_coords(const Level2& lv, int cell, int* cz, int* cy, int* cx) {
  *cz = lv.div_ny.divmod(lv.div_nx.divmod(cell, cx), cy);
}

// fn(sub) for each cell `sub` of the finer level fl inside cell `cell` of level lv, z-major (the
// fixed order of the hierarchical sums and minima).
template <typename Fn>
__device__ __forceinline__ void for_finer_cells(const Level2& lv, const Level2& fl, int cell,
                                                Fn&& fn) {
  int cz, cy, cx;
  cell_coords(lv, cell, &cz, &cy, &cx);
  for (int a = 0; a < lv.fz; ++a)
    for (int e = 0; e < lv.fy; ++e)
      for (int f = 0; f < lv.fx; ++f)
        fn(((cz * lv.fz + a) * fl.ny + cy * lv.fy + e) * fl.nx + cx * lv.fx + f);
}

// Voxels of a P1 cell row one thread loads before using any (all their loads in flight at once;
// one voxel at a time, the tiled kernels waited on each voxel's loads in turn and ran at half the
// flat kernels' bytes/s; batched, run 5 on an H200 at 2x2x160^3 with 4 levels: forward 190 ->
// 160 us, backward 272 -> 242 us). Wider t loads more per voxel and batches fewer, so the values
// stay in registers (t <= 2: 4 voxels, t <= 4: 2, wider: 1).
template <int TMAX>
constexpr int kRowBatch = TMAX <= 2 ? 4 : (TMAX <= 4 ? 2 : 1);

// Voxel i (0 <= i < s1z * s1y, z-major) of the P1 cell row starting at (zc, yc) in column x:
// its index, or -1 past the row or the volume.
__device__ __forceinline__ int row_voxel(const Tile2& tl, int i, int zc, int yc, int x, int D,
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
__device__ __forceinline__ int cell_center(const Level2& lv, const TilePos& tp, int cell, int H,
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
__device__ __forceinline__ void load_cells(const Level2& lv, const TilePos& tp, int c0, bool wanted,
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
// 80 registers its batched row loads (kRowBatch) need without spilling; each thread keeps 4
// voxels' loads in flight, where 5 blocks at 48 registers kept one (and spill 100+ bytes batched).
// Since the index math lost its divisions, ptxas fits that forward in 64 registers without
// spilling at 4 blocks, and the backward too (12 bytes spilled at t = 2) once it holds 4 level
// cells per batch instead of 8 and drops its early load of the first batch (kBwdLean). Not timed
// yet: a build with -DCOLABX_CTX_FWD_MIN_BLOCKS=4 -DCOLABX_CTX_BWD_MIN_BLOCKS=4
// (benchmarks/device_check.sh stage ab) is the experiment; the defaults are run 6's kernels.
#ifndef COLABX_CTX_FWD_MIN_BLOCKS
#define COLABX_CTX_FWD_MIN_BLOCKS 3
#endif
#ifndef COLABX_CTX_BWD_MIN_BLOCKS
#define COLABX_CTX_BWD_MIN_BLOCKS 3
#endif
constexpr bool kBwdLean = COLABX_CTX_BWD_MIN_BLOCKS >= 4;

template <typename A, int TMAX, bool FWD>
constexpr int tiled2_min_blocks() {
  return (sizeof(A) == 4 && TMAX <= 4) ? (FWD ? COLABX_CTX_FWD_MIN_BLOCKS : COLABX_CTX_BWD_MIN_BLOCKS)
                                       : 2;
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256, tiled2_min_blocks<acc_t<T>, TMAX, true>())
    fwd_tiled2(const __grid_constant__ Plan p, const __grid_constant__ Tile2 tl,
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
    const Level2& l1 = tl.lv[fp];
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
    const Level2& lc = tl.lv[l];
    const Level2& pc = tl.lv[l > fp ? l - 1 : l];  // the finer level (itself for the first)
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
__global__ void __launch_bounds__(256, tiled2_min_blocks<acc_t<T>, TMAX, false>())
    bwd_tiled2(const __grid_constant__ Plan p, const __grid_constant__ Tile2 tl,
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
  // flight through the minima pass (not when kBwdLean). oi[j] < 0: no gradient there (partial
  // cell, or none given).
  constexpr int NC = kBwdLean ? std::min(4, kLevelBatch<TMAX>) : kLevelBatch<TMAX>;
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
  if (!kBwdLean && any_pooled) load_level(fp, threadIdx.x);

  if (any_pooled) {
    // 1. P1 cell minima of M.
    constexpr int NB = 2 * kRowBatch<TMAX>;  // one value per voxel
    const Level2& l1 = tl.lv[fp];
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
      const Level2& lc = tl.lv[l];
      const Level2& pc = tl.lv[l > fp ? l - 1 : l];  // the finer level (itself for the first)
      A* sg = sm + lc.off;
      A* smnl = sg + t * lc.n;
      const A* pmn = sm + pc.off + t * pc.n;
      const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
      for (int c0 = threadIdx.x; c0 < lc.n; c0 += NC * blockDim.x) {
        if (kBwdLean || l > fp || c0 != static_cast<int>(threadIdx.x)) load_level(l, c0);
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
  const Level2& l1 = tl.lv[fp];
  for (int cr = r; cr < l1.nz * l1.ny; cr += tl.R) {
    int cy;
    const int cz = l1.div_ny.divmod(cr, &cy);
    A gp[TMAX];
#pragma unroll
    for (int k = 0; k < TMAX; ++k) gp[k] = A(0);
    if (any_pooled) {
      for (int l = fp; l < p.nlev; ++l) {
        const Level2& lc = tl.lv[l];
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile for the pooled kernels, and the dynamic shared memory it needs; `optin` is the device's
// opt-in shared memory per block (bytes).
Tile make_tile(const Plan& p, int optin, size_t elem, size_t* smem) {
  const int64_t* s1 = p.p1();
  Tile tl;
  tl.s1z = s1[0];
  tl.s1y = s1[1];
  tl.s1x = s1[2];
  tl.TD = p.coarse[0];
  tl.TH = p.coarse[1];
  const int64_t base = (p.coarse[0] / s1[0]) * (p.coarse[1] / s1[1]) * (p.coarse[2] / s1[2]);
  // Widen along W until a warp's cells span >= 32 P1 cells per row (coalescing), within W.
  int64_t mW = std::max<int64_t>(1, ceil_div(32 * s1[2], p.coarse[2]));
  mW = std::min(mW, std::max<int64_t>(1, ceil_div(p.S[2], p.coarse[2])));
  const size_t limit = std::max<size_t>(48 * 1024, static_cast<size_t>(optin));
  auto bytes = [&](int64_t m) { return static_cast<size_t>(base * m) * static_cast<size_t>(p.t + 1) * elem; };
  while (mW > 1 && (bytes(mW) > 48 * 1024 || base * mW > 4096)) --mW;
  if (bytes(mW) > limit)
    throw std::invalid_argument("context_labels (CUDA): the coarsest level's cell is too large for "
                                "shared memory; use fewer levels or smaller strides");
  tl.TW = p.coarse[2] * mW;
  tl.n1z = tl.TD / s1[0];
  tl.n1y = tl.TH / s1[1];
  tl.n1x = tl.TW / s1[2];
  tl.n1 = tl.n1z * tl.n1y * tl.n1x;
  tl.ntz = ceil_div(p.S[0], tl.TD);
  tl.nty = ceil_div(p.S[1], tl.TH);
  tl.ntx = ceil_div(p.S[2], tl.TW);
  *smem = bytes(mW);
  return tl;
}

// Tile of the coalesced kernels, or false when their preconditions do not hold (the kernels
// above run then). *smem: dynamic shared memory bytes (kept <= 48 KiB: no opt-in needed).
// out->R is the most thread rows a block can use; tile2_threads sets the number it gets.
bool make_tile2(const Plan& p, size_t elem, Tile2* out, size_t* smem) {
  constexpr int64_t kInt32Max = 2147483647;
  const int64_t* s1 = p.p1();
  if (p.B > 65535 || p.K * p.voxels() > kInt32Max) return false;
  if (s1[2] > 32 || 32 % s1[2] != 0) return false;  // xor-shuffle groups of s1x lanes
  const int64_t cz = p.coarse[0], cy = p.coarse[1], cx = p.coarse[2];
  const int64_t TW = std::lcm<int64_t>(32, cx);
  if (TW > 256 || cz * cy > 4096) return false;
  // Stack coarse tiles along y (2D inputs, shallow tiles) towards ~2048 voxels per block.
  int64_t my = 1;
  while (cz * cy * (my + 1) * TW <= 2048 && cy * (my + 1) <= std::max<int64_t>(cy, p.S[1])) ++my;
  const int64_t TD = cz, TH = cy * my;
  const int64_t rows = (TD / s1[0]) * (TH / s1[1]);  // P1 cell rows per tile
  const int64_t R = std::min<int64_t>(256 / TW, rows);  // the most; tile2_threads picks
  size_t total = 0;
  Tile2 tl{};
  for (int l = p.first_pooled; l < p.nlev; ++l) {
    const int64_t* st = p.st[l];
    const int64_t* prev = p.st[l > p.first_pooled ? l - 1 : l];
    Level2& lv = tl.lv[l];
    lv.sz = static_cast<int>(st[0]);
    lv.sy = static_cast<int>(st[1]);
    lv.sx = static_cast<int>(st[2]);
    lv.nz = static_cast<int>(TD / st[0]);
    lv.ny = static_cast<int>(TH / st[1]);
    lv.nx = static_cast<int>(TW / st[2]);
    lv.n = lv.nz * lv.ny * lv.nx;
    lv.fz = static_cast<int>(st[0] / prev[0]);
    lv.fy = static_cast<int>(st[1] / prev[1]);
    lv.fx = static_cast<int>(st[2] / prev[2]);
    lv.Slz = static_cast<int>(p.Sl[l][0]);
    lv.Sly = static_cast<int>(p.Sl[l][1]);
    lv.Slx = static_cast<int>(p.Sl[l][2]);
    lv.off = static_cast<int>(total);
    lv.div_nx = FastDivmod(lv.nx);
    lv.div_ny = FastDivmod(lv.ny);
    lv.div_pz = FastDivmod(st[0] / s1[0]);
    lv.div_py = FastDivmod(st[1] / s1[1]);
    lv.div_sx = FastDivmod(st[2]);
    total += static_cast<size_t>(lv.n) * static_cast<size_t>(p.t + 1);
  }
  if (total * elem > 48 * 1024) return false;
  const int64_t ntz = ceil_div(p.S[0], TD), nty = ceil_div(p.S[1], TH), ntx = ceil_div(p.S[2], TW);
  if (ntz * nty * ntx > kInt32Max) return false;
  tl.TD = static_cast<int>(TD);
  tl.TH = static_cast<int>(TH);
  tl.TW = static_cast<int>(TW);
  tl.R = static_cast<int>(R);
  tl.s1z = static_cast<int>(s1[0]);
  tl.s1y = static_cast<int>(s1[1]);
  tl.s1x = static_cast<int>(s1[2]);
  tl.ntz = static_cast<int>(ntz);
  tl.nty = static_cast<int>(nty);
  tl.ntx = static_cast<int>(ntx);
  tl.div_TW = FastDivmod(TW);
  tl.div_s1y = FastDivmod(s1[1]);
  tl.div_s1x = FastDivmod(s1[2]);
  tl.div_ntx = FastDivmod(ntx);
  tl.div_nty = FastDivmod(nty);
  *out = tl;
  *smem = total * elem;
  return true;
}

dim3 tile2_grid(const Plan& p, const Tile2& tl) {
  return dim3(static_cast<unsigned>(static_cast<int64_t>(tl.ntz) * tl.nty * tl.ntx), static_cast<unsigned>(p.B));
}

unsigned threads_for(int64_t n1) {
  return static_cast<unsigned>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(n1, 32) * 32)));
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
  return dim3(static_cast<unsigned>(ceil_div(p.voxels(), 256)), static_cast<unsigned>(p.B));
}

// Thread rows per block of the coalesced tiled kernels (sets tl->R; returns blockDim.x). The
// most rows whose blocks all fit in one wave, else 2: a block's level steps (barriers, per-cell
// loads) stall all its warps, so smaller blocks keep more warps streaming voxels, as long as
// there are enough of them. H200, 2x2x160^3 with 4 levels (4000 tiles, more than one wave at
// any rows), forward + backward kernels by rows 8 / 4 / 2 / 1: 443 / 380 / 359 / 394 us; at
// 80^3 (600 tiles) 81 / 64 / 90 / 150 us, where 4 rows is the most that fit one wave.
// COLABX_CONTEXT_LABELS_ROWS=R overrides the choice (clamped to 1..most), for
// benchmarks/sweep_context_rows.py.
template <typename Kernel>
unsigned tile2_threads(Kernel kernel, const Plan& p, Tile2* tl, size_t smem, int device) {
  const int most = tl->R;
  int rows = std::min(2, most);
  if (const char* env = std::getenv("COLABX_CONTEXT_LABELS_ROWS")) {
    rows = std::clamp(std::atoi(env), 1, most);
  } else {
    const int64_t blocks = p.B * int64_t(tl->ntz) * tl->nty * tl->ntx;
    for (int r = most; r > 2; r = r / 2) {
      if (blocks <= cuda::resident_blocks(reinterpret_cast<const void*>(kernel), tl->TW * r, smem,
                                          device, "context_labels")) {
        rows = r;
        break;
      }
    }
  }
  tl->R = rows;
  return static_cast<unsigned>(tl->TW * rows);
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("context_labels: cudaFuncSetAttribute failed: ") +
                               cudaGetErrorString(err));
  }
}

// The device's opt-in shared memory per block (bytes), which make_tile may use.
int shared_optin(int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return optin;
}

}  // namespace

void context_labels_forward_cuda(const Plan& p, uintptr_t o, int o_dtype, uintptr_t y, int y_dtype,
                                 uintptr_t d, const std::vector<uintptr_t>& outs,
                                 const std::vector<uintptr_t>& masks, double margin, double tau,
                                 int device, uintptr_t stream) {
  cudaStream_t st = static_cast<cudaStream_t>(cuda::prepare(device, stream, "context_labels"));
  if (p.B == 0 || p.voxels() == 0) return;
  dispatch_floating(o_dtype, "context_labels gen_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_labels(y_dtype, "context_labels labels", [&](auto ltag) {
      using L = typename decltype(ltag)::type;
      dispatch_tmax(p.t, [&](auto tm) {
        constexpr int TMAX = decltype(tm)::value;
        LevelPtrs<A> op{}, mp{};
        for (int l = 0; l < p.nlev; ++l) {
          op.p[l] = reinterpret_cast<A*>(outs[l]);
          mp.p[l] = masks.empty() ? nullptr : reinterpret_cast<A*>(masks[l]);
        }
        if (!p.has_pooled()) {
          fwd_flat<T, L, TMAX><<<flat_grid(p), 256, 0, st>>>(
              p, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y), reinterpret_cast<const A*>(d),
              op.p[0], mp.p[0], static_cast<A>(margin), static_cast<A>(tau));
          cuda::check_launch("context_labels forward (flat)");
          return;
        }
        size_t smem = 0;
        Tile2 tl2;
        if (make_tile2(p, sizeof(A), &tl2, &smem)) {
          constexpr auto kernel2 = fwd_tiled2<T, L, TMAX>;
          const unsigned threads2 = tile2_threads(kernel2, p, &tl2, smem, device);
          kernel2<<<tile2_grid(p, tl2), threads2, smem, st>>>(
              p, tl2, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y), reinterpret_cast<const A*>(d),
              op, mp, static_cast<A>(margin), static_cast<A>(tau));
          cuda::check_launch("context_labels forward (tiled, coalesced)");
          return;
        }
        const Tile tl = make_tile(p, shared_optin(device), sizeof(A), &smem);
        auto kernel = fwd_tiled<T, L, TMAX>;
        set_smem(kernel, smem);
        const int64_t blocks = p.B * tl.ntz * tl.nty * tl.ntx;
        kernel<<<static_cast<unsigned>(blocks), threads_for(tl.n1), smem, st>>>(
            p, tl, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y), reinterpret_cast<const A*>(d),
            op, mp, static_cast<A>(margin), static_cast<A>(tau));
        cuda::check_launch("context_labels forward (tiled)");
      });
    });
  });
}

void context_labels_backward_cuda(const Plan& p, const std::vector<uintptr_t>& grads, uintptr_t o,
                                  int o_dtype, uintptr_t y, int y_dtype, uintptr_t d, uintptr_t grad_o,
                                  double margin, double tau, int device, uintptr_t stream) {
  cudaStream_t st = static_cast<cudaStream_t>(cuda::prepare(device, stream, "context_labels"));
  if (p.B == 0 || p.voxels() == 0) return;
  dispatch_floating(o_dtype, "context_labels gen_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_labels(y_dtype, "context_labels labels", [&](auto ltag) {
      using L = typename decltype(ltag)::type;
      dispatch_tmax(p.t, [&](auto tm) {
        constexpr int TMAX = decltype(tm)::value;
        LevelPtrs<const A> gp{};
        for (int l = 0; l < p.nlev; ++l) gp.p[l] = reinterpret_cast<const A*>(grads[l]);
        if (!p.has_pooled()) {
          bwd_flat<T, L, TMAX><<<flat_grid(p), 256, 0, st>>>(
              p, gp.p[0], reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y),
              reinterpret_cast<const A*>(d), reinterpret_cast<T*>(grad_o), static_cast<A>(margin),
              static_cast<A>(tau));
          cuda::check_launch("context_labels backward (flat)");
          return;
        }
        size_t smem = 0;
        Tile2 tl2;
        if (make_tile2(p, sizeof(A), &tl2, &smem)) {
          constexpr auto kernel2 = bwd_tiled2<T, L, TMAX>;
          const unsigned threads2 = tile2_threads(kernel2, p, &tl2, smem, device);
          kernel2<<<tile2_grid(p, tl2), threads2, smem, st>>>(
              p, tl2, gp, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y),
              reinterpret_cast<const A*>(d), reinterpret_cast<T*>(grad_o), static_cast<A>(margin),
              static_cast<A>(tau));
          cuda::check_launch("context_labels backward (tiled, coalesced)");
          return;
        }
        const Tile tl = make_tile(p, shared_optin(device), sizeof(A), &smem);
        auto kernel = bwd_tiled<T, L, TMAX>;
        set_smem(kernel, smem);
        const int64_t blocks = p.B * tl.ntz * tl.nty * tl.ntx;
        kernel<<<static_cast<unsigned>(blocks), threads_for(tl.n1), smem, st>>>(
            p, tl, gp, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y),
            reinterpret_cast<const A*>(d), reinterpret_cast<T*>(grad_o), static_cast<A>(margin),
            static_cast<A>(tau));
        cuda::check_launch("context_labels backward (tiled)");
      });
    });
  });
}

}  // namespace colabx
