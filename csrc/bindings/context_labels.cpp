// Placeholder until the context_labels kernels land.
#include "bindings/registry.h"

namespace colabx {
void register_context_labels(pybind11::module_& m) {}
}  // namespace colabx
