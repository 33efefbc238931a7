#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/registry.h"
#include "common/fast_divmod.h"

#if defined(COLABX_WITH_CUDA)
#include "cuda/runtime.h"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "colabx kernels (CPU always; CUDA when built with nvcc). Not a public API.";
#if defined(COLABX_WITH_CUDA)
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", &colabx::cuda::device_count,
        "Devices visible to colabx's CUDA runtime (0 without a driver).");
  m.attr("cuda_runtime_version") = colabx::cuda::runtime_version();
  m.def("cuda_device_count_error", &colabx::cuda::device_count_error,
        "Why colabx's CUDA runtime sees no device ('' when it sees one).");
  m.def("cuda_kernels_run_on", &colabx::cuda::kernels_run_on, pybind11::arg("device"),
        "Whether the built kernels (cuda_architectures) can run on CUDA device `device`.");
  m.attr("cuda_architectures") = COLABX_CUDA_ARCHS;
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
  m.def("cuda_device_count_error", [] { return "colabx was built without CUDA kernels"; });
  m.attr("cuda_architectures") = "";
  m.attr("cuda_runtime_version") = 0;
#endif
  // Test hook: the CUDA kernels' index division, run on the host over int32 numerators.
  m.def("_fast_divmod", [](int64_t divisor, uintptr_t n, uintptr_t q, uintptr_t r, int64_t count) {
    const colabx::FastDivmod fd(divisor);
    const auto* np = reinterpret_cast<const int32_t*>(n);
    auto* qp = reinterpret_cast<int32_t*>(q);
    auto* rp = reinterpret_cast<int32_t*>(r);
    for (int64_t i = 0; i < count; ++i) qp[i] = fd.divmod(np[i], &rp[i]);
  });
  colabx::register_context_labels(m);
  colabx::register_distance_transform(m);
  colabx::register_dice_ce_loss(m);
  colabx::register_roi_bce_loss(m);
}
