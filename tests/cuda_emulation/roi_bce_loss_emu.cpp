// csrc/cuda/roi_bce_loss.cu on host threads (cuda_emulation.h), with its real host entry points:
// tests/test_cuda_emulation.py rewrites the file's launches into roi_bce_loss.emu.cu (in the
// build directory) and calls the C entry points below through ctypes.
#include "cuda_emulation.h"

#undef __shared__
#define __shared__ static  // the kernels' fixed-size shared arrays (blocks run in turn)

#include "roi_bce_loss.emu.cu"

using cuda_emu::vec;

extern "C" int emu_roi_bce_loss_forward(uintptr_t logits, uintptr_t labels, int logits_code,
                                        int label_code, int64_t B, int64_t K, int64_t V,
                                        const int64_t* roi, int nr, uintptr_t loss, uintptr_t work,
                                        char* err, int errlen) {
  return cuda_emu::guarded(err, errlen, [&] {
    colabx::roi_bce_loss_forward_cuda(logits, labels, logits_code, label_code, B, K, V,
                                      vec(roi, nr), loss, work, 0, 0);
  });
}

extern "C" int emu_roi_bce_loss_backward(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                                         int logits_code, int label_code, int64_t B, int64_t K,
                                         int64_t V, const int64_t* roi, int nr,
                                         uintptr_t grad_logits, char* err, int errlen) {
  return cuda_emu::guarded(err, errlen, [&] {
    colabx::roi_bce_loss_backward_cuda(grad_out, logits, labels, logits_code, label_code, B, K, V,
                                       vec(roi, nr), grad_logits, 0, 0);
  });
}
