// Placeholder until the distance_transform kernels land.
#include "bindings/registry.h"

namespace colabx {
void register_distance_transform(pybind11::module_& m) {}
}  // namespace colabx
