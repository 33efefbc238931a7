// context_labels CPU kernels: one fused pass per direction.
//
// Work is split into tasks (b, slab), a slab being coarse[0] planes x coarse[1] rows x the full
// last axis, so every cell of every level lies inside one task. Within a task each row is
// processed with contiguous, branch-free loops over the last axis (auto-vectorised; an AVX2 clone
// is built): softmax once per voxel, level 0 written directly, and the cell sums of q and cell
// minima of M of the first pooled level gathered in a task-local buffer; coarser levels are then
// built from those pooled statistics. Backward mirrors it: cell minima of M, pooled gradients
// scattered down to first-pooled-level cells, then one softmax-backward pass over the voxels.
// The voxel loops select between two computed values (ROI vs background); they vectorise
// because CMakeLists.txt compiles the CPU sources with -fno-trapping-math.

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/context_labels.h"
#include "common/dispatch.h"
#include "cpu/parallel.h"

namespace colabx {
namespace {

using ctxlab::Plan;

// Task decomposition shared by forward and backward.
struct Tasks {
  int64_t slabD, slabH;    // slab extent (planes, rows)
  int64_t nD, nH;          // slabs per axis
  int64_t count;           // B * nD * nH
};

Tasks make_tasks(const Plan& p) {
  Tasks k;
  k.slabD = p.has_pooled() ? p.coarse[0] : 1;
  k.slabH = p.has_pooled() ? p.coarse[1] : 1;
  k.nD = (p.S[0] + k.slabD - 1) / k.slabD;
  k.nH = (p.S[1] + k.slabH - 1) / k.slabH;
  k.count = p.B * k.nD * k.nH;
  return k;
}

// First-pooled-level cell grid of one slab.
struct CellGrid {
  int64_t nD, nH, nW;  // cells per axis inside the slab (nW = complete cells along W)
  int64_t sD, sH, sW;  // cell size (first pooled stride)
  int64_t size() const { return nD * nH * nW; }
};

CellGrid make_grid(const Plan& p, const Tasks& k) {
  CellGrid g{0, 0, 0, 1, 1, 1};
  if (!p.has_pooled()) return g;
  const int64_t* s = p.p1();
  g.sD = s[0];
  g.sH = s[1];
  g.sW = s[2];
  g.nD = k.slabD / s[0];
  g.nH = k.slabH / s[1];
  g.nW = p.S[2] / s[2];
  return g;
}

// Reduces with `op` the fD x fH x fW first-pooled-level cells that make up cell (i, j, rW) of a
// coarser level, from a task-local buffer laid out [g.nD][g.nH][g.nW].
template <typename A, typename Op>
inline A reduce_cells(const A* base, const CellGrid& g, int64_t i, int64_t j, int64_t rW,
                      int64_t fD, int64_t fH, int64_t fW, A init, Op op) {
  A r = init;
  for (int64_t a = 0; a < fD; ++a)
    for (int64_t bb = 0; bb < fH; ++bb) {
      const A* row = base + ((i * fD + a) * g.nH + j * fH + bb) * g.nW + rW * fW;
      for (int64_t e = 0; e < fW; ++e) r = op(r, row[e]);
    }
  return r;
}

// Row softmax: q[k * W + w] = softmax over k of o[k * V + w]. Channels are converted to the
// accumulation type first so the arithmetic loops are plain contiguous float/double loops.
template <typename T, typename A>
inline void row_softmax(const T* o, int64_t V, int64_t t, int64_t W, A* q, A* mx, A* sum) {
  for (int64_t k = 0; k < t; ++k) {
    const T* ok = o + k * V;
    A* qk = q + k * W;
    for (int64_t w = 0; w < W; ++w) qk[w] = static_cast<A>(to_float(ok[w]));
  }
  for (int64_t w = 0; w < W; ++w) mx[w] = q[w];
  for (int64_t k = 1; k < t; ++k) {
    const A* qk = q + k * W;
    for (int64_t w = 0; w < W; ++w) mx[w] = qk[w] > mx[w] ? qk[w] : mx[w];
  }
  for (int64_t w = 0; w < W; ++w) sum[w] = A(0);
  for (int64_t k = 0; k < t; ++k) {
    A* qk = q + k * W;
    for (int64_t w = 0; w < W; ++w) {
      const A e = ctxlab::exp_acc(qk[w] - mx[w]);
      qk[w] = e;
      sum[w] += e;
    }
  }
  for (int64_t w = 0; w < W; ++w) sum[w] = A(1) / sum[w];
  for (int64_t k = 0; k < t; ++k) {
    A* qk = q + k * W;
    for (int64_t w = 0; w < W; ++w) qk[w] *= sum[w];
  }
}

// Widens one row of labels to int32 so the select loops run at float width (vectorise for uint8
// and int64 labels alike). Labels are < num_classes, far inside int32.
template <typename L>
inline void row_labels(const L* __restrict y, int64_t W, int32_t* __restrict yi) {
  for (int64_t w = 0; w < W; ++w) yi[w] = static_cast<int32_t>(y[w]);
}

template <typename A>
inline void row_mask(const A* d, int64_t W, A margin, A tau, A* M) {
  for (int64_t w = 0; w < W; ++w) M[w] = ctxlab::mask_of_distance(d[w], margin, tau);
}

// Writes one row of level-0 labels (and mask) from q and M. out points at channel 0 of the row,
// channel stride V.
template <typename A, typename L>
inline void row_write(const Plan& p, const A* __restrict q, const A* __restrict M, const L* __restrict y,
                      int64_t W, A* __restrict out, int64_t V, A* __restrict mask) {
  const int64_t c = p.c, t = p.t;
  {
    A* o0 = out;
    for (int64_t w = 0; w < W; ++w) {
      const A v = ctxlab::context0_label(M[w], q[w]);
      o0[w] = y[w] > L(0) ? A(0) : v;
    }
  }
  for (int64_t j = 1; j < c; ++j) {
    A* oj = out + j * V;
    const L jj = static_cast<L>(j);  // L is int32_t here: rows are widened by row_labels
    for (int64_t w = 0; w < W; ++w) oj[w] = ctxlab::roi_label<A>(y[w], jj);
  }
  for (int64_t k = 1; k < t; ++k) {
    A* ok = out + ctxlab::context_channel(k, c) * V;
    const A* qk = q + k * W;
    for (int64_t w = 0; w < W; ++w) {
      const A v = ctxlab::contextk_label(M[w], qk[w]);
      ok[w] = y[w] > L(0) ? A(0) : v;
    }
  }
  if (mask)
    for (int64_t w = 0; w < W; ++w) mask[w] = y[w] > L(0) ? A(1) : M[w];
}

template <typename T, typename L>
COLABX_SIMD_CLONES void forward_tasks(const Plan& p, const Tasks& tk, int64_t begin, int64_t end,
                                      const T* o, const L* y, const acc_t<T>* d, acc_t<T>* const* outs,
                                      acc_t<T>* const* masks, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t t = p.t, W = p.S[2], HW = p.S[1] * W, V = p.voxels();
  const CellGrid g = make_grid(p, tk);
  std::vector<A> q(t * W), M(W), mx(W), sum(W);
  std::vector<int32_t> yi(W);
  std::vector<A> csum(g.size() * t), cmin(g.size());  // first-pooled-level cell statistics
  std::vector<A> racc(g.nH * t * W), rmin(g.nH * W);   // running row sums / minima per cell row
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (tk.nD * tk.nH);
    const int64_t rem = task % (tk.nD * tk.nH);
    const int64_t d0 = (rem / tk.nH) * tk.slabD, h0 = (rem % tk.nH) * tk.slabH;
    const int64_t d1 = std::min(p.S[0], d0 + tk.slabD), h1 = std::min(p.S[1], h0 + tk.slabH);
    std::fill(csum.begin(), csum.end(), A(0));
    std::fill(cmin.begin(), cmin.end(), std::numeric_limits<A>::infinity());
    for (int64_t dd = d0; dd < d1; ++dd) {
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t row = dd * HW + hh * W;
        row_softmax(o + b * t * V + row, V, t, W, q.data(), mx.data(), sum.data());
        row_mask(d + b * V + row, W, margin, tau, M.data());
        if (p.level0_full) {
          row_labels(y + b * V + row, W, yi.data());
          row_write(p, q.data(), M.data(), yi.data(), W, outs[0] + b * p.K * V + row, V,
                    masks[0] ? masks[0] + b * V + row : nullptr);
        }
        if (g.nW > 0) {
          // Accumulate the rows of a cell row contiguously (vectorised), reduce along W once
          // when its last row is done.
          const int64_t ci = dd - d0, hi = hh - h0, j1 = hi / g.sH;
          const bool first = ci % g.sD == 0 && hi % g.sH == 0;
          const bool last = ci % g.sD == g.sD - 1 && hi % g.sH == g.sH - 1;
          A* ra = racc.data() + j1 * t * W;
          A* rm = rmin.data() + j1 * W;
          if (first) {
            std::copy(q.begin(), q.end(), ra);
            std::copy(M.begin(), M.end(), rm);
          } else {
            for (int64_t i = 0; i < t * W; ++i) ra[i] += q[i];
            for (int64_t w = 0; w < W; ++w) rm[w] = std::min(rm[w], M[w]);
          }
          if (last) {
            const int64_t cell_row = ((ci / g.sD) * g.nH + j1) * g.nW;
            for (int64_t k = 0; k < t; ++k) {
              const A* rk = ra + k * W;
              A* cs = csum.data() + k * g.size() + cell_row;
              for (int64_t cw = 0; cw < g.nW; ++cw) {
                A sum_w = A(0);
                for (int64_t i = 0; i < g.sW; ++i) sum_w += rk[cw * g.sW + i];
                cs[cw] = sum_w;
              }
            }
            A* cm = cmin.data() + cell_row;
            for (int64_t cw = 0; cw < g.nW; ++cw) {
              A m = rm[cw * g.sW];
              for (int64_t i = 1; i < g.sW; ++i) m = std::min(m, rm[cw * g.sW + i]);
              cm[cw] = m;
            }
          }
        }
      }
    }
    // Pooled levels, from the first pooled level's cell statistics.
    for (int l = p.first_pooled; l < p.nlev; ++l) {
      const int64_t* s = p.st[l];
      const int64_t fD = s[0] / g.sD, fH = s[1] / g.sH, fW = s[2] / g.sW;
      const int64_t Vl = p.level_voxels(l), SlW = p.Sl[l][2], SlHW = p.Sl[l][1] * SlW;
      const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
      A* out = outs[l] + b * p.K * Vl;
      A* mask = masks[l] ? masks[l] + b * Vl : nullptr;
      for (int64_t i = 0; i < tk.slabD / s[0]; ++i) {
        const int64_t rD = d0 / s[0] + i;
        if (rD >= p.Sl[l][0]) continue;
        for (int64_t j = 0; j < tk.slabH / s[1]; ++j) {
          const int64_t rH = h0 / s[1] + j;
          if (rH >= p.Sl[l][1]) continue;
          const L* yrow = y + b * V + (rD * s[0] + s[0] / 2) * HW + (rH * s[1] + s[1] / 2) * W;
          for (int64_t rW = 0; rW < SlW; ++rW) {
            A Ml = reduce_cells(cmin.data(), g, i, j, rW, fD, fH, fW,
                                std::numeric_limits<A>::infinity(),
                                [](A x, A v) { return std::min(x, v); });
            const L yl = yrow[rW * s[2] + s[2] / 2];
            const int64_t o_idx = rD * SlHW + rH * SlW + rW;
            const bool roi = yl > L(0);
            if (roi) Ml = A(1);
            for (int64_t k = 0; k < t; ++k) {
              const A qs = reduce_cells(csum.data() + k * g.size(), g, i, j, rW, fD, fH, fW, A(0),
                                        [](A x, A v) { return x + v; });
              const A ql = qs * inv_vol;
              const A v = roi ? A(0)
                              : (k == 0 ? ctxlab::context0_label(Ml, ql) : ctxlab::contextk_label(Ml, ql));
              out[ctxlab::context_channel(k, p.c) * Vl + o_idx] = v;
            }
            for (int64_t jc = 1; jc < p.c; ++jc)
              out[jc * Vl + o_idx] = ctxlab::roi_label<A>(static_cast<int64_t>(yl), jc);
            if (mask) mask[o_idx] = Ml;
          }
        }
      }
    }
  }
}

template <typename T, typename L>
COLABX_SIMD_CLONES void backward_tasks(const Plan& p, const Tasks& tk, int64_t begin, int64_t end,
                                       const acc_t<T>* const* grads, const T* o, const L* y,
                                       const acc_t<T>* d, T* grad_o, acc_t<T> margin, acc_t<T> tau) {
  using A = acc_t<T>;
  const int64_t t = p.t, W = p.S[2], HW = p.S[1] * W, V = p.voxels(), c = p.c;
  const CellGrid g = make_grid(p, tk);
  std::vector<A> q(t * W), gq(t * W), M(W), mx(W), sum(W);
  std::vector<int32_t> yi(W);
  std::vector<A> cmin(g.size()), cgrad(g.size() * t);
  std::vector<A> mslab(p.has_pooled() ? tk.slabD * tk.slabH * W : 0);  // M of the slab
  bool any_pooled_grad = false;
  for (int l = p.first_pooled; l < p.nlev; ++l) any_pooled_grad |= grads[l] != nullptr;
  const A* g0 = p.level0_full ? grads[0] : nullptr;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (tk.nD * tk.nH);
    const int64_t rem = task % (tk.nD * tk.nH);
    const int64_t d0 = (rem / tk.nH) * tk.slabD, h0 = (rem % tk.nH) * tk.slabH;
    const int64_t d1 = std::min(p.S[0], d0 + tk.slabD), h1 = std::min(p.S[1], h0 + tk.slabH);
    std::fill(cgrad.begin(), cgrad.end(), A(0));
    if (any_pooled_grad && g.nW > 0) {
      // 1. cell minima of M over the first pooled level's cells.
      std::fill(cmin.begin(), cmin.end(), std::numeric_limits<A>::infinity());
      for (int64_t dd = d0; dd < d1; ++dd)
        for (int64_t hh = h0; hh < h1; ++hh) {
          const int64_t row = dd * HW + hh * W;
          A* Mrow = mslab.data() + ((dd - d0) * tk.slabH + (hh - h0)) * W;  // kept for step 3
          row_mask(d + b * V + row, W, margin, tau, Mrow);
          A* cm = cmin.data() + (((dd - d0) / g.sD) * g.nH + (hh - h0) / g.sH) * g.nW;
          for (int64_t cw = 0; cw < g.nW; ++cw) {
            A m = cm[cw];
            for (int64_t i = 0; i < g.sW; ++i) m = std::min(m, Mrow[cw * g.sW + i]);
            cm[cw] = m;
          }
        }
      // 2. pooled gradients [y_l = 0] M_l g_l / vol_l, scattered down to first-pooled cells.
      for (int l = p.first_pooled; l < p.nlev; ++l) {
        if (!grads[l]) continue;
        const int64_t* s = p.st[l];
        const int64_t fD = s[0] / g.sD, fH = s[1] / g.sH, fW = s[2] / g.sW;
        const int64_t Vl = p.level_voxels(l), SlW = p.Sl[l][2], SlHW = p.Sl[l][1] * SlW;
        const A inv_vol = A(1) / static_cast<A>(p.cell_volume(l));
        const A* gl = grads[l] + b * p.K * Vl;
        for (int64_t i = 0; i < tk.slabD / s[0]; ++i) {
          const int64_t rD = d0 / s[0] + i;
          if (rD >= p.Sl[l][0]) continue;
          for (int64_t j = 0; j < tk.slabH / s[1]; ++j) {
            const int64_t rH = h0 / s[1] + j;
            if (rH >= p.Sl[l][1]) continue;
            const L* yrow = y + b * V + (rD * s[0] + s[0] / 2) * HW + (rH * s[1] + s[1] / 2) * W;
            for (int64_t rW = 0; rW < SlW; ++rW) {
              if (yrow[rW * s[2] + s[2] / 2] > L(0)) continue;
              const A Ml = reduce_cells(cmin.data(), g, i, j, rW, fD, fH, fW,
                                        std::numeric_limits<A>::infinity(),
                                        [](A x, A v) { return std::min(x, v); });
              const A coef = Ml * inv_vol;
              const int64_t o_idx = rD * SlHW + rH * SlW + rW;
              for (int64_t k = 0; k < t; ++k) {
                const A v = coef * gl[ctxlab::context_channel(k, c) * Vl + o_idx];
                for (int64_t a = 0; a < fD; ++a)
                  for (int64_t bb = 0; bb < fH; ++bb) {
                    A* cg = cgrad.data() + k * g.size() +
                            ((i * fD + a) * g.nH + j * fH + bb) * g.nW + rW * fW;
                    for (int64_t e = 0; e < fW; ++e) cg[e] += v;
                  }
              }
            }
          }
        }
      }
    }
    // 3. one softmax-backward pass over the voxels of the slab.
    for (int64_t dd = d0; dd < d1; ++dd) {
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t row = dd * HW + hh * W;
        row_softmax(o + b * t * V + row, V, t, W, q.data(), mx.data(), sum.data());
        const int64_t ci = dd - d0, hi = hh - h0;
        const bool in_cells = any_pooled_grad && g.nW > 0 && ci / g.sD < g.nD && hi / g.sH < g.nH;
        for (int64_t k = 0; k < t; ++k) {
          A* gk = gq.data() + k * W;
          if (in_cells) {
            const A* cg = cgrad.data() + k * g.size() + ((ci / g.sD) * g.nH + hi / g.sH) * g.nW;
            for (int64_t cw = 0; cw < g.nW; ++cw)
              for (int64_t i = 0; i < g.sW; ++i) gk[cw * g.sW + i] = cg[cw];
            for (int64_t w = g.nW * g.sW; w < W; ++w) gk[w] = A(0);
          } else {
            for (int64_t w = 0; w < W; ++w) gk[w] = A(0);
          }
        }
        if (g0) {
          const A* Mr = M.data();
          if (any_pooled_grad && g.nW > 0)
            Mr = mslab.data() + ((dd - d0) * tk.slabH + (hh - h0)) * W;
          else
            row_mask(d + b * V + row, W, margin, tau, M.data());
          row_labels(y + b * V + row, W, yi.data());
          const int32_t* yr = yi.data();
          const A* gr = g0 + b * p.K * V + row;
          for (int64_t k = 0; k < t; ++k) {
            A* gk = gq.data() + k * W;
            const A* gin = gr + ctxlab::context_channel(k, c) * V;
            for (int64_t w = 0; w < W; ++w) {
              const A v = Mr[w] * gin[w];
              gk[w] += yr[w] > 0 ? A(0) : v;
            }
          }
        }
        for (int64_t w = 0; w < W; ++w) sum[w] = A(0);
        for (int64_t k = 0; k < t; ++k) {
          const A* qk = q.data() + k * W;
          const A* gk = gq.data() + k * W;
          for (int64_t w = 0; w < W; ++w) sum[w] += qk[w] * gk[w];
        }
        T* go = grad_o + b * t * V + row;
        for (int64_t k = 0; k < t; ++k) {
          const A* qk = q.data() + k * W;
          const A* gk = gq.data() + k * W;
          T* gok = go + k * V;
          for (int64_t w = 0; w < W; ++w) gok[w] = store_as<T>(ctxlab::softmax_backward(qk[w], gk[w], sum[w]));
        }
      }
    }
  }
}

int64_t grain_for(const Plan& p, const Tasks& tk) {
  // ~32k voxels of work per chunk at least.
  const int64_t per_task = std::max<int64_t>(1, tk.slabD * tk.slabH * p.S[2]);
  return std::max<int64_t>(1, 32768 / per_task);
}

}  // namespace

void context_labels_forward_cpu(const ctxlab::Plan& p, uintptr_t o, int o_dtype, uintptr_t y, int y_dtype,
                                uintptr_t d, const std::vector<uintptr_t>& outs,
                                const std::vector<uintptr_t>& masks, double margin, double tau,
                                int num_threads) {
  const Tasks tk = make_tasks(p);
  dispatch_floating(o_dtype, "context_labels gen_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_labels(y_dtype, "context_labels labels", [&](auto ltag) {
      using L = typename decltype(ltag)::type;
      A* out_ptrs[ctxlab::kMaxLevels] = {};
      A* mask_ptrs[ctxlab::kMaxLevels] = {};
      for (int l = 0; l < p.nlev; ++l) {
        out_ptrs[l] = reinterpret_cast<A*>(outs[l]);
        mask_ptrs[l] = masks.empty() ? nullptr : reinterpret_cast<A*>(masks[l]);
      }
      parallel_for(tk.count, num_threads, grain_for(p, tk), [&](int64_t b, int64_t e) {
        forward_tasks<T, L>(p, tk, b, e, reinterpret_cast<const T*>(o), reinterpret_cast<const L*>(y),
                            reinterpret_cast<const A*>(d), out_ptrs, mask_ptrs, static_cast<A>(margin),
                            static_cast<A>(tau));
      });
    });
  });
}

void context_labels_backward_cpu(const ctxlab::Plan& p, const std::vector<uintptr_t>& grads, uintptr_t o,
                                 int o_dtype, uintptr_t y, int y_dtype, uintptr_t d, uintptr_t grad_o,
                                 double margin, double tau, int num_threads) {
  const Tasks tk = make_tasks(p);
  dispatch_floating(o_dtype, "context_labels gen_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_labels(y_dtype, "context_labels labels", [&](auto ltag) {
      using L = typename decltype(ltag)::type;
      const A* grad_ptrs[ctxlab::kMaxLevels] = {};
      for (int l = 0; l < p.nlev; ++l) grad_ptrs[l] = reinterpret_cast<const A*>(grads[l]);
      parallel_for(tk.count, num_threads, grain_for(p, tk), [&](int64_t b, int64_t e) {
        backward_tasks<T, L>(p, tk, b, e, grad_ptrs, reinterpret_cast<const T*>(o),
                             reinterpret_cast<const L*>(y), reinterpret_cast<const A*>(d),
                             reinterpret_cast<T*>(grad_o), static_cast<A>(margin), static_cast<A>(tau));
      });
    });
  });
}

}  // namespace colabx
