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
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/context_labels.h"
#include "common/dispatch.h"
#include "cuda/runtime.h"

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

// Softmax of one voxel's t logits (channel stride V) into q[0..t).
template <typename T, int TMAX>
__device__ __forceinline__ void voxel_softmax(const T* __restrict__ o, int64_t V, int t, acc_t<T> (&q)[TMAX]) {
  using A = acc_t<T>;
  A mx = static_cast<A>(to_float(o[0]));
  q[0] = mx;
#pragma unroll
  for (int k = 1; k < TMAX; ++k) {
    if (k < t) {
      q[k] = static_cast<A>(to_float(o[k * V]));
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

// Writes one voxel's K labels (channel stride Vo) and its mask.
template <typename A, typename L, int TMAX>
__device__ __forceinline__ void voxel_write(const A (&q)[TMAX], A M, L y, int t, int64_t c,
                                            A* __restrict__ out, int64_t Vo, A* __restrict__ mask) {
  const bool roi = y > L(0);
  out[0] = roi ? A(0) : ctxlab::context0_label(M, q[0]);
  for (int64_t j = 1; j < c; ++j) out[j * Vo] = ctxlab::roi_label<A>(static_cast<int64_t>(y), j);
#pragma unroll
  for (int k = 1; k < TMAX; ++k)
    if (k < t) out[(c - 1 + k) * Vo] = roi ? A(0) : ctxlab::contextk_label(M, q[k]);
  if (mask) *mask = roi ? A(1) : M;
}

// ------------------------------------------------------------------------------ flat kernels

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256) fwd_flat(Plan p, const T* __restrict__ o, const L* __restrict__ y,
                                                const acc_t<T>* __restrict__ d, acc_t<T>* __restrict__ out,
                                                acc_t<T>* __restrict__ mask, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t V = p.voxels();
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= V) return;
  const int t = static_cast<int>(p.t);
  A q[TMAX];
  voxel_softmax<T, TMAX>(o + b * p.t * V + v, V, t, q);
  const A M = ctxlab::mask_of_distance(d[b * V + v], margin, tau);
  voxel_write<A, L, TMAX>(q, M, y[b * V + v], t, p.c, out + b * p.K * V + v, V,
                          mask ? mask + b * V + v : nullptr);
}

template <typename T, typename L, int TMAX>
__global__ void __launch_bounds__(256) bwd_flat(Plan p, const acc_t<T>* __restrict__ g, const T* __restrict__ o,
                                                const L* __restrict__ y, const acc_t<T>* __restrict__ d,
                                                T* __restrict__ grad_o, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t V = p.voxels();
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (v >= V) return;
  const int t = static_cast<int>(p.t);
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
__global__ void __launch_bounds__(256, 2) fwd_tiled(Plan p, Tile tl, const T* __restrict__ o, const L* __restrict__ y,
                                                 const acc_t<T>* __restrict__ d, LevelPtrs<acc_t<T>> outs,
                                                 LevelPtrs<acc_t<T>> masks, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_q = reinterpret_cast<A*>(smem_raw);  // [t][n1] cell sums of q
  A* s_m = s_q + p.t * tl.n1;               // [n1]    cell minima of M
  const TileCoords tc = tile_coords(tl);
  const int t = static_cast<int>(p.t);
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
__global__ void __launch_bounds__(256, 2) bwd_tiled(Plan p, Tile tl, LevelPtrs<const acc_t<T>> grads,
                                                 const T* __restrict__ o, const L* __restrict__ y,
                                                 const acc_t<T>* __restrict__ d, T* __restrict__ grad_o,
                                                 acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_g = reinterpret_cast<A*>(smem_raw);  // [t][n1] pooled gradient per P1 cell
  A* s_m = s_g + p.t * tl.n1;               // [n1]    cell minima of M
  const TileCoords tc = tile_coords(tl);
  const int t = static_cast<int>(p.t);
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

// ------------------------------------------------------------------------------------- host

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile for the pooled kernels, and the dynamic shared memory it needs.
Tile make_tile(const Plan& p, int device, size_t elem, size_t* smem) {
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
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
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

unsigned threads_for(int64_t n1) {
  return static_cast<unsigned>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(n1, 32) * 32)));
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

// Calls fn(std::integral_constant<int, TMAX>) for the register-array bound covering t.
template <typename Fn>
void dispatch_tmax(int64_t t, Fn&& fn) {
  if (t <= 2) return fn(std::integral_constant<int, 2>{});
  if (t <= 4) return fn(std::integral_constant<int, 4>{});
  if (t <= ctxlab::kCudaMaxT) return fn(std::integral_constant<int, ctxlab::kCudaMaxT>{});
  throw std::invalid_argument("context_labels (CUDA): t must be <= " + std::to_string(ctxlab::kCudaMaxT));
}

dim3 flat_grid(const Plan& p) {
  if (p.B > 65535) throw std::invalid_argument("context_labels (CUDA): batch larger than 65535");
  return dim3(static_cast<unsigned>(ceil_div(p.voxels(), 256)), static_cast<unsigned>(p.B));
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
        const Tile tl = make_tile(p, device, sizeof(A), &smem);
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
        const Tile tl = make_tile(p, device, sizeof(A), &smem);
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
