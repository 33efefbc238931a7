// CPU kernels of the fused softmax + CE + Dice loss.
//
// Work is split into fixed (item, chunk of kChunk voxels) tasks, independent of the thread
// count, so results are bitwise reproducible for any num_threads. Inside a task voxels are
// processed in tiles of kTile: each channel row of the tile is converted to the compute type,
// then the math runs in loops over the tile's voxels (contiguous, branch-free: they vectorise,
// with an AVX2 clone on x86-64). Per-task partial sums are combined in double in fixed order.
// The selects of the polynomial exp/log if-convert (so the loops vectorise) only because
// CMakeLists.txt compiles the CPU sources with -fno-trapping-math.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dice_ce_loss.h"
#include "common/dispatch.h"
#include "cpu/parallel.h"
#include "cpu/softmax_tiles.h"

namespace colabx::dce_cpu {

// ---- tile math (compute type A; z, y, p, g are [K][kTile]) ------------------------------------

// acc is [3K + 1][kTile]: tp, Σp, Σŷ per channel, then ce.
template <typename A>
COLABX_TILE void dce_fwd_tile(int K, int T, const A* z, const A* y, A* p, A* m, A* s, A* acc) {
  softmax_tile(K, T, z, p, m, s);
  A* __restrict ce = acc + 3 * K * kTile;
  for (int k = 0; k < K; ++k) {
    A* __restrict tp = acc + k * kTile;
    A* __restrict sp = acc + (K + k) * kTile;
    A* __restrict sy = acc + (2 * K + k) * kTile;
    const A* __restrict pk = p + k * kTile;
    const A* __restrict yk = y + k * kTile;
    // separate simple loops: gcc vectorises each, not the fused four-output one
    for (int t = 0; t < T; ++t) tp[t] += pk[t] * yk[t];
    for (int t = 0; t < T; ++t) sp[t] += pk[t];
    for (int t = 0; t < T; ++t) sy[t] += yk[t];
    for (int t = 0; t < T; ++t) ce[t] += dce::ce_term(yk[t], pk[t]);
  }
}

// coef = [C, alpha(K), beta(K)]. Writes gz and, when want_gy, gy ([K][kTile], compute type).
template <typename A>
COLABX_TILE void dce_bwd_tile(int K, int T, const A* z, const A* y, const A* coef, bool want_gy, A* p,
                         A* g, A* m, A* s, A* gz, A* gy) {
  softmax_tile(K, T, z, p, m, s);
  const A c = coef[0];
  A* __restrict dot = s;  // s is free after the softmax
  for (int t = 0; t < T; ++t) dot[t] = A(0);
  for (int k = 0; k < K; ++k) {
    const A alpha = coef[1 + k], beta = coef[1 + K + k];
    const A* __restrict pk = p + k * kTile;
    const A* __restrict yk = y + k * kTile;
    A* __restrict gk = g + k * kTile;
    for (int t = 0; t < T; ++t) {
      gk[t] = dce::dce_grad_p(yk[t], pk[t], c, alpha, beta);
      dot[t] += pk[t] * gk[t];
    }
    if (want_gy) {
      A* __restrict gyk = gy + k * kTile;
      for (int t = 0; t < T; ++t) gyk[t] = dce::dce_grad_y(pk[t], c, alpha, beta);
    }
  }
  for (int k = 0; k < K; ++k) {
    const A* __restrict pk = p + k * kTile;
    const A* __restrict gk = g + k * kTile;
    A* __restrict gzk = gz + k * kTile;
    for (int t = 0; t < T; ++t) gzk[t] = dce::softmax_grad(pk[t], gk[t], dot[t]);
  }
}

// float instances get an AVX2 clone (the hot loops); double runs the generic build.
COLABX_SIMD_CLONES void dce_fwd_tile_f32(int K, int T, const float* z, const float* y, float* p,
                                         float* m, float* s, float* acc) {
  dce_fwd_tile<float>(K, T, z, y, p, m, s, acc);
}
COLABX_SIMD_CLONES void dce_bwd_tile_f32(int K, int T, const float* z, const float* y,
                                         const float* coef, bool want_gy, float* p, float* g,
                                         float* m, float* s, float* gz, float* gy) {
  dce_bwd_tile<float>(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
}
inline void dce_fwd_tile_any(int K, int T, const float* z, const float* y, float* p, float* m,
                             float* s, float* acc) {
  dce_fwd_tile_f32(K, T, z, y, p, m, s, acc);
}
inline void dce_fwd_tile_any(int K, int T, const double* z, const double* y, double* p, double* m,
                             double* s, double* acc) {
  dce_fwd_tile<double>(K, T, z, y, p, m, s, acc);
}
inline void dce_bwd_tile_any(int K, int T, const float* z, const float* y, const float* coef,
                             bool want_gy, float* p, float* g, float* m, float* s, float* gz,
                             float* gy) {
  dce_bwd_tile_f32(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
}
inline void dce_bwd_tile_any(int K, int T, const double* z, const double* y, const double* coef,
                             bool want_gy, double* p, double* g, double* m, double* s, double* gz,
                             double* gy) {
  dce_bwd_tile<double>(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
}
// ---- CE + Dice ---------------------------------------------------------------------------------

// Logits and targets (hard labels as one-hot) of the tile [v0, v0 + n) of item b.
template <bool HARD, typename TL, typename TT, typename A>
inline void load_pair(const TL* z, const TT* tg, int64_t b, int K, int64_t V, int64_t v0, int n,
                      A* zt, A* yt) {
  load_rows(z + b * K * V, V, K, v0, n, zt);
  if constexpr (HARD)
    load_onehot(tg + b * V + v0, K, n, yt);
  else
    load_rows(tg + b * K * V, V, K, v0, n, yt);
}

template <typename TL, typename TT, bool HARD>
void dce_forward_level(const TL* z, const TT* tg, int64_t B, int K, int64_t V, int num_threads,
                       double* partial) {
  using A = acc_t<TL>;
  const int NS = 3 * K + 1;
  const size_t scratch = size_t(K) * kTile * 3 + size_t(NS) * kTile + 2 * kTile;
  for_each_task<A>(B, K, V, num_threads, scratch,
                   [&](int64_t task, int64_t b, int64_t v_begin, int64_t v_end, A* zt) {
    A* yt = zt + K * kTile;
    A* pt = yt + K * kTile;
    A* acc = pt + K * kTile;
    A* m = acc + NS * kTile;
    A* s = m + kTile;
    std::fill(acc, acc + NS * kTile, A(0));
    for_each_tile(v_begin, v_end, [&](int64_t v0, int n) {
      load_pair<HARD>(z, tg, b, K, V, v0, n, zt, yt);
      dce_fwd_tile_any(K, n, zt, yt, pt, m, s, acc);
    });
    double* out = partial + task * NS;
    for (int i = 0; i < NS; ++i) {
      double sum = 0.0;
      for (int t = 0; t < kTile; ++t) sum += static_cast<double>(acc[i * kTile + t]);
      out[i] = sum;
    }
  });
}

template <typename TL, typename TT, bool HARD>
void dce_backward_level(const TL* z, const TT* tg, int64_t B, int K, int64_t V,
                        const std::vector<acc_t<TL>>& coef /*[B][2K+1]*/, TL* gz, TT* gy,
                        int num_threads) {
  using A = acc_t<TL>;
  const bool want_gy = !HARD && gy != nullptr;
  for_each_task<A>(B, K, V, num_threads, size_t(K) * kTile * 6 + 2 * kTile,
                   [&](int64_t, int64_t b, int64_t v_begin, int64_t v_end, A* zt) {
    A* yt = zt + K * kTile;
    A* pt = yt + K * kTile;
    A* gt = pt + K * kTile;
    A* gzt = gt + K * kTile;
    A* gyt = gzt + K * kTile;
    A* m = gyt + K * kTile;
    A* s = m + kTile;
    const A* cb = coef.data() + b * (2 * K + 1);
    for_each_tile(v_begin, v_end, [&](int64_t v0, int n) {
      load_pair<HARD>(z, tg, b, K, V, v0, n, zt, yt);
      dce_bwd_tile_any(K, n, zt, yt, cb, want_gy, pt, gt, m, s, gzt, gyt);
      store_rows(gzt, V, K, v0, n, gz + b * K * V);
      if constexpr (!HARD)
        if (want_gy) store_rows(gyt, V, K, v0, n, gy + b * K * V);
    });
  });
}

}  // namespace colabx::dce_cpu

namespace colabx {

using namespace dce_cpu;

void dice_ce_loss_forward_cpu(const std::vector<uintptr_t>& logits,
                              const std::vector<uintptr_t>& targets, int logits_code,
                              const std::vector<int>& target_codes, int64_t B, int64_t K,
                              const std::vector<int64_t>& V, const std::vector<int64_t>& dice_channels,
                              const std::vector<double>& weights, double smooth, uintptr_t stats,
                              uintptr_t loss, int num_threads) {
  const size_t L = logits.size();
  if (targets.size() != L || target_codes.size() != L || V.size() != L || weights.size() != L)
    throw std::invalid_argument("dice_ce_loss_forward_cpu: per-level argument lengths differ");
  if (K < 1 || K > (1 << 20)) throw std::invalid_argument("dice_ce_loss_forward_cpu: bad K");
  const std::vector<uint8_t> dmask = channel_mask<double>(dice_channels, K, "dice_ce_loss");
  const int NS = static_cast<int>(3 * K + 1);
  const double J = static_cast<double>(dice_channels.size());
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    A* st = reinterpret_cast<A*>(stats);
    double total = 0.0;
    for (size_t l = 0; l < L; ++l) {
      const int64_t nc = num_chunks(V[l]);
      std::vector<double> partial(size_t(B * nc) * NS, 0.0);
      dce::dispatch_targets<TL>(target_codes[l], "dice_ce_loss", [&](auto tt, auto hard) {
        using TT = typename decltype(tt)::type;
        dce_forward_level<TL, TT, decltype(hard)::value>(
            reinterpret_cast<const TL*>(logits[l]), reinterpret_cast<const TT*>(targets[l]), B,
            static_cast<int>(K), V[l], num_threads, partial.data());
      });
      double ce = 0.0, dice = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        std::vector<double> sum(NS, 0.0);
        for (int64_t c = 0; c < nc; ++c)
          for (int i = 0; i < NS; ++i) sum[i] += partial[(b * nc + c) * NS + i];
        for (int i = 0; i < NS; ++i) st[(l * B + b) * NS + i] = static_cast<A>(sum[i]);
        ce += sum[3 * K];
        for (int64_t k = 0; k < K; ++k)
          if (dmask[k]) dice += dce::dice_ratio(sum[k], sum[K + k], sum[2 * K + k], smooth);
      }
      const double level = ce / (double(B) * double(V[l])) - dice / (double(B) * J);
      total += weights[l] * level;
    }
    *reinterpret_cast<A*>(loss) = static_cast<A>(total);
  });
}

void dice_ce_loss_backward_cpu(uintptr_t grad_out, const std::vector<uintptr_t>& logits,
                               const std::vector<uintptr_t>& targets, int logits_code,
                               const std::vector<int>& target_codes, int64_t B, int64_t K,
                               const std::vector<int64_t>& V,
                               const std::vector<int64_t>& dice_channels,
                               const std::vector<double>& weights, double smooth, uintptr_t stats,
                               const std::vector<uintptr_t>& grad_logits,
                               const std::vector<uintptr_t>& grad_targets, int num_threads) {
  const size_t L = logits.size();
  if (targets.size() != L || target_codes.size() != L || V.size() != L || weights.size() != L ||
      grad_logits.size() != L || grad_targets.size() != L)
    throw std::invalid_argument("dice_ce_loss_backward_cpu: per-level argument lengths differ");
  const std::vector<uint8_t> dmask = channel_mask<double>(dice_channels, K, "dice_ce_loss");
  const int NS = static_cast<int>(3 * K + 1);
  const double J = static_cast<double>(dice_channels.size());
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    const A g = *reinterpret_cast<const A*>(grad_out);
    const A* st = reinterpret_cast<const A*>(stats);
    for (size_t l = 0; l < L; ++l) {
      const A gw = g * static_cast<A>(weights[l]);
      const A c = gw / static_cast<A>(double(B) * double(V[l]));
      const A dscale = -gw / static_cast<A>(double(B) * J);
      std::vector<A> coef(size_t(B) * (2 * K + 1));
      for (int64_t b = 0; b < B; ++b) {
        A* cb = coef.data() + b * (2 * K + 1);
        const A* sb = st + (l * B + b) * NS;
        cb[0] = c;
        for (int64_t k = 0; k < K; ++k) {
          A alpha = A(0), beta = A(0);
          if (dmask[k])
            dce::dice_coeffs<A>(sb[k], sb[K + k], sb[2 * K + k], static_cast<A>(smooth), dscale,
                                &alpha, &beta);
          cb[1 + k] = alpha;
          cb[1 + K + k] = beta;
        }
      }
      dce::dispatch_targets<TL>(target_codes[l], "dice_ce_loss", [&](auto tt, auto hard) {
        using TT = typename decltype(tt)::type;
        dce_backward_level<TL, TT, decltype(hard)::value>(
            reinterpret_cast<const TL*>(logits[l]), reinterpret_cast<const TT*>(targets[l]), B,
            static_cast<int>(K), V[l], coef, reinterpret_cast<TL*>(grad_logits[l]),
            reinterpret_cast<TT*>(grad_targets[l]), num_threads);
      });
    }
  });
}

}  // namespace colabx
