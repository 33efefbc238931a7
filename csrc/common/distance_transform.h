// Exact Euclidean distance transform: the per-line math shared by the CPU and CUDA kernels.
//
// The transform is separable (Felzenszwalb & Huttenlocher 2012; Meijster et al. 2000). With
// g_0 = 0 on feature voxels and +inf elsewhere, pass k (k = 0..ndim-1, last axis first) computes
//   g_{k+1}(x) = min_i g_k(x with x_k := i) + (s_k (x_k - i))^2,
// i.e. along every line of axis k, the lower envelope of parabolas of curvature w2 = s_k^2 rooted at
// (i, g_k(i)). The first pass (along the contiguous axis) reduces to the distance to the nearest
// feature on the row, found by two scans. Squared distances are kept in float; the last pass
// takes the square root.
//
// The envelope is built without the usual boundary array z: intersections are compared by cross
// multiplication (no division), and the output scan advances while the next parabola is at least
// as low as the current one (parabolas of equal curvature cross once, so that test is exactly
// "x past the next boundary"). Scratch per line: n vertex indices only.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "common/macros.h"

namespace colabx {
namespace edt {

#if defined(__CUDA_ARCH__)
#define COLABX_EDT_INF __int_as_float(0x7f800000)
#else
#define COLABX_EDT_INF (__builtin_inff())
#endif

// A voxel is a feature (distance 0) when it is nonzero; with `invert`, when it is zero (used for
// the inside distances of the signed transform).
COLABX_HD bool is_feature(uint8_t m, bool invert) { return (m != 0) != invert; }

// Row pass result: distance (in voxels) to the nearest feature on the row, left or right, turned
// into a squared physical distance. `far` marks "no feature on that side".
COLABX_HD float row_sq_dist(int64_t left_gap, int64_t right_gap, int64_t far, float sw) {
  const int64_t d = left_gap < right_gap ? left_gap : right_gap;
  if (d >= far) return COLABX_EDT_INF;
  const float x = sw * float(d);
  return x * x;
}

// Lower envelope of the parabolas y = f[i] + w2 (x - i)^2 over the i in [0, n) with finite f[i],
// sampled at x = 0..n-1: out[x] = min_i f[i] + w2 (x - i)^2 (+inf when every f[i] is +inf; the
// square root of that when kSqrt). Element i of f is f[i * fs], of out out[x * os]; v is scratch
// for n vertex indices (v[j * vs]). f and out must not alias.
template <bool kSqrt, typename V>
COLABX_HD void envelope_1d(const float* f, int64_t fs, float* out, int64_t os, V* v, int64_t vs,
                           int n, float w2) {
  // Scan 1: the stack v[0..k] holds the vertices of the envelope so far, left to right. The top
  // two live in registers (it = top, ip = below top).
  int k = -1;
  int it = 0, ip = 0;
  float ft = 0.f, fp = 0.f;
  for (int q = 0; q < n; ++q) {
    const float fq = f[q * fs];
    if (!(fq < COLABX_EDT_INF)) continue;  // +inf: no parabola rooted here
    // Pop the top while the new parabola overtakes it no later than the top overtakes the one
    // below: s(top, q) <= s(prev, top), compared by cross multiplication (both gaps > 0).
    while (k >= 1) {
      const float a = (fq - ft) + w2 * (float(q - it) * float(q + it));
      const float b = (ft - fp) + w2 * (float(it - ip) * float(it + ip));
      if (a * float(it - ip) <= b * float(q - it)) {
        --k;
        it = ip;
        ft = fp;
        if (k >= 1) {
          ip = int(v[(k - 1) * vs]);
          fp = f[int64_t(ip) * fs];
        }
      } else {
        break;
      }
    }
    ++k;
    v[k * vs] = V(q);
    ip = it;
    fp = ft;
    it = q;
    ft = fq;
  }
  if (k < 0) {
    for (int x = 0; x < n; ++x) out[x * os] = COLABX_EDT_INF;
    return;
  }
  // Scan 2: walk x left to right; advance to the next envelope vertex while it is at least as low.
  const int top = k;
  int j = 0;
  int ij = int(v[0]);
  float fj = f[int64_t(ij) * fs];
  int in = top >= 1 ? int(v[vs]) : 0;
  float fn = top >= 1 ? f[int64_t(in) * fs] : 0.f;
  for (int x = 0; x < n; ++x) {
    float dj = float(x - ij);
    float val = fj + w2 * dj * dj;
    while (j < top) {
      const float dn = float(x - in);
      const float vn = fn + w2 * dn * dn;
      if (!(vn <= val)) break;
      ++j;
      ij = in;
      fj = fn;
      val = vn;
      if (j < top) {
        in = int(v[(j + 1) * vs]);
        fn = f[int64_t(in) * fs];
      }
    }
#if defined(__CUDA_ARCH__)
    out[x * os] = kSqrt ? sqrtf(val) : val;
#else
    out[x * os] = kSqrt ? std::sqrt(val) : val;
#endif
  }
}

// Signed transform (CoLab / boundary-loss `one_hot2dist`): outside the mask the distance to the
// mask, inside -(distance to the background - 1); 0 everywhere for an item without boundary
// (empty or full mask). `dout` is the distance to the nearest mask voxel (+inf only when the
// item is empty), `din` the distance to the nearest background voxel (+inf only when full).
COLABX_HD float signed_combine(uint8_t m, float dout, float din) {
  if (m != 0) return din < COLABX_EDT_INF ? 1.0f - din : 0.0f;
  return dout < COLABX_EDT_INF ? dout : 0.0f;
}

// Host side: the validated geometry of one call, shared by the CPU and CUDA entry points.
// 2D volumes are treated as D = 1; sp holds the (d, h, w) spacing, 1 where not given.
struct Geometry {
  bool three_d;
  int64_t batch, D, H, W;
  float sp[3];
  bool empty() const { return batch == 0 || D == 0 || H == 0 || W == 0; }
};

inline Geometry make_geometry(int64_t batch, const std::vector<int64_t>& spatial,
                              const std::vector<double>& spacing, bool signed_,
                              uintptr_t scratch_addr) {
  if (spatial.size() != 2 && spatial.size() != 3)
    throw std::invalid_argument("distance_transform: mask must have 2 or 3 spatial dimensions");
  if (spacing.size() != spatial.size())
    throw std::invalid_argument("distance_transform: spacing must have one value per spatial axis");
  if (signed_ && scratch_addr == 0)
    throw std::invalid_argument("distance_transform: the signed transform needs a scratch buffer");
  Geometry g{spatial.size() == 3, batch, spatial.size() == 3 ? spatial[0] : 1,
             spatial[spatial.size() - 2], spatial.back(), {1.f, 1.f, 1.f}};
  if (g.batch < 0 || g.D < 0 || g.H < 0 || g.W < 0)
    throw std::invalid_argument("distance_transform: negative size");
  for (size_t a = 0; a < spacing.size(); ++a) g.sp[3 - spacing.size() + a] = float(spacing[a]);
  return g;
}

}  // namespace edt

// CPU entry point (csrc/cpu/distance_transform.cpp). mask: uint8/bool [batch, *spatial]
// (nonzero = feature); out: float32, same shape; scratch: float32 of the same size, used only
// when signed_ (may be 0 otherwise). spatial has 2 or 3 sizes; spacing one value per axis.
void distance_transform_forward_cpu(uintptr_t mask, uintptr_t out, uintptr_t scratch,
                                    int64_t batch, const std::vector<int64_t>& spatial,
                                    const std::vector<double>& spacing, bool signed_,
                                    int num_threads);

}  // namespace colabx
