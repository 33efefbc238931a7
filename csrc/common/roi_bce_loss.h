// Per-voxel math of the ROI one-vs-all BCE, CoLab's meta loss L_ROI (docs/design.md, "Op 3"),
// shared by the CPU and the CUDA kernels. The softmax and the accumulation-type exp/log are the
// fused CE + Dice loss's (common/dice_ce_loss.h).
//
// Layout: logits [B, K, V] (V = voxels per item), hard labels [B, V]; roi_channels name the ROI
// channels. L = -(1/(B V)) Σ_v Σ_{j in roi} [y_j log(p_j + 1e-6) + (1 - y_j) log(1 - p_j + 1e-6)].
#pragma once

#include <cstdint>
#include <vector>

#include "common/dice_ce_loss.h"

namespace colabx::dce {

constexpr float kBceEps = 1e-6f;

template <typename A>
COLABX_HD A bce_eps() {
  return static_cast<A>(kBceEps);
}
template <>
COLABX_HD double bce_eps<double>() {
  return 1e-6;
}

// y log(p + 1e-6) + (1 − y) log(1 − p + 1e-6) for y in {0, 1}: one log of the selected argument.
template <typename A>
COLABX_HD A bce_arg(bool y, A p) {
  const A a1 = p + bce_eps<A>();
  const A a0 = (A(1) - p) + bce_eps<A>();
  return y ? a1 : a0;
}
template <typename A>
COLABX_HD A bce_term(bool y, A p) {
  return acc_log(bce_arg(y, p));
}

// ∂L/∂p of one ROI channel, L = -(1/(BV)) Σ bce_term, c = g / (B V):
// -c / (p + 1e-6) if y else c / (1 - p + 1e-6).
template <typename A>
COLABX_HD A bce_grad_p(bool y, A p, A c) {
  const A neg = -c;
  return (y ? neg : c) / bce_arg(y, p);
}

}  // namespace colabx::dce

// ---- host entry points (raw addresses) -------------------------------------------------------
namespace colabx {

// Writes the 0-dim loss (compute dtype: float32, or float64 for float64 logits).
void roi_bce_loss_forward_cpu(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                              int64_t B, int64_t K, int64_t V,
                              const std::vector<int64_t>& roi_channels, uintptr_t loss,
                              int num_threads);

// Reads grad_out (0-dim, compute dtype); writes grad_logits [B, K, V] (logits dtype).
void roi_bce_loss_backward_cpu(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                               int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                               int num_threads);

}  // namespace colabx
