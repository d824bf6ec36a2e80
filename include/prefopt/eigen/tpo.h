// SPDX-License-Identifier: Apache-2.0
// TPO (Triple Preference Optimization) on Eigen vectors, with closed-form gradients: a
// reference-free preference loss on the policy margin plus the gold response's NLL, as TRL's
// experimental TPOTrainer (TRL ≥ 1.3).
//
// Mirrors include/prefopt/losses/tpo.h and `tpo_impl`/`tpo_loss` in
// include/prefopt/losses/tpo-inl.h (the reference this layer is tested against, in
// tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/cpo.h>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// Options of `eigen::tpo_loss`: the libtorch layer's `TPOLossOptions` (TRL `TPOConfig`'s
/// defaults).
///
/// Example:
/// ```
/// auto o = prefopt::eigen::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL).beta(0.01);
/// ```
struct TPOLossOptions {
  /// The defaults.
  TPOLossOptions() = default;
  /// Lets a reduction stand for the options.
  TPOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)
  /// The loss. Default: kSigmoid.
  PREFOPT_EIGEN_ARG(TPOLossType, loss_type) = TPOLossType::kSigmoid;
  /// β > 0 (τ of ipo). Default: 0.01.
  PREFOPT_EIGEN_ARG(double, beta) = 0.01;
  /// ε ∈ [0, 0.5) for sigmoid and tpo-l; an error with hinge and ipo. Default: 0.
  PREFOPT_EIGEN_ARG(double, label_smoothing) = 0.0;
  /// Weight of the gold response's NLL (0: no NLL term and no gold input needed). Default: 1.
  PREFOPT_EIGEN_ARG(double, tpo_alpha) = 1.0;
  /// γ of tpo-l (the sigmoid sees βΔ − γ). Read by tpo-l only: another value than 0.5 with
  /// another type warns. Default: 0.5.
  PREFOPT_EIGEN_ARG(double, tpo_l_gamma) = 0.5;
  /// Reduction of the per-pair preference losses. Default: kMean (TRL).
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;
};

/// Result of `eigen::tpo_loss`: `loss = reduce(losses) + tpo_alpha·nll_loss`, rewards β·s,
/// `nll_loss` the gold responses' token-mean NLL; `grad_gold_sum` is d loss / d gold.sum.
/// CPO's fields in a type of its own, so that `MetricAccumulator::add` leaves `nll_loss` out,
/// as TRL's TPOTrainer does.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::tpo_loss(prefopt::eigen::PairInputs<double>(pair), gold);
/// // r.grad_policy_chosen, r.grad_policy_rejected: [B]; r.grad_gold_sum: [B]
/// ```
template <typename T>
struct TPOLossResult : CPOLossResult<T> {};

namespace detail {

/// TPO is CPO's machinery with its own names (`tpo_as_cpo`) and the NLL of the gold response
/// (`inputs.nll_loss`) instead of the chosen one.
template <typename T>
TPOLossResult<T> tpo_impl(const PairInputs<T>& in, const TPOLossOptions& o) {
  constexpr const char* fn = "prefopt::eigen::tpo_loss";
  CPOLossType type = CPOLossType::kSigmoid;
  check(prefopt::detail::tpo_as_cpo(o.loss_type(), &type), fn,
        ": loss_type is not a TPOLossType value (got ", static_cast<int>(o.loss_type()), ")");
  check(std::isfinite(o.tpo_alpha()), fn, ": expected a finite tpo_alpha, got ", o.tpo_alpha());
  check(o.tpo_alpha() == 0 || in.nll_loss().has_value(), fn, ": tpo_alpha = ", o.tpo_alpha(),
        " weights the gold response's NLL; pass the gold SequenceLogprobs (or nll_loss), or set ",
        "tpo_alpha(0)");
  return {cpo_impl<T>(
      fn, in,
      {type, o.beta(), o.label_smoothing(), o.tpo_l_gamma(), o.tpo_alpha(), 0.0,
       NLLNormalization::kTokenMean, o.reduction(), prefopt::detail::name_of(o.loss_type()),
       o.tpo_l_gamma() != TPOLossOptions().tpo_l_gamma()})};
}

}  // namespace detail

/// TPO of B triples (prompt, chosen, rejected, gold) and its gradient, as TRL's TPOTrainer
/// computes it (Saeidi et al. 2024):
///
/// `loss = mean_b(pref_b) + tpo_alpha · NLL_gold`, with `pref_b` per `TPOLossType` and
/// `NLL_gold = −Σ_s gold.sum_s / max(Σ_s gold.count_s, 1)` (0 when there are no gold tokens).
///
/// - `inputs.policy_*_logps`: [B]; native form sums for sigmoid and hinge, per-token means for
///   ipo and tpo-l (the other form is converted with the lengths).
/// - `gold`: the policy's log-probs of the gold responses (`sum` and `count`); the result's
///   `grad_gold_sum` is d loss / d gold.sum. With `tpo_alpha = 0` nothing reads them: they are
///   ignored, with a warning (once per process), as in the libtorch layer.
/// - `inputs.reference_*_logps`: not read (TPO is reference-free); given, they warn.
///
/// Example:
/// ```
/// namespace pe = prefopt::eigen;
/// auto r = pe::tpo_loss(pe::PairInputs<double>(pair), gold);
/// ```
template <typename T>
TPOLossResult<T> tpo_loss(const PairInputs<T>& inputs, const SequenceLogprobs<T>& gold,
                          const TPOLossOptions& o = {}) {
  constexpr const char* fn = "prefopt::eigen::tpo_loss";
  if (o.tpo_alpha() == 0) {
    // Legal, but the gold responses' log-probs were computed for nothing: most likely a
    // tpo_alpha set to 0 by mistake (the libtorch layer warns too).
    if (gold.sum.size() > 0 || gold.count.size() > 0) {
      detail::warn_once(detail::str(fn, "/unread_gold"),
                        detail::str(fn, ": the gold SequenceLogprobs are given but no term reads ",
                                    "them (tpo_alpha = 0): they are ignored"));
    }
    return detail::tpo_impl(inputs, o);
  }
  detail::check(gold.count.size() == gold.sum.size(), fn,
                ": expected gold.sum and gold.count of the same shape [S], got ",
                detail::shape(gold.sum.size()), " and ", detail::shape(gold.count.size()));
  detail::check(!inputs.nll_loss().has_value(), fn,
                ": got both the gold SequenceLogprobs and nll_loss; pass one");
  detail::check_counts(fn, "gold.count", gold.count);
  // One gold response per pair (TRL's third branch of the same batch), as the libtorch layer.
  detail::check(gold.sum.size() == inputs.policy_chosen_logps().size(), fn,
                ": expected one gold response per pair, gold.sum of shape ",
                detail::shape(inputs.policy_chosen_logps().size()),
                " like policy_chosen_logps, got ", detail::shape(gold.sum.size()));
  // TRL's cross-entropy over every gold completion token of the batch; 0 over none. The
  // counts are summed in T, as the libtorch layer casts them to the compute type first.
  const Vector<T> n = gold.count.template cast<T>();
  const T total = std::max(n.sum(), T(1));
  const T nll = -gold.sum.sum() / total;
  auto res = detail::tpo_impl(PairInputs<T>(inputs).nll_loss(nll), o);
  res.grad_gold_sum = Vector<T>::Constant(gold.sum.size(), -res.grad_nll_loss / total);
  res.grad_nll_loss = T(0);
  return res;
}

/// TPO with the gold NLL given as `inputs.nll_loss` (a scalar the host computed; the result's
/// `grad_nll_loss` is d loss / d it); it may be absent only with `tpo_alpha = 0`.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::tpo_loss(in.nll_loss(gold_nll));
/// ```
template <typename T>
TPOLossResult<T> tpo_loss(const PairInputs<T>& inputs, const TPOLossOptions& o = {}) {
  return detail::tpo_impl(inputs, o);
}

}  // namespace eigen
PREFOPT_END_NAMESPACE
