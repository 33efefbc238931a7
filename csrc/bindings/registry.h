// Each op registers its CPU (and, when built, CUDA) entry points on the module. Entry points take
// raw addresses (uintptr_t), sizes and dtype codes; Python allocates every tensor with torch.
#pragma once

#include <pybind11/pybind11.h>

namespace colabx {
void register_context_labels(pybind11::module_& m);
void register_distance_transform(pybind11::module_& m);
void register_dice_ce_loss(pybind11::module_& m);
void register_roi_bce_loss(pybind11::module_& m);
}  // namespace colabx
