// csrc/cuda/dice_ce_loss.cu on host threads (cuda_emulation.h), with its real host entry points:
// tests/test_cuda_emulation.py rewrites the file's launches into dice_ce_loss.emu.cu (in the
// build directory) and calls the C entry points below through ctypes.
#include "cuda_emulation.h"

#undef __shared__
#define __shared__ static  // the kernels' fixed-size shared arrays (blocks run in turn)

#include "dice_ce_loss.emu.cu"

using cuda_emu::vec;

// The kernels' limits, as the CUDA build's bindings report them to Python
// (csrc/bindings/dice_ce_loss.cpp): partial voxels, max K, max levels.
extern "C" void emu_dice_ce_loss_limits(int64_t* out) {
  out[0] = colabx::cuda::kDcePartialVoxels;
  out[1] = colabx::cuda::kDceMaxK;
  out[2] = colabx::cuda::kDceMaxLevels;
}

extern "C" int emu_dice_ce_loss_forward(int L, const uintptr_t* logits, const uintptr_t* targets,
                                        int logits_code, const int* target_codes, int64_t B,
                                        int64_t K, const int64_t* V, const int64_t* dice, int nd,
                                        const double* weights, double smooth, uintptr_t stats,
                                        uintptr_t loss, uintptr_t work, char* err, int errlen) {
  return cuda_emu::guarded(err, errlen, [&] {
    colabx::dice_ce_loss_forward_cuda(vec(logits, L), vec(targets, L), logits_code,
                                      vec(target_codes, L), B, K, vec(V, L), vec(dice, nd),
                                      vec(weights, L), smooth, stats, loss, work, 0, 0);
  });
}

extern "C" int emu_dice_ce_loss_backward(int L, uintptr_t grad_out, const uintptr_t* logits,
                                         const uintptr_t* targets, int logits_code,
                                         const int* target_codes, int64_t B, int64_t K,
                                         const int64_t* V, const int64_t* dice, int nd,
                                         const double* weights, double smooth, uintptr_t stats,
                                         const uintptr_t* grad_logits,
                                         const uintptr_t* grad_targets, char* err, int errlen) {
  return cuda_emu::guarded(err, errlen, [&] {
    colabx::dice_ce_loss_backward_cuda(grad_out, vec(logits, L), vec(targets, L), logits_code,
                                       vec(target_codes, L), B, K, vec(V, L), vec(dice, nd),
                                       vec(weights, L), smooth, stats, vec(grad_logits, L),
                                       vec(grad_targets, L), 0, 0);
  });
}
