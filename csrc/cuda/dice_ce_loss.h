// CUDA entry points of the fused CE + Dice loss (compiled with nvcc only), and the kernels'
// limits and workspace sizes, which every build's bindings report to Python.
#pragma once

#include <cstdint>
#include <vector>

namespace colabx {
namespace cuda {
// The forward kernels launch at most one block (one partial sum) per tile of an item, and no
// tile is smaller than kDcePartialVoxels voxels; the workspace sizes below follow from it.
constexpr int kDcePartialVoxels = 256;
// Largest K the CUDA kernels take (all channels of a voxel live in registers); Python runs the
// pure-PyTorch twin above it.
constexpr int kDceMaxK = 16;
// Most deep-supervision levels one CUDA call takes.
constexpr int kDceMaxLevels = 16;
// Most items one CUDA call takes: the kernels run the batch along gridDim.y.
constexpr int64_t kDceMaxBatch = 65535;

// Forward partials per item of V voxels: one per block, and no block covers fewer voxels.
inline int64_t partial_slots(int64_t V) { return (V + kDcePartialVoxels - 1) / kDcePartialVoxels; }

// float64 entries of the CE + Dice forward's workspace: per level and item its block partials,
// then L * B final sums, each 3K+1 wide.
inline int64_t dice_ce_loss_workspace_size(int64_t B, int64_t K, const std::vector<int64_t>& V) {
  int64_t slots = 0;
  for (const int64_t v : V) slots += B * partial_slots(v);
  return (slots + static_cast<int64_t>(V.size()) * B) * (3 * K + 1);
}

// Whether the CUDA kernels take B items of K channels over `levels` levels (else Python runs
// the twin).
inline bool dice_ce_loss_supported(int64_t K, int64_t levels, int64_t B) {
  return K >= 2 && K <= kDceMaxK && levels >= 1 && levels <= kDceMaxLevels && B <= kDceMaxBatch;
}
}  // namespace cuda

// workspace: float64, cuda::dice_ce_loss_workspace_size(B, K, V) entries.
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

}  // namespace colabx
