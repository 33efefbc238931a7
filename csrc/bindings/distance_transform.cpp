// Bindings of the distance_transform kernels: raw addresses, sizes and scalars only.
#include <pybind11/stl.h>

#include "bindings/registry.h"
#include "common/distance_transform.h"
#include "cuda/distance_transform.h"

namespace py = pybind11;

namespace colabx {
void register_distance_transform(py::module_& m) {
  m.def("distance_transform_forward_cpu", &distance_transform_forward_cpu, py::arg("mask"),
        py::arg("out"), py::arg("scratch"), py::arg("batch"), py::arg("spatial"),
        py::arg("spacing"), py::arg("signed_"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Exact EDT of a contiguous uint8 mask [batch, *spatial] into float32 out (signed: needs "
        "a float32 scratch of the same size).");
  m.def("distance_transform_cuda_supported", &cuda::edt_cuda_supported, py::arg("spatial"),
        "Whether the CUDA EDT takes a mask of these spatial sizes (in every build).");
#if defined(COLABX_WITH_CUDA)
  m.def("distance_transform_forward_cuda", &cuda::distance_transform_forward_cuda,
        py::arg("mask"), py::arg("out"), py::arg("scratch"), py::arg("workspace"),
        py::arg("batch"), py::arg("spatial"), py::arg("spacing"), py::arg("signed_"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "CUDA exact EDT; workspace (8 bytes per voxel) is needed only when a strided axis is "
        "longer than distance_transform_cuda_smem_max_n(device).");
  m.def("distance_transform_cuda_smem_max_n", &cuda::edt_smem_max_n, py::arg("device"),
        "The longest strided axis the CUDA EDT runs without a workspace on `device`.");
#endif
}
}  // namespace colabx
