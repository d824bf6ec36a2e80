// SPDX-License-Identifier: Apache-2.0
// Numerically guarded elementwise pieces shared by the loss implementations.
#pragma once

#include <ATen/ATen.h>

namespace prefopt {
inline namespace v0 {
namespace detail {

/// `t` in `dtype`; skips the dispatcher round trip of `to` when it already is (these losses
/// run on [B] vectors, where per-op overhead is the whole cost).
inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

/// exp(min(x, cap)): cap 80 in fp32 (TRL's bound for its alpha-divergence, e^80 ≈ 5.5e34 leaves
/// room for the arithmetic that follows), 700 in fp64. Keeps scores finite where e^x would
/// overflow.
inline at::Tensor capped_exp(const at::Tensor& x) {
  return x.clamp_max(x.scalar_type() == at::kDouble ? 700.0 : 80.0).exp();
}

/// expm1(min(x, cap)), with `capped_exp`'s caps: the f-divergence scores 1 − e^{−ρ} and
/// (e^{(α−1)ρ} − 1)/(α−1) without the cancellation of e^x − 1 near x = 0.
inline at::Tensor capped_expm1(const at::Tensor& x) {
  return x.clamp_max(x.scalar_type() == at::kDouble ? 700.0 : 80.0).expm1();
}

/// ORPO's log-odds (a − b) − (log(1 − e^a) − log(1 − e^b)) for a, b < 0 (per-token mean
/// log-probs), as (a − b) + log(expm1(b) / expm1(a)), since 1 − e^x = −expm1(x):
/// - expm1 is exact to rounding near 0, where log1p(−exp(a)) cancels to log(0) (trl#1473,
///   #2564), so confident completions (a → 0⁻) keep finite values and gradients;
/// - both expm1 values lie in (−1, 0), so the quotient neither overflows nor saturates for
///   any a, b < 0: a = −800 gives its exact log-odds (no clamp on the low side);
/// - one log and two expm1 keep the op count at the naive form's, which is the whole cost on
///   [B] vectors.
/// Inputs ≥ 0 (an empty completion's mean of 0) are moved to the largest value below 0 that
/// keeps the quotient finite (−1e-37 in fp32, −1e-300 in fp64) instead of giving ±inf.
inline at::Tensor orpo_log_odds(const at::Tensor& a, const at::Tensor& b) {
  const double tiny = a.scalar_type() == at::kDouble ? -1e-300 : -1e-37;
  const auto ac = a.clamp_max(tiny), bc = b.clamp_max(tiny);
  return (ac - bc) + at::log(at::expm1(bc) / at::expm1(ac));
}

/// −(1−ε)·log σ(z) − ε·log σ(−z): the label-smoothed (cDPO) sigmoid loss; −log σ(z) at ε = 0.
inline at::Tensor smoothed_sigmoid(const at::Tensor& z, double eps) {
  if (eps == 0) return at::log_sigmoid(z).neg();
  return at::log_sigmoid(z) * (eps - 1.0) - at::log_sigmoid(z.neg()) * eps;
}

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
