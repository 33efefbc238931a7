// CUDA entry points of the ROI one-vs-all BCE (compiled with nvcc only; the kernels share the
// fused loss's softmax and block layout in cuda/dice_ce_loss.cu), and their limits and workspace
// size, which every build's bindings report to Python.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/dice_ce_loss.h"

namespace colabx {
namespace cuda {
// float64 entries of the forward's workspace: one partial per block and item.
inline int64_t roi_bce_loss_workspace_size(int64_t B, int64_t V) { return B * partial_slots(V); }

// Whether the CUDA kernels take B items of K channels (else Python runs the twin).
inline bool roi_bce_loss_supported(int64_t K, int64_t B) {
  return K >= 2 && K <= kDceMaxK && B <= kDceMaxBatch;
}
}  // namespace cuda

// workspace: float64, cuda::roi_bce_loss_workspace_size(B, V) entries.
void roi_bce_loss_forward_cuda(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                               int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t loss,
                               uintptr_t workspace, int device, uintptr_t stream);

void roi_bce_loss_backward_cuda(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                                int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                                const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                                int device, uintptr_t stream);

}  // namespace colabx
