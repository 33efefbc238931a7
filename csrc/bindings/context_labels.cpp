// Bindings for context_labels: raw addresses, sizes and dtype codes in; Python owns every tensor.
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "bindings/registry.h"
#include "common/context_labels.h"
#include "cuda/context_labels_tile.h"

namespace py = pybind11;

namespace colabx {
namespace {

ctxlab::Plan plan_from(int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
                       const std::vector<int64_t>& strides) {
  if (strides.size() % 3 != 0)
    throw std::invalid_argument("context_labels: strides must hold 3 values per level");
  return ctxlab::make_plan(B, t, c, spatial.data(), static_cast<int>(spatial.size()), strides.data(),
                           static_cast<int>(strides.size() / 3));
}

void check_levels(const ctxlab::Plan& p, const std::vector<uintptr_t>& v, bool allow_empty,
                  const char* what) {
  if (allow_empty && v.empty()) return;
  if (static_cast<int>(v.size()) != p.nlev)
    throw std::invalid_argument(std::string("context_labels: ") + what + " needs one address per level");
}

}  // namespace

void register_context_labels(py::module_& m) {
  m.def(
      "context_labels_forward_cpu",
      [](int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& strides, uintptr_t o, int o_dtype, uintptr_t y, int y_dtype,
         uintptr_t d, const std::vector<uintptr_t>& outs, const std::vector<uintptr_t>& masks,
         double margin, double tau, int num_threads) {
        const auto p = plan_from(B, t, c, spatial, strides);
        check_levels(p, outs, false, "outs");
        check_levels(p, masks, true, "masks");
        context_labels_forward_cpu(p, o, o_dtype, y, y_dtype, d, outs, masks, margin, tau, num_threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "CoLab context labels forward on CPU: every level in one fused pass.");
  m.def(
      "context_labels_backward_cpu",
      [](int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& strides, const std::vector<uintptr_t>& grads, uintptr_t o,
         int o_dtype, uintptr_t y, int y_dtype, uintptr_t d, uintptr_t grad_o, double margin,
         double tau, int num_threads) {
        const auto p = plan_from(B, t, c, spatial, strides);
        check_levels(p, grads, false, "grads");
        context_labels_backward_cpu(p, grads, o, o_dtype, y, y_dtype, d, grad_o, margin, tau,
                                    num_threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "CoLab context labels backward on CPU (gradient w.r.t. the generator logits).");
  m.def(
      "context_labels_cuda_supported",
      [](int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& strides, int elem_size) {
        return ctxlab::cuda_supported(plan_from(B, t, c, spatial, strides),
                                      static_cast<size_t>(elem_size));
      },
      "Whether the CUDA kernels take this call (t, tile geometry, shared memory); elem_size is 4 "
      "for fp32 accumulation, 8 for fp64. In every build: Python asks before routing.");
#if defined(COLABX_WITH_CUDA)
  m.def(
      "context_labels_forward_cuda",
      [](int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& strides, uintptr_t o, int o_dtype, uintptr_t y, int y_dtype,
         uintptr_t d, const std::vector<uintptr_t>& outs, const std::vector<uintptr_t>& masks,
         double margin, double tau, int device, uintptr_t stream) {
        const auto p = plan_from(B, t, c, spatial, strides);
        check_levels(p, outs, false, "outs");
        check_levels(p, masks, true, "masks");
        context_labels_forward_cuda(p, o, o_dtype, y, y_dtype, d, outs, masks, margin, tau, device,
                                    stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "CoLab context labels forward on CUDA: every level in one launch.");
  m.def(
      "context_labels_backward_cuda",
      [](int64_t B, int64_t t, int64_t c, const std::vector<int64_t>& spatial,
         const std::vector<int64_t>& strides, const std::vector<uintptr_t>& grads, uintptr_t o,
         int o_dtype, uintptr_t y, int y_dtype, uintptr_t d, uintptr_t grad_o, double margin,
         double tau, int device, uintptr_t stream) {
        const auto p = plan_from(B, t, c, spatial, strides);
        check_levels(p, grads, false, "grads");
        context_labels_backward_cuda(p, grads, o, o_dtype, y, y_dtype, d, grad_o, margin, tau, device,
                                     stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "CoLab context labels backward on CUDA: every level in one launch.");
#endif
}

}  // namespace colabx
