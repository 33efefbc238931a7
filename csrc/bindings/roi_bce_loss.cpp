// Bindings of the ROI one-vs-all BCE (CPU always, CUDA when built).
#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "common/roi_bce_loss.h"
#include "cuda/roi_bce_loss.h"

namespace py = pybind11;

namespace colabx {
void register_roi_bce_loss(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("roi_bce_loss_forward_cpu", &roi_bce_loss_forward_cpu, nogil, "ROI one-vs-all BCE forward.");
  m.def("roi_bce_loss_backward_cpu", &roi_bce_loss_backward_cpu, nogil,
        "ROI one-vs-all BCE backward (grad w.r.t. logits).");
  // The CUDA kernels' limits and workspace size, in every build (Python asks before routing).
  m.def("roi_bce_loss_cuda_supported", &cuda::roi_bce_loss_supported, py::arg("K"), py::arg("B"),
        "Whether the ROI BCE CUDA kernels take B items of K channels.");
  m.def("roi_bce_loss_cuda_workspace_size", &cuda::roi_bce_loss_workspace_size,
        "float64 entries of the ROI BCE CUDA forward's workspace for (B, voxels).");
#if defined(COLABX_WITH_CUDA)
  m.def("roi_bce_loss_forward_cuda", &roi_bce_loss_forward_cuda, nogil, "CUDA ROI BCE forward.");
  m.def("roi_bce_loss_backward_cuda", &roi_bce_loss_backward_cuda, nogil,
        "CUDA ROI BCE backward.");
#endif
}
}  // namespace colabx
