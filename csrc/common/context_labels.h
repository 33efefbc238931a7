// context_labels: CoLab label aggregation + soft distance mask (docs/design.md, "Op 1").
//
// Per-voxel math shared by the CPU and CUDA kernels (COLABX_HD), and the level geometry both
// host paths use. Channel order of the K = c + t - 1 outputs: [0] = context 0, [1..c-1] = ROI
// classes, [c..c+t-2] = contexts 1..t-1.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/macros.h"

namespace colabx::ctxlab {

// Most deep-supervision levels one call may emit.
constexpr int kMaxLevels = 8;
// Most generator channels the CUDA kernels keep in registers (Python falls back above it).
constexpr int kCudaMaxT = 16;

// exp used by the kernels. Device: expf (<= 2 ulp). Host: a Cephes-style range-reduced
// polynomial (<= 2 ulp over the whole float range, exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN)
// written without branches or libm calls so voxel loops auto-vectorise.
COLABX_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float hi = 88.3762626647949f;   // exp(hi) ~ FLT_MAX
  const float lo = -87.3365447505531f;  // exp(lo) = FLT_MIN
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  float fx = xc * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest integer (|fx| < 2^22)
  float r = xc - fx * 0.693359375f;       // Cody-Waite: ln2 = 0.693359375 - 2.12194440e-4
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const float scale = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  float res = p * scale;
  res = x < lo ? 0.0f : res;
  res = x > hi ? bits_to_float(0x7f800000u) : res;
  return res;
#endif
}

COLABX_HD double exp_acc(double x) { return exp(x); }

// Soft distance mask M(d) = 1 if d < margin else exp((margin - d) / tau)  (the reference code's
// continuous form; +inf distance gives 0, NaN propagates).
template <typename A>
COLABX_HD A mask_of_distance(A d, A margin, A tau) {
  return d < margin ? A(1) : exp_acc((margin - d) / tau);
}

// Output channel of context k (0..t-1) for c classes.
COLABX_HD int64_t context_channel(int64_t k, int64_t c) { return k == 0 ? 0 : c - 1 + k; }

// Background voxel, context channel 0: M q_0 + (1 - M).
template <typename A>
COLABX_HD A context0_label(A M, A q0) {
  return M * q0 + (A(1) - M);
}

// Background voxel, context k >= 1: M q_k.
template <typename A>
COLABX_HD A contextk_label(A M, A qk) {
  return M * qk;
}

// ROI class channel j (1..c-1) at a voxel with label y (both widened to one integer type by the
// caller): one-hot, compared rather than indexed so an out-of-range label never writes out of
// bounds.
template <typename A, typename I>
COLABX_HD A roi_label(I y, I j) {
  return y == j ? A(1) : A(0);
}

// Softmax backward for one channel: q_j (g_j - sum_i q_i g_i).
template <typename A>
COLABX_HD A softmax_backward(A qj, A gj, A dot) {
  return qj * (gj - dot);
}

// Level geometry. 2D inputs are handled as D = 1 with stride 1 along D.
struct Plan {
  int64_t B = 0, t = 0, c = 0, K = 0;
  int64_t S[3] = {1, 1, 1};  // D, H, W
  int nlev = 0;
  int64_t st[kMaxLevels][3] = {};  // per-level stride per axis
  int64_t Sl[kMaxLevels][3] = {};  // per-level size = floor(S / stride)
  bool level0_full = false;        // level 0 has stride 1: written straight from the voxel pass
  int first_pooled = 0;            // index of the first pooled level (nlev when none)
  int64_t coarse[3] = {1, 1, 1};   // stride of the coarsest level (slab / tile alignment)

  COLABX_HD int64_t voxels() const { return S[0] * S[1] * S[2]; }
  COLABX_HD bool has_pooled() const { return first_pooled < nlev; }
  COLABX_HD int64_t level_voxels(int l) const { return Sl[l][0] * Sl[l][1] * Sl[l][2]; }
  COLABX_HD int64_t cell_volume(int l) const { return st[l][0] * st[l][1] * st[l][2]; }
  COLABX_HD const int64_t* p1() const { return st[first_pooled]; }
};

// Builds and validates the plan. `spatial` has 2 or 3 entries; `strides` holds nlev * 3 values
// (D, H, W per level; D stride 1 for 2D inputs). Throws std::invalid_argument on bad geometry.
inline Plan make_plan(int64_t B, int64_t t, int64_t c, const int64_t* spatial, int nsp,
                      const int64_t* strides, int nlev) {
  if (nsp != 2 && nsp != 3) throw std::invalid_argument("context_labels: spatial rank must be 2 or 3");
  if (nlev < 1 || nlev > kMaxLevels)
    throw std::invalid_argument("context_labels: levels must number 1.." + std::to_string(kMaxLevels));
  if (t < 1 || c < 2 || B < 0) throw std::invalid_argument("context_labels: bad t / num_classes / batch");
  Plan p;
  p.B = B;
  p.t = t;
  p.c = c;
  p.K = c + t - 1;
  if (nsp == 2) {
    p.S[0] = 1;
    p.S[1] = spatial[0];
    p.S[2] = spatial[1];
  } else {
    for (int a = 0; a < 3; ++a) p.S[a] = spatial[a];
  }
  p.nlev = nlev;
  for (int l = 0; l < nlev; ++l) {
    for (int a = 0; a < 3; ++a) {
      const int64_t s = strides[3 * l + a];
      if (s < 1) throw std::invalid_argument("context_labels: strides must be >= 1");
      if (l > 0 && s % p.st[l - 1][a] != 0)
        throw std::invalid_argument("context_labels: each level's stride must divide the next");
      p.st[l][a] = s;
      p.Sl[l][a] = p.S[a] / s;
    }
  }
  p.level0_full = p.st[0][0] == 1 && p.st[0][1] == 1 && p.st[0][2] == 1;
  p.first_pooled = p.level0_full ? 1 : 0;
  for (int a = 0; a < 3; ++a) p.coarse[a] = p.st[nlev - 1][a];
  return p;
}

}  // namespace colabx::ctxlab

namespace colabx {

// Host entry points (raw addresses; Python allocates every tensor). outs/masks/grads hold one
// address per level (masks empty when not requested; a grads entry 0 means "no gradient").
// d is in the accumulation type of gen_logits (float, or double for double logits).
void context_labels_forward_cpu(const ctxlab::Plan& p, uintptr_t o, int o_dtype, uintptr_t y,
                                int y_dtype, uintptr_t d, const std::vector<uintptr_t>& outs,
                                const std::vector<uintptr_t>& masks, double margin, double tau,
                                int num_threads);
void context_labels_backward_cpu(const ctxlab::Plan& p, const std::vector<uintptr_t>& grads,
                                 uintptr_t o, int o_dtype, uintptr_t y, int y_dtype, uintptr_t d,
                                 uintptr_t grad_o, double margin, double tau, int num_threads);
#if defined(COLABX_WITH_CUDA)
void context_labels_forward_cuda(const ctxlab::Plan& p, uintptr_t o, int o_dtype, uintptr_t y,
                                 int y_dtype, uintptr_t d, const std::vector<uintptr_t>& outs,
                                 const std::vector<uintptr_t>& masks, double margin, double tau,
                                 int device, uintptr_t stream);
void context_labels_backward_cuda(const ctxlab::Plan& p, const std::vector<uintptr_t>& grads,
                                  uintptr_t o, int o_dtype, uintptr_t y, int y_dtype, uintptr_t d,
                                  uintptr_t grad_o, double margin, double tau, int device,
                                  uintptr_t stream);
#endif

}  // namespace colabx
