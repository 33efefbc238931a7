// CPU exact Euclidean distance transform. Passes (3D [D, H, W]; 2D is D = 1 without the D pass):
//   1. rows (contiguous W): two scans per row -> squared distance to the nearest feature on it;
//   2. H lines, 3. D lines: lower envelope of parabolas (common/distance_transform.h).
// The strided passes are cache-blocked: a tile of kTile W-adjacent lines is gathered into a
// contiguous [n][kTile] buffer (one cache line per position), transformed line by line from
// there into a second tile, and scattered back (square root on the last pass). In 3D the row and
// H passes of one (item, slice) run back to back so the slice stays in L2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/distance_transform.h"
#include "cpu/parallel.h"

namespace colabx {
namespace {

constexpr int64_t kTile = 16;  // W-adjacent lines per tile: 64 bytes of float per position
constexpr int64_t kMinVoxelsPerThread = 1 << 15;  // below this a thread is not worth spawning

int64_t grain(int64_t voxels_per_item) {
  return std::max<int64_t>(1, kMinVoxelsPerThread / std::max<int64_t>(1, voxels_per_item));
}

// Pass 1 over `rows` contiguous rows of length w starting at mask / out.
void rows_pass(const uint8_t* mask, float* out, int64_t rows, int64_t w, float sw, bool invert,
               std::vector<int32_t>& gap) {
  gap.resize(size_t(w));
  const int64_t far = int64_t(1) << 40;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* m = mask + r * w;
    float* o = out + r * w;
    int64_t last = -far;  // position of the nearest feature so far on the left
    for (int64_t x = 0; x < w; ++x) {
      last = edt::is_feature(m[x], invert) ? x : last;
      gap[size_t(x)] = int32_t(std::min<int64_t>(x - last, INT32_MAX));
    }
    int64_t next = far + w;
    for (int64_t x = w - 1; x >= 0; --x) {
      next = edt::is_feature(m[x], invert) ? x : next;
      o[x] = edt::row_sq_dist(gap[size_t(x)], next - x, std::min<int64_t>(far, INT32_MAX), sw);
    }
  }
}

struct TileScratch {
  std::vector<float> in, out;
  std::vector<int32_t> v;
  void reserve(int64_t n) {
    in.resize(size_t(n * kTile));
    out.resize(size_t(n * kTile));
    v.resize(size_t(n));
  }
};

// Envelope pass over the lines of one "plane": positions q = 0..n-1 at base + q * stride, lines
// at base + c for c in [c0, c1) (c contiguous). Processes the lines in tiles of kTile.
void tile_pass(float* base, int64_t n, int64_t stride, int64_t c0, int64_t c1, float w2,
               bool take_sqrt, TileScratch& s) {
  for (int64_t t0 = c0; t0 < c1; t0 += kTile) {
    const int64_t tw = std::min(kTile, c1 - t0);
    float* tin = s.in.data();
    float* tout = s.out.data();
    for (int64_t q = 0; q < n; ++q) {
      const float* src = base + q * stride + t0;
      float* dst = tin + q * kTile;
      for (int64_t t = 0; t < tw; ++t) dst[t] = src[t];
    }
    for (int64_t t = 0; t < tw; ++t)
      edt::envelope_1d<false>(tin + t, kTile, tout + t, kTile, s.v.data(), 1, int(n), w2);
    for (int64_t q = 0; q < n; ++q) {
      const float* src = tout + q * kTile;
      float* dst = base + q * stride + t0;
      if (take_sqrt) {
        for (int64_t t = 0; t < tw; ++t) dst[t] = std::sqrt(src[t]);
      } else {
        for (int64_t t = 0; t < tw; ++t) dst[t] = src[t];
      }
    }
  }
}

// Unsigned transform of `batch` items into out (features: nonzero voxels, or zero ones when
// invert). dims = {D, H, W} with D = 1 for 2D; sp = spacing for {D, H, W}.
void transform(const uint8_t* mask, float* out, int64_t batch, int64_t D, int64_t H, int64_t W,
               const float sp[3], bool three_d, bool invert, int num_threads) {
  const float sw = sp[2], wh = sp[1] * sp[1], wd = sp[0] * sp[0];
  const int64_t HW = H * W;
  const int64_t w_tiles = (W + kTile - 1) / kTile;
  const int64_t slices = batch * D;
  if (slices >= 2 * int64_t(num_threads) || slices >= 64) {
    // Fused rows + H pass per (item, slice).
    parallel_for(slices, num_threads, grain(HW), [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> gap;
      TileScratch s;
      s.reserve(H);
      for (int64_t sl = b0; sl < b1; ++sl) {
        rows_pass(mask + sl * HW, out + sl * HW, H, W, sw, invert, gap);
        tile_pass(out + sl * HW, H, W, 0, W, wh, !three_d, s);
      }
    });
  } else {
    parallel_for(slices * H, num_threads, grain(W), [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> gap;
      rows_pass(mask + r0 * W, out + r0 * W, r1 - r0, W, sw, invert, gap);
    });
    parallel_for(slices * w_tiles, num_threads, grain(H * kTile), [&](int64_t i0, int64_t i1) {
      TileScratch s;
      s.reserve(H);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t sl = i / w_tiles, c0 = (i % w_tiles) * kTile;
        tile_pass(out + sl * HW, H, W, c0, std::min(W, c0 + kTile), wh, !three_d, s);
      }
    });
  }
  if (!three_d) return;
  // D pass: lines at (item, h, w), stride H*W; tiles of kTile w-adjacent lines.
  const int64_t items = batch * H * w_tiles;
  parallel_for(items, num_threads, grain(D * kTile), [&](int64_t i0, int64_t i1) {
    TileScratch s;
    s.reserve(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * w_tiles);
      const int64_t rem = i % (H * w_tiles);
      const int64_t h = rem / w_tiles, c0 = (rem % w_tiles) * kTile;
      tile_pass(out + b * D * HW + h * W, D, HW, c0, std::min(W, c0 + kTile), wd, true, s);
    }
  });
}

}  // namespace

void distance_transform_forward_cpu(uintptr_t mask_addr, uintptr_t out_addr, uintptr_t scratch_addr,
                                    int64_t batch, const std::vector<int64_t>& spatial,
                                    const std::vector<double>& spacing, bool signed_,
                                    int num_threads) {
  const edt::Geometry g = edt::make_geometry(batch, spatial, spacing, signed_, scratch_addr);
  if (g.empty()) return;
  if (g.D > INT32_MAX || g.H > INT32_MAX || g.W > INT32_MAX)
    throw std::invalid_argument("distance_transform: axis longer than 2^31 - 1");
  const int64_t D = g.D, H = g.H, W = g.W;
  num_threads = std::max(1, num_threads);

  const auto* mask = reinterpret_cast<const uint8_t*>(mask_addr);
  auto* out = reinterpret_cast<float*>(out_addr);
  transform(mask, out, batch, D, H, W, g.sp, g.three_d, false, num_threads);
  if (!signed_) return;
  auto* din = reinterpret_cast<float*>(scratch_addr);
  transform(mask, din, batch, D, H, W, g.sp, g.three_d, true, num_threads);
  const int64_t total = batch * D * H * W;
  parallel_for(total, num_threads, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = edt::signed_combine(mask[i], out[i], din[i]);
  });
}

}  // namespace colabx
