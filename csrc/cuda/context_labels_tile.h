// Tile geometry of the CUDA context_labels kernels over pooled levels, and which calls those
// kernels take. Host code (plain C++), so the bindings of every build can answer
// context_labels_cuda_supported for Python without a CUDA compiler.
//
// A block owns a tile of TD x TH x TW voxels aligned to the coarsest stride; its TW x R threads
// each own one voxel column x and the cell rows r, r + R, ... of the first pooled level ("P1
// cells", one P1 cell extent in z and y). Preconditions, checked by make_tile: K * V and the
// tile counts fit int32, the P1 x stride divides 32, TW (a multiple of 32 and of the coarsest x
// stride) is at most 256, and the per-level statistics fit 48 KiB of shared memory (no opt-in).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>

#include "common/context_labels.h"
#include "common/fast_divmod.h"

namespace colabx {
namespace ctxlab {

// One pooled level in tile-local terms.
struct TileLevel {
  int sz, sy, sx;           // stride: the level's cell size in voxels
  int nz, ny, nx, n;        // cells per tile per axis, and in all
  int fz, fy, fx;           // cells of the previous pooled level per cell and axis (first: 1)
  int Slz, Sly, Slx;        // the level's output size (cells past it are partial: no output)
  int off;                  // shared-memory offset (elements) of the level's statistics
  FastDivmod div_nx, div_ny;          // tile-local cell index -> (z, y, x)
  FastDivmod div_pz, div_py, div_sx;  // P1 cell row (z, y), lane x -> this level's cell (z, y, x)
};

struct Tile {
  int TD, TH, TW, R;        // tile extent in voxels; row groups of threads (blockDim.x = TW * R)
  int s1z, s1y, s1x;        // first pooled level's stride (P1 cell size)
  int ntz, nty, ntx;        // tiles per axis (per batch item)
  FastDivmod div_TW, div_s1y, div_s1x, div_ntx, div_nty;
  TileLevel lv[kMaxLevels];  // pooled levels first_pooled..nlev-1
};

// Shared memory a tile may use (bytes): the default per-block limit, no opt-in needed.
constexpr size_t kTileSharedBytes = 48 * 1024;
// Largest batch: the batch item is the grid's y index.
constexpr int64_t kCudaMaxBatch = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile of plan `p` with `elem`-byte statistics, or false when the kernels' preconditions do
// not hold. *smem: dynamic shared memory bytes. out->R is the most thread rows a block can use;
// the launch picks the number it gets.
inline bool make_tile(const Plan& p, size_t elem, Tile* out, size_t* smem) {
  constexpr int64_t kInt32Max = 2147483647;
  const int64_t* s1 = p.p1();
  if (p.B > kCudaMaxBatch || p.K * p.voxels() > kInt32Max) return false;
  if (s1[2] > 32 || 32 % s1[2] != 0) return false;  // xor-shuffle groups of s1x lanes
  const int64_t cz = p.coarse[0], cy = p.coarse[1], cx = p.coarse[2];
  const int64_t TW = std::lcm<int64_t>(32, cx);
  if (TW > 256 || cz * cy > 4096) return false;
  // Stack coarse tiles along y (2D inputs, shallow tiles) towards ~2048 voxels per block.
  int64_t my = 1;
  while (cz * cy * (my + 1) * TW <= 2048 && cy * (my + 1) <= std::max<int64_t>(cy, p.S[1])) ++my;
  const int64_t TD = cz, TH = cy * my;
  const int64_t rows = (TD / s1[0]) * (TH / s1[1]);  // P1 cell rows per tile
  const int64_t R = std::min<int64_t>(256 / TW, rows);
  size_t total = 0;
  Tile tl{};
  for (int l = p.first_pooled; l < p.nlev; ++l) {
    const int64_t* st = p.st[l];
    const int64_t* prev = p.st[l > p.first_pooled ? l - 1 : l];
    TileLevel& lv = tl.lv[l];
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
  if (total * elem > kTileSharedBytes) return false;
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

// Whether the CUDA kernels take plan `p` with `elem`-byte accumulation (4: fp32, 8: fp64):
// t <= kCudaMaxT, and a tile for pooled levels (a single full-resolution level runs the flat
// kernels, whose only limit is the batch). Python routes every other call to the twin.
inline bool cuda_supported(const Plan& p, size_t elem) {
  if (p.t > kCudaMaxT || p.B > kCudaMaxBatch) return false;
  if (!p.has_pooled()) return true;
  Tile tl;
  size_t smem = 0;
  return make_tile(p, elem, &tl, &smem);
}

}  // namespace ctxlab
}  // namespace colabx
