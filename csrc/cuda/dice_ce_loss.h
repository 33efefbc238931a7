// CUDA entry points of the fused CE + Dice loss and the ROI BCE loss (compiled with nvcc only).
#pragma once

#include <cstdint>
#include <vector>

namespace colabx {
namespace cuda {
// The forward kernels launch at most one block (one partial sum) per tile of an item, and no
// tile is smaller than kDcePartialVoxels voxels; Python sizes the workspace with it.
constexpr int kDcePartialVoxels = 256;
// Largest K the CUDA kernels take (all channels of a voxel live in registers); Python runs the
// reference twin above it.
constexpr int kDceMaxK = 16;
// Most deep-supervision levels one CUDA call takes.
constexpr int kDceMaxLevels = 16;
}  // namespace cuda

// workspace: float64, sum_l B*ceil(V_l/kDcePartialVoxels)*(3K+1) + L*B*(3K+1) entries.
void dice_ce_loss_forward_cuda(const std::vector<uintptr_t>& logits,
                               const std::vector<uintptr_t>& targets, int logits_code,
                               const std::vector<int>& target_codes, int64_t B, int64_t K,
                               const std::vector<int64_t>& V,
                               const std::vector<int64_t>& dice_channels,
                               const std::vector<double>& weights, double smooth, uintptr_t stats,
                               uintptr_t loss, uintptr_t workspace, int device, uintptr_t stream);

void dice_ce_loss_backward_cuda(uintptr_t grad_out, const std::vector<uintptr_t>& logits,
                                const std::vector<uintptr_t>& targets, int logits_code,
                                const std::vector<int>& target_codes, int64_t B, int64_t K,
                                const std::vector<int64_t>& V,
                                const std::vector<int64_t>& dice_channels,
                                const std::vector<double>& weights, double smooth, uintptr_t stats,
                                const std::vector<uintptr_t>& grad_logits,
                                const std::vector<uintptr_t>& grad_targets, int device,
                                uintptr_t stream);

// workspace: float64, B*ceil(V/kDcePartialVoxels) entries.
void roi_bce_loss_forward_cuda(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                               int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t loss,
                               uintptr_t workspace, int device, uintptr_t stream);

void roi_bce_loss_backward_cuda(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                                int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                                const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                                int device, uintptr_t stream);

}  // namespace colabx
