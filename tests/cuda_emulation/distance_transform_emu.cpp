// csrc/cuda/distance_transform.cu on host threads (cuda_emulation.h), with its real host entry
// point: tests/test_cuda_emulation.py rewrites the file's launches into
// distance_transform.emu.cu (in the build directory) and calls emu_distance_transform.
#include "cuda_emulation.h"

#include <vector>

namespace colabx::cuda {
namespace {
alignas(16) float smem[cuda_emu::kSharedBytes / sizeof(float)];  // the kernels' extern __shared__
}  // namespace
}  // namespace colabx::cuda

#include "distance_transform.emu.cu"

// Returns 0, or 1 with the error message in err.
extern "C" int emu_distance_transform(uintptr_t mask, uintptr_t out, uintptr_t scratch,
                                      uintptr_t workspace, int64_t batch, const int64_t* spatial,
                                      const double* spacing, int nsp, int signed_, char* err,
                                      int errlen) {
  cuda_emu::dynamic_shared = reinterpret_cast<unsigned char*>(colabx::cuda::smem);
  return cuda_emu::guarded(err, errlen, [&] {
    colabx::cuda::distance_transform_forward_cuda(
        mask, out, scratch, workspace, batch, std::vector<int64_t>(spatial, spatial + nsp),
        std::vector<double>(spacing, spacing + nsp), signed_ != 0, 0, 0);
  });
}

extern "C" int emu_edt_smem_max_n() { return colabx::cuda::edt_smem_max_n(0); }
