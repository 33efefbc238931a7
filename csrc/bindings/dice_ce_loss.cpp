// Bindings of the fused CE + Dice loss (CPU always, CUDA when built).
#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "common/dice_ce_loss.h"
#include "cuda/dice_ce_loss.h"

namespace py = pybind11;

namespace colabx {
void register_dice_ce_loss(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("dice_ce_loss_forward_cpu", &dice_ce_loss_forward_cpu, nogil,
        "Fused softmax + CE + Dice forward over all levels: writes stats [L, B, 3K+1] and loss.");
  m.def("dice_ce_loss_backward_cpu", &dice_ce_loss_backward_cpu, nogil,
        "Backward: grads w.r.t. logits and soft targets from saved stats and grad_out.");
  // The CUDA kernels' limits and workspace sizes, in every build (Python asks before routing).
  m.def("dice_ce_loss_cuda_supported", &cuda::dice_ce_loss_supported, py::arg("K"),
        py::arg("levels"), py::arg("B"),
        "Whether the CUDA kernels take B items of K channels over the given number of levels.");
  m.def("dice_ce_loss_cuda_workspace_size", &cuda::dice_ce_loss_workspace_size,
        "float64 entries of the CUDA forward's workspace for (B, K, voxels per level).");
#if defined(COLABX_WITH_CUDA)
  m.def("dice_ce_loss_forward_cuda", &dice_ce_loss_forward_cuda, nogil,
        "CUDA forward: per-block partials into workspace, fixed-order final reduction on device.");
  m.def("dice_ce_loss_backward_cuda", &dice_ce_loss_backward_cuda, nogil,
        "CUDA backward: reads grad_out and stats from device memory.");
#endif
}
}  // namespace colabx
