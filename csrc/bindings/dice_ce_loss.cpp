// Bindings of the fused CE + Dice loss and the ROI BCE loss (CPU always, CUDA when built).
#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "common/dice_ce_loss.h"

#if defined(COLABX_WITH_CUDA)
#include "cuda/dice_ce_loss.h"
#endif

namespace py = pybind11;

namespace colabx {
void register_dice_ce_loss(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("dice_ce_loss_forward_cpu", &dice_ce_loss_forward_cpu, nogil,
        "Fused softmax + CE + Dice forward over all levels: writes stats [L, B, 3K+1] and loss.");
  m.def("dice_ce_loss_backward_cpu", &dice_ce_loss_backward_cpu, nogil,
        "Backward: grads w.r.t. logits and soft targets from saved stats and grad_out.");
  m.def("roi_bce_loss_forward_cpu", &roi_bce_loss_forward_cpu, nogil, "ROI one-vs-all BCE forward.");
  m.def("roi_bce_loss_backward_cpu", &roi_bce_loss_backward_cpu, nogil,
        "ROI one-vs-all BCE backward (grad w.r.t. logits).");
#if defined(COLABX_WITH_CUDA)
  m.attr("dice_ce_loss_cuda_partial_voxels") = py::int_(cuda::kDcePartialVoxels);
  m.attr("dice_ce_loss_cuda_max_k") = py::int_(cuda::kDceMaxK);
  m.attr("dice_ce_loss_cuda_max_levels") = py::int_(cuda::kDceMaxLevels);
  m.def("dice_ce_loss_forward_cuda", &dice_ce_loss_forward_cuda, nogil,
        "CUDA forward: per-block partials into workspace, fixed-order final reduction on device.");
  m.def("dice_ce_loss_backward_cuda", &dice_ce_loss_backward_cuda, nogil,
        "CUDA backward: reads grad_out and stats from device memory.");
  m.def("roi_bce_loss_forward_cuda", &roi_bce_loss_forward_cuda, nogil, "CUDA ROI BCE forward.");
  m.def("roi_bce_loss_backward_cuda", &roi_bce_loss_backward_cuda, nogil,
        "CUDA ROI BCE backward.");
#endif
}
}  // namespace colabx
