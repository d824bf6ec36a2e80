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

/// ORPO's log-odds (a − b) − (log(1 − e^a) − log(1 − e^b)) for a, b < 0, rewritten as
/// log(expm1(−b) / expm1(−a)) (since a − log(1 − e^a) = −log(e^{−a} − 1)). expm1 is exact to
/// rounding near 0, where log1p(−exp(a)) cancels to log(0) (trl#1473, #2564); one log and no
/// subtraction keep the op count below the naive form's, which is the whole cost on [B]
/// vectors. Inputs ≥ 0 (an empty completion's mean of 0) are moved to the smallest positive
/// distance from 0 instead of giving ±inf; below −80 (fp32) the quotient would overflow, so
/// −a is capped there (per-token means that low are not log-probs of any trained model).
inline at::Tensor orpo_log_odds(const at::Tensor& a, const at::Tensor& b) {
  const bool f64 = a.scalar_type() == at::kDouble;
  const double tiny = f64 ? 1e-300 : 1e-37, cap = f64 ? 700.0 : 80.0;
  return at::log(at::expm1(b.neg().clamp(tiny, cap)) / at::expm1(a.neg().clamp(tiny, cap)));
}

/// −(1−ε)·log σ(z) − ε·log σ(−z): the label-smoothed (cDPO) sigmoid loss; −log σ(z) at ε = 0.
inline at::Tensor smoothed_sigmoid(const at::Tensor& z, double eps) {
  if (eps == 0) return at::log_sigmoid(z).neg();
  return at::log_sigmoid(z) * (eps - 1.0) - at::log_sigmoid(z.neg()) * eps;
}

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
