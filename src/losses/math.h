// SPDX-License-Identifier: Apache-2.0
// Numerically guarded elementwise pieces shared by the loss implementations.
#pragma once

#include <ATen/ATen.h>

namespace prefopt {
inline namespace v0 {
namespace detail {

/// exp(min(x, cap)): cap 80 in fp32 (TRL's bound for its alpha-divergence, e^80 ≈ 5.5e34 leaves
/// room for the arithmetic that follows), 700 in fp64. Keeps scores finite where e^x would
/// overflow.
inline at::Tensor capped_exp(const at::Tensor& x) {
  return x.clamp_max(x.scalar_type() == at::kDouble ? 700.0 : 80.0).exp();
}

/// log(1 − e^a) for a < 0, accurate everywhere (Mächler 2012): log(−expm1(a)) above −ln 2,
/// log1p(−e^a) below. Each branch sees an input clamped to its own side, so the branch that
/// is not selected has a finite gradient too, and a ≥ 0 is moved to the largest negative
/// value of the dtype instead of giving −inf.
inline at::Tensor log1mexp(const at::Tensor& a) {
  const double ln2 = 0.6931471805599453;
  const double tiny = a.scalar_type() == at::kDouble ? 1e-300 : 1e-37;
  const auto x = a.clamp_max(-tiny);
  const auto near = at::log(at::expm1(x.clamp_min(-ln2)).neg());
  const auto far = at::log1p(x.clamp_max(-ln2).exp().neg());
  return at::where(x > -ln2, near, far);
}

/// −(1−ε)·log σ(z) − ε·log σ(−z): the label-smoothed (cDPO) sigmoid loss; −log σ(z) at ε = 0.
inline at::Tensor smoothed_sigmoid(const at::Tensor& z, double eps) {
  if (eps == 0) return at::log_sigmoid(z).neg();
  return at::log_sigmoid(z) * (eps - 1.0) - at::log_sigmoid(z.neg()) * eps;
}

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
