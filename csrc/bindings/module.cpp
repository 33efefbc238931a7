#include <pybind11/pybind11.h>

#include "bindings/registry.h"

#if defined(COLABX_WITH_CUDA)
#include "cuda/runtime.h"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "colabx kernels (CPU always; CUDA when built with nvcc). Not a public API.";
#if defined(COLABX_WITH_CUDA)
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", &colabx::cuda::device_count,
        "Devices visible to colabx's CUDA runtime (0 without a driver).");
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
  colabx::register_context_labels(m);
  colabx::register_distance_transform(m);
  colabx::register_dice_ce_loss(m);
}
