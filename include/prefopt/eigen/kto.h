// SPDX-License-Identifier: Apache-2.0
// KTO on unpaired desirable/undesirable completions, and APO-zero's unpaired form, on Eigen
// vectors with closed-form gradients.
//
// Mirrors include/prefopt/losses/kto.h and `kto_loss`/`kto_kl` in losses/kto-inl.h
// (the reference this layer is tested against, in tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// The vectors of a KTO batch (the libtorch layer's `KTOInputs`): the desirable ("chosen",
/// N_d) and undesirable ("rejected", N_u) examples' summed completion log-probs under the policy
/// and the reference, and the KL estimate's mismatched completions. Either side may be empty.
///
/// Example:
/// ```
/// auto in = prefopt::eigen::KTOInputs<double>().policy_chosen_logps(pd).policy_rejected_logps(pu)
///               .reference_chosen_logps(rd).reference_rejected_logps(ru)
///               .policy_KL_logps(pkl).reference_KL_logps(rkl);
/// ```
template <typename T>
struct KTOInputs {
  /// [N_d] policy log-probs of the desirable completions.
  PREFOPT_EIGEN_ARG(Vector<T>, policy_chosen_logps);
  /// [N_u] policy log-probs of the undesirable completions.
  PREFOPT_EIGEN_ARG(Vector<T>, policy_rejected_logps);
  /// [N_d] reference log-probs of the desirable completions.
  PREFOPT_EIGEN_ARG(Vector<T>, reference_chosen_logps);
  /// [N_u] reference log-probs of the undesirable completions.
  PREFOPT_EIGEN_ARG(Vector<T>, reference_rejected_logps);
  /// [M] policy log-probs of the mismatched (prompt, completion) pairs of the KL estimate.
  PREFOPT_EIGEN_ARG(std::optional<Vector<T>>, policy_KL_logps);
  /// [M] reference log-probs of the same mismatched pairs.
  PREFOPT_EIGEN_ARG(std::optional<Vector<T>>, reference_KL_logps);
  /// The KL estimate itself, used instead of the KL log-probs (e.g. a mean over all ranks).
  /// Clamped at 0; a constant of the loss, like the local estimate. Where both are given, `kl`
  /// decides and the KL log-probs are not read.
  PREFOPT_EIGEN_ARG(std::optional<T>, kl);
};

/// Options of `eigen::kto_loss`: the libtorch layer's `KTOLossOptions` (TRL `KTOConfig`'s
/// defaults).
///
/// Example:
/// ```
/// auto o = prefopt::eigen::KTOLossOptions().beta(0.1).desirable_weight(1.33);
/// ```
struct KTOLossOptions {
  /// The defaults.
  KTOLossOptions() = default;
  /// Lets a reduction stand for the options.
  KTOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)
  /// The loss. Default: kKTO.
  PREFOPT_EIGEN_ARG(KTOLossType, loss_type) = KTOLossType::kKTO;
  /// β > 0. Default: 0.1.
  PREFOPT_EIGEN_ARG(double, beta) = 0.1;
  /// Weight of each desirable example's loss (≥ 0). Default: 1.
  PREFOPT_EIGEN_ARG(double, desirable_weight) = 1.0;
  /// Weight of each undesirable example's loss (≥ 0). Default: 1.
  PREFOPT_EIGEN_ARG(double, undesirable_weight) = 1.0;
  /// Reduction over the N_d + N_u weighted losses (kMean over none gives 0). Default: kMean.
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;
};

/// Result of `eigen::kto_loss`: the libtorch layer's `KTOLossResult` plus the gradients of
/// `loss` (of the sum of its entries with Reduction::kNone) with respect to the four log-prob
/// vectors (the KL inputs are constants: no gradient).
///
/// Example:
/// ```
/// auto r = prefopt::eigen::kto_loss(in);
/// // r.grad_policy_chosen: [N_d], r.grad_policy_rejected: [N_u]
/// ```
template <typename T>
struct KTOLossResult {
  Vector<T> loss;                     ///< [1] reduced loss, or [N_d + N_u] with Reduction::kNone
  Vector<T> losses;                   ///< [N_d + N_u] weighted losses, desirable first
  Vector<T> chosen_rewards;           ///< [N_d] β·ρ of the desirable examples
  Vector<T> rejected_rewards;         ///< [N_u] β·ρ of the undesirable examples
  T kl = T(0);                        ///< z = max(0, mean(π_KL − ref_KL)) (0 without KL)
  Vector<T> grad_policy_chosen;       ///< [N_d] d loss / d policy_chosen_logps
  Vector<T> grad_policy_rejected;     ///< [N_u] d loss / d policy_rejected_logps
  Vector<T> grad_reference_chosen;    ///< [N_d] d loss / d reference_chosen_logps
  Vector<T> grad_reference_rejected;  ///< [N_u] d loss / d reference_rejected_logps
};

/// The KL estimate of KTO: max(0, mean(policy_KL_logps − reference_KL_logps)); 0 for empty
/// inputs. A constant of the loss (TRL detaches it).
///
/// Example:
/// ```
/// double z = prefopt::eigen::kto_kl<double>(pkl, rkl);
/// ```
template <typename T>
T kto_kl(const Vector<T>& policy_KL_logps, const Vector<T>& reference_KL_logps) {
  detail::check(reference_KL_logps.size() == policy_KL_logps.size(), "prefopt::eigen::kto_kl",
                ": expected reference_KL_logps of shape ", detail::shape(policy_KL_logps.size()),
                " like policy_KL_logps, got ", detail::shape(reference_KL_logps.size()));
  return std::max(detail::mean_or_zero<T>(policy_KL_logps - reference_KL_logps), T(0));
}

/// KTO (arXiv:2402.01306) and `apo_zero_unpaired` with their gradients, as
/// `prefopt::functional::kto_loss` computes them, with ρ = logp_policy − logp_reference:
///
/// `losses = [w_d·(1 − σ(β(ρ_d − z))), w_u·(1 − σ(β(z − ρ_u)))]`, `loss = mean(losses)`,
/// `z = max(0, mean(policy_KL − reference_KL))` (or the given `kl`, clamped at 0; 0, with a
/// warning, without either); apo_zero_unpaired: `[w_d·(1 − σ(βρ_d)), w_u·σ(βρ_u)]`.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::kto_loss(prefopt::eigen::KTOInputs<float>().policy_chosen_logps(pd)
///                                       /* ... */);
/// ```
template <typename T>
KTOLossResult<T> kto_loss(const KTOInputs<T>& in, const KTOLossOptions& o = {}) {
  detail::check_scalar<T>();
  constexpr const char* fn = "prefopt::eigen::kto_loss";
  detail::check_beta(fn, o.beta());
  detail::check(std::isfinite(o.desirable_weight()) && o.desirable_weight() >= 0, fn,
                ": expected desirable_weight >= 0, got ", o.desirable_weight());
  detail::check(std::isfinite(o.undesirable_weight()) && o.undesirable_weight() >= 0, fn,
                ": expected undesirable_weight >= 0, got ", o.undesirable_weight());
  const Eigen::Index Nd = in.policy_chosen_logps().size(), Nu = in.policy_rejected_logps().size();
  detail::check(in.reference_chosen_logps().size() == Nd, fn,
                ": expected reference_chosen_logps of shape ", detail::shape(Nd),
                " like policy_chosen_logps, got ",
                detail::shape(in.reference_chosen_logps().size()));
  detail::check(in.reference_rejected_logps().size() == Nu, fn,
                ": expected reference_rejected_logps of shape ", detail::shape(Nu),
                " like policy_rejected_logps, got ",
                detail::shape(in.reference_rejected_logps().size()));
  detail::check(prefopt::detail::is_valid(o.loss_type()), fn,
                ": loss_type is not a KTOLossType value (got ", static_cast<int>(o.loss_type()),
                ")");
  detail::check_reduction(fn, o.reduction());
  const bool kl_logps = in.policy_KL_logps().has_value() || in.reference_KL_logps().has_value();
  detail::check(
      !kl_logps || (in.policy_KL_logps().has_value() && in.reference_KL_logps().has_value()), fn,
      ": expected both policy_KL_logps and reference_KL_logps for the KL estimate, ", "got only ",
      in.policy_KL_logps().has_value() ? "policy_KL_logps" : "reference_KL_logps");
  T z = T(0);
  if (o.loss_type() == KTOLossType::kAPOZeroUnpaired) {
    // TRL's apo_zero_unpaired has no KL term (and logs kl = 0).
    if (in.kl() || kl_logps) {
      detail::warn_once(detail::str(fn, "/apo_kl"),
                        detail::str(fn, ": apo_zero_unpaired uses no KL estimate; the kl and KL ",
                                    "log-probs given are ignored"));
    }
  } else if (in.kl()) {
    detail::check(std::isfinite(*in.kl()), fn, ": expected a finite kl, got ", *in.kl());
    z = std::max(*in.kl(), T(0));
  } else if (kl_logps) {
    z = kto_kl<T>(*in.policy_KL_logps(), *in.reference_KL_logps());
  } else {
    // Legal (z = 0), but TRL's kto always estimates the KL: most likely an input forgotten.
    detail::warn_once(detail::str(fn, "/no_kl"),
                      detail::str(fn, ": the kto loss got neither kl nor KL log-probs; it uses ",
                                  "z = 0 (TRL always estimates the KL)"));
  }
  const Vector<T> rho_d = in.policy_chosen_logps() - in.reference_chosen_logps();
  const Vector<T> rho_u = in.policy_rejected_logps() - in.reference_rejected_logps();
  const T beta = static_cast<T>(o.beta());
  const bool kto = o.loss_type() == KTOLossType::kKTO;
  const T zz = kto ? z : T(0);
  const T scale = detail::reduction_scale<T>(o.reduction(), Nd + Nu);
  const T wd = static_cast<T>(o.desirable_weight()), wu = static_cast<T>(o.undesirable_weight());
  Vector<T> ld(Nd), lu(Nu), gd(Nd), gu(Nu);
  for (Eigen::Index i = 0; i < Nd; ++i) {  // 1 − σ(β(ρ − z)) = σ(−β(ρ − z))
    const T x = (kto ? rho_d(i) - zz : rho_d(i)) * -beta;
    ld(i) = detail::sigmoid(x);
    gd(i) = -detail::sigmoid_grad(x) * beta;
  }
  for (Eigen::Index i = 0; i < Nu; ++i) {  // 1 − σ(β(z − ρ)) = σ(β(ρ − z))
    const T x = (kto ? rho_u(i) - zz : rho_u(i)) * beta;
    lu(i) = detail::sigmoid(x);
    gu(i) = detail::sigmoid_grad(x) * beta;
  }
  if (o.desirable_weight() != 1.0) ld = ld * wd;
  if (o.undesirable_weight() != 1.0) lu = lu * wu;
  KTOLossResult<T> res;
  res.losses.resize(Nd + Nu);
  res.losses.head(Nd) = ld;
  res.losses.tail(Nu) = lu;
  res.loss = detail::reduce<T>(res.losses, o.reduction());
  res.chosen_rewards = rho_d * beta;
  res.rejected_rewards = rho_u * beta;
  res.kl = z;
  res.grad_policy_chosen = gd * (scale * (o.desirable_weight() != 1.0 ? wd : T(1)));
  res.grad_policy_rejected = gu * (scale * (o.undesirable_weight() != 1.0 ? wu : T(1)));
  res.grad_reference_chosen = -res.grad_policy_chosen;
  res.grad_reference_rejected = -res.grad_policy_rejected;
  return res;
}

}  // namespace eigen
PREFOPT_END_NAMESPACE
