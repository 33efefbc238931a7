// Per-voxel math of the fused softmax + soft CE + soft Dice loss (docs/design.md, "Op 3"), shared
// by the CPU and the CUDA kernels so the CPU tests exercise the GPU math; its softmax and
// elementary functions also serve the ROI BCE (common/roi_bce_loss.h).
//
// Layout: logits/targets [B, K, V] (V = voxels per item), hard labels [B, V]. Per (level, item)
// the forward reduces NS = 3K + 1 sums, stored as stats[l][b] = [tp(K), Σp(K), Σŷ(K), ce]:
//   tp_k = Σ_v p·ŷ,  Σp_k,  Σŷ_k,  ce = −Σ_v Σ_k ŷ·log(p + 1e−32).
// Dice's denominator 2tp + fp + fn + s equals Σp + Σŷ + s (fp = Σp − tp, fn = Σŷ − tp).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/macros.h"

namespace colabx::dce {

constexpr float kCeEps = 1e-32f;

// ---- elementary functions -------------------------------------------------------------------
// exp for x <= 88 (the kernels only pass x = z - max <= 0): Cody-Waite reduction by ln 2 and a
// degree-7 Taylor polynomial on |r| <= ln2/2 (truncation 5e-9 relative); <= 2 ulp over the range,
// 0 below -87.3 (where float exp is subnormal; torch gives <1.2e-38 there, which no consumer of p
// can tell apart: p + 1e-32 is the same float). Branch-free so CPU loops auto-vectorise; NaN
// propagates.
COLABX_HD float exp_poly(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  // ln2 split: hi has 16 significant bits so n * hi is exact for |n| < 2^8.
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-06f;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float y = q * scale;
  return x < -87.3f ? 0.0f : y;
}

// Natural log for positive normal x (the kernels pass p + eps >= 1e-32): x = m 2^e with
// m in (sqrt(1/2), sqrt(2)], log m = 2 atanh(f / (2 + f)), f = m - 1, series to s^9 (|s| <=
// 0.1716, truncation 5e-9 relative); ~1-2 ulp. Branch-free; NaN in gives NaN out, +inf gives inf.
COLABX_HD float log_poly(float x) {
  const uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 127;
  float m = bits_to_float((u & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  // Selects pick between values computed unconditionally: with -ftrapping-math (gcc's default)
  // a select that would speculate an FP operation blocks if-conversion and so vectorisation.
  const bool big = m > 1.41421356237309505f;
  const float mh = m * 0.5f;
  m = big ? mh : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float q = 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  const float lm = 2.0f * s + 2.0f * s * s2 * q;
  const float ef = static_cast<float>(e);
  const float y = ef * 0.693145751953125f + (lm + ef * 1.42860682030941723e-06f);
  // Specials (never hit by the kernels, kept for safety): x <= 0 -> -inf/nan, inf/nan -> x.
  const bool special = !(x > 0.0f) || !(x < 3.0e38f);
  const float bad = x == 0.0f ? bits_to_float(0xff800000u) : (x > 0.0f ? x : bits_to_float(0x7fc00000u));
  return special ? bad : y;
}

COLABX_HD float acc_exp(float x) { return exp_poly(x); }
COLABX_HD double acc_exp(double x) { return exp(x); }
COLABX_HD float acc_log(float x) { return log_poly(x); }
COLABX_HD double acc_log(double x) { return log(x); }

template <typename A>
COLABX_HD A ce_eps() {
  return static_cast<A>(kCeEps);  // the twin adds the Python float 1e-32 in the compute dtype
}
template <>
COLABX_HD double ce_eps<double>() {
  return 1e-32;
}

// ---- CE + Dice --------------------------------------------------------------------------------
// Contribution of one (voxel, channel) to the CE sum: -ŷ log(p + 1e-32).
template <typename A>
COLABX_HD A ce_term(A y, A p) {
  return -(y * acc_log(p + ce_eps<A>()));
}

// Dice ratio N / D of one (item, channel) from its sums.
COLABX_HD double dice_ratio(double tp, double sp, double sy, double smooth) {
  return (2.0 * tp + smooth) / (sp + sy + smooth);
}

// Backward coefficients of one (item, channel): with N = 2tp + s, D = Σp + Σŷ + s and
// scale = -g w / (B J) for a Dice channel (0 otherwise),
//   ∂L/∂p_v (Dice part) = scale (2ŷ_v D − N)/D² = alpha ŷ_v + beta,
//   ∂L/∂ŷ_v (Dice part) = scale (2p_v D − N)/D² = alpha p_v + beta.
template <typename A>
COLABX_HD void dice_coeffs(A tp, A sp, A sy, A smooth, A scale, A* alpha, A* beta) {
  const A n = A(2) * tp + smooth;
  const A d = sp + sy + smooth;
  *alpha = scale * A(2) / d;
  *beta = -scale * n / (d * d);
}

// ∂L/∂p_v of one channel: CE part (-C ŷ / (p + 1e-32), C = g w / (B V)) + Dice part.
template <typename A>
COLABX_HD A dce_grad_p(A y, A p, A c, A alpha, A beta) {
  return -c * y / (p + ce_eps<A>()) + (alpha * y + beta);
}

// ∂L/∂ŷ_v of one channel: CE part (-C log(p + 1e-32)) + Dice part.
template <typename A>
COLABX_HD A dce_grad_y(A p, A c, A alpha, A beta) {
  return -c * acc_log(p + ce_eps<A>()) + (alpha * p + beta);
}

// Softmax backward of one channel: ∂z_i = p_i (g_i − Σ_j p_j g_j) (autograd's form, so p_i = 0
// gives 0 even when g_i is huge).
template <typename A>
COLABX_HD A softmax_grad(A p, A g, A dot) {
  return p * (g - dot);
}

// ---- host: dispatch of (logits type, targets type), shared by the CPU and CUDA entry points ----

// fn(TypeTag<TT>, std::bool_constant<HARD>) for logits of type TL: soft targets must be in the
// compute type of the logits (float32, or float64 for float64 logits); hard labels any int type.
template <typename TL, typename Fn>
void dispatch_targets(int target_code, const char* what, Fn&& fn) {
  using A = acc_t<TL>;
  const int want = std::is_same_v<A, double> ? int(DType::Float64) : int(DType::Float32);
  const auto tc = static_cast<DType>(target_code);
  if (tc == DType::Float32 || tc == DType::Float64 || tc == DType::Float16 ||
      tc == DType::BFloat16) {
    if (target_code != want)
      throw std::invalid_argument(std::string(what) +
                                  ": soft targets must have the compute dtype of the logits (code " +
                                  std::to_string(want) + "), got code " +
                                  std::to_string(target_code));
    fn(TypeTag<A>{}, std::false_type{});
  } else {
    dispatch_labels(target_code, "dice_ce_loss targets",
                    [&](auto ttag) { fn(ttag, std::true_type{}); });
  }
}

}  // namespace colabx::dce

// ---- host entry points (raw addresses; one call covers every deep-supervision level) ---------
#include <cstdint>
#include <vector>

namespace colabx {

// logits[l] [B, K, V[l]] of dtype logits_code; targets[l] soft [B, K, V[l]] of the compute dtype
// (float32, or float64 for float64 logits) or hard labels [B, V[l]] (target_codes[l]). Writes
// stats [L, B, 3K+1] (compute dtype) and the 0-dim loss (compute dtype).
void dice_ce_loss_forward_cpu(const std::vector<uintptr_t>& logits,
                              const std::vector<uintptr_t>& targets, int logits_code,
                              const std::vector<int>& target_codes, int64_t B, int64_t K,
                              const std::vector<int64_t>& V, const std::vector<int64_t>& dice_channels,
                              const std::vector<double>& weights, double smooth, uintptr_t stats,
                              uintptr_t loss, int num_threads);

// Reads grad_out (0-dim, compute dtype) and stats; writes grad_logits[l] (logits dtype) and, for
// soft levels, grad_targets[l] (compute dtype; 0 address for hard levels).
void dice_ce_loss_backward_cpu(uintptr_t grad_out, const std::vector<uintptr_t>& logits,
                               const std::vector<uintptr_t>& targets, int logits_code,
                               const std::vector<int>& target_codes, int64_t B, int64_t K,
                               const std::vector<int64_t>& V,
                               const std::vector<int64_t>& dice_channels,
                               const std::vector<double>& weights, double smooth, uintptr_t stats,
                               const std::vector<uintptr_t>& grad_logits,
                               const std::vector<uintptr_t>& grad_targets, int num_threads);

}  // namespace colabx
