// csrc/cuda/context_labels.cu on host threads (cuda_emulation.h): tests/test_cuda_emulation.py
// rewrites the file's launches into context_labels.emu.cu (in the build directory) and calls,
// through ctypes, emu_context_labels (one named kernel: "flat", or "tiled" with `rows` thread
// rows per block, clamped to 1..most) or emu_context_labels_entry (the host entry points, which
// choose the kernel and the rows themselves).
#include "cuda_emulation.h"

#include <string>

namespace colabx {
namespace {
alignas(16) unsigned char smem_raw[cuda_emu::kSharedBytes];
}  // namespace
}  // namespace colabx

#include "context_labels.emu.cu"

namespace colabx {
namespace {

struct Call {
  int backward;
  const char* kernel;
  int rows;
  const ctxlab::Plan* p;
  uintptr_t o, y, d, grad_o;
  const uintptr_t* levels;  // outs (forward) or grads (backward), one per level
  const uintptr_t* masks;   // forward: one per level, or null
  double margin, tau;
};

// 0: ran; 2: the named kernel does not take this geometry (make_tile refused it).
template <typename T, typename L, int TMAX>
int run(const Call& c) {
  using A = acc_t<T>;
  const Plan& p = *c.p;
  const auto o = reinterpret_cast<const T*>(c.o);
  const auto y = reinterpret_cast<const L*>(c.y);
  const auto d = reinterpret_cast<const A*>(c.d);
  const A margin = static_cast<A>(c.margin), tau = static_cast<A>(c.tau);
  LevelPtrs<A> outs{}, masks{};
  LevelPtrs<const A> grads{};
  for (int l = 0; l < p.nlev; ++l) {
    outs.p[l] = reinterpret_cast<A*>(c.levels[l]);
    grads.p[l] = reinterpret_cast<const A*>(c.levels[l]);
    masks.p[l] = c.masks ? reinterpret_cast<A*>(c.masks[l]) : nullptr;
  }
  const std::string kernel = c.kernel;
  if (kernel == "flat") {
    if (c.backward)
      cuda_emu::launch(bwd_flat<T, L, TMAX>, flat_grid(p), dim3(256), 0, smem_raw, p, grads.p[0], o,
                       y, d, reinterpret_cast<T*>(c.grad_o), margin, tau);
    else
      cuda_emu::launch(fwd_flat<T, L, TMAX>, flat_grid(p), dim3(256), 0, smem_raw, p, o, y, d,
                       outs.p[0], masks.p[0], margin, tau);
    return 0;
  }
  if (kernel != "tiled") throw std::invalid_argument("unknown kernel " + kernel);
  size_t smem = 0;
  ctxlab::Tile tl;
  if (!ctxlab::make_tile(p, sizeof(A), &tl, &smem)) return 2;
  tl.R = std::clamp(c.rows, 1, tl.R);
  const dim3 threads(static_cast<unsigned>(tl.TW * tl.R));
  if (c.backward)
    cuda_emu::launch(bwd_tiled<T, L, TMAX>, tile_grid(p, tl), threads, smem, smem_raw, p, tl,
                     grads, o, y, d, reinterpret_cast<T*>(c.grad_o), margin, tau);
  else
    cuda_emu::launch(fwd_tiled<T, L, TMAX>, tile_grid(p, tl), threads, smem, smem_raw, p, tl, o,
                     y, d, outs, masks, margin, tau);
  return 0;
}

}  // namespace
}  // namespace colabx

// Returns 0 (ran), 2 (kernel not applicable) or 1 (error; message in err).
extern "C" int emu_context_labels(int backward, const char* kernel, int rows, int64_t B, int64_t t,
                                  int64_t c, const int64_t* spatial, int nsp,
                                  const int64_t* strides, int nlev, uintptr_t o, int o_dtype,
                                  uintptr_t y, int y_dtype, uintptr_t d, const uintptr_t* levels,
                                  const uintptr_t* masks, uintptr_t grad_o, double margin,
                                  double tau, char* err, int errlen) {
  using namespace colabx;
  return cuda_emu::guarded(err, errlen, [&] {
    const ctxlab::Plan p = ctxlab::make_plan(B, t, c, spatial, nsp, strides, nlev);
    const Call call{backward, kernel, rows, &p, o, y, d, grad_o, levels, masks, margin, tau};
    int rc = 0;
    dispatch_floating(o_dtype, "gen_logits", [&](auto tag) {
      using T = typename decltype(tag)::type;
      dispatch_labels(y_dtype, "labels", [&](auto ltag) {
        using L = typename decltype(ltag)::type;
        dispatch_tmax(p.t, [&](auto tm) { rc = run<T, L, decltype(tm)::value>(call); });
      });
    });
    return rc;
  });
}

// The largest t the CUDA kernels take (the bindings' context_labels_cuda_supported checks it).
extern "C" int emu_context_labels_max_t() { return colabx::ctxlab::kCudaMaxT; }

// The host entry points, as Python calls them. Returns 0, or 1 with the error message in err.
extern "C" int emu_context_labels_entry(int backward, int64_t B, int64_t t, int64_t c,
                                        const int64_t* spatial, int nsp, const int64_t* strides,
                                        int nlev, uintptr_t o, int o_dtype, uintptr_t y,
                                        int y_dtype, uintptr_t d, const uintptr_t* levels,
                                        const uintptr_t* masks, uintptr_t grad_o, double margin,
                                        double tau, char* err, int errlen) {
  using namespace colabx;
  return cuda_emu::guarded(err, errlen, [&] {
    cuda_emu::dynamic_shared = smem_raw;
    const ctxlab::Plan p = ctxlab::make_plan(B, t, c, spatial, nsp, strides, nlev);
    const std::vector<uintptr_t> lv(levels, levels + nlev);
    if (backward)
      context_labels_backward_cuda(p, lv, o, o_dtype, y, y_dtype, d, grad_o, margin, tau, 0, 0);
    else
      context_labels_forward_cuda(p, o, o_dtype, y, y_dtype, d, lv,
                                  masks ? std::vector<uintptr_t>(masks, masks + nlev)
                                        : std::vector<uintptr_t>{},
                                  margin, tau, 0, 0);
  });
}

