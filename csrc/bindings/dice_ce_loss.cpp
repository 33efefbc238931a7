// Placeholder until the dice_ce_loss kernels land.
#include "bindings/registry.h"

namespace colabx {
void register_dice_ce_loss(pybind11::module_& m) {}
}  // namespace colabx
