// SPDX-License-Identifier: Apache-2.0
// ORPO on Eigen vectors, with closed-form gradients: the odds-ratio preference term with a
// stable log(1 − p), plus the chosen NLL.
//
// Mirrors include/prefopt/losses/orpo.h, `orpo_loss` in include/prefopt/losses/orpo-inl.h and
// `orpo_log_odds` in include/prefopt/detail/loss_math.h (the reference this layer is tested
// against, in tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// Options of `eigen::orpo_loss`: the libtorch layer's `ORPOLossOptions`.
///
/// Example:
/// ```
/// auto o = prefopt::eigen::ORPOLossOptions().beta(0.1);
/// ```
struct ORPOLossOptions {
  /// The defaults.
  ORPOLossOptions() = default;
  /// Lets a reduction stand for the options.
  ORPOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)
  /// λ, the weight of the odds-ratio term (TRL calls it `beta`). Must be > 0. Default: 0.1.
  PREFOPT_EIGEN_ARG(double, beta) = 0.1;
  /// The NLL term when `PairInputs::nll_loss` is not given: kTokenMean over the chosen
  /// completion tokens (Liger; needs `chosen_lengths`) or kSequenceMean, −mean(ā_c)
  /// (LLaMA-Factory). TRL's NLL also covers the prompt: pass it as `nll_loss`, which this
  /// option does not read (kSequenceMean with `nll_loss` warns).
  /// Default: kTokenMean.
  PREFOPT_EIGEN_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: kMean.
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;
};

/// Result of `eigen::orpo_loss`: the libtorch layer's `ORPOLossResult` plus the gradients of
/// `loss` (of the sum of its entries with Reduction::kNone) with respect to the inputs as
/// given.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::orpo_loss(prefopt::eigen::PairInputs<float>::averaged(policy));
/// float log_odds = r.log_odds_chosen.mean();
/// ```
template <typename T>
struct ORPOLossResult {
  Vector<T> loss;  ///< [1] reduce(losses) = NLL − λ·mean(log σ(log_odds)) with kMean; [B] kNone
  Vector<T> losses;  ///< [B] NLL_b − λ·log σ(log_odds_b) (NLL_b: per pair or the batch's)
  Vector<T> chosen_rewards;        ///< [B] λ·ā_c
  Vector<T> rejected_rewards;      ///< [B] λ·ā_r
  Vector<T> log_odds_ratio;        ///< [B] log σ(log_odds) (TRL logs its mean)
  Vector<T> log_odds_chosen;       ///< [B] log_odds (TRL logs its mean)
  T nll_loss = T(0);               ///< the NLL term (0 for an empty batch)
  Vector<T> chosen_logps;          ///< [B] per-token mean log-probs the loss consumed
  Vector<T> rejected_logps;        ///< [B] the same for the rejected completions
  Vector<T> grad_policy_chosen;    ///< [B] d loss / d policy_chosen_logps
  Vector<T> grad_policy_rejected;  ///< [B] d loss / d policy_rejected_logps
  T grad_nll_loss = T(0);          ///< d loss / d PairInputs::nll_loss (0 when not given)
};

namespace detail {

/// ORPO's log-odds (a − b) − (log(1 − e^a) − log(1 − e^b)) as (a − b) + log(expm1(b)/expm1(a)),
/// exact near 0 and never saturating for very negative means, with inputs clamped to
/// ≤ −1e-37 (float) / −1e-300 (double); returns {log_odds, d/da, d/db} (0 where clamped):
/// d/da = 1 − e^a/expm1(a), d/db = −1 + e^b/expm1(b).
template <typename T>
std::array<T, 3> orpo_log_odds(T a, T b) {
  const T tiny = std::is_same<T, double>::value ? static_cast<T>(-1e-300) : static_cast<T>(-1e-37);
  const T ac = std::min(a, tiny), bc = std::min(b, tiny);
  const T ea = std::expm1(ac), eb = std::expm1(bc);
  const T lo = (ac - bc) + std::log(eb / ea);
  const T da = a <= tiny ? T(1) - std::exp(ac) / ea : T(0);
  const T db = b <= tiny ? T(-1) + std::exp(bc) / eb : T(0);
  return {lo, da, db};
}

}  // namespace detail

/// ORPO (arXiv:2403.07691) on per-token mean log-probs ā and its gradient, as
/// `prefopt::functional::orpo_loss` computes it.
///
/// `log_odds = (ā_c − ā_r) − (log(1 − e^{ā_c}) − log(1 − e^{ā_r}))`,
/// `loss = NLL − λ · mean(log σ(log_odds))`.
///
/// The log(1 − e^a) difference is log(expm1(ā_r)/expm1(ā_c)): finite values and gradients for
/// confident completions (ā → 0⁻), exact log-odds for very unlikely ones (ā = −800); ā ≥ 0 is
/// moved just below 0 (zero gradient through the log-odds there).
///
/// - `inputs.policy_*_logps`: [B] per-token means (native form; sums are converted).
/// - `inputs.chosen_lengths` (token-mean NLL) or `inputs.nll_loss`.
/// - `inputs.reference_*_logps`: not read (ORPO is reference-free); given, they warn.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::orpo_loss(prefopt::eigen::PairInputs<double>::averaged(policy));
/// ```
template <typename T>
ORPOLossResult<T> orpo_loss(const PairInputs<T>& in, const ORPOLossOptions& o = {}) {
  detail::check_scalar<T>();
  constexpr const char* fn = "prefopt::eigen::orpo_loss";
  detail::check_beta(fn, o.beta());
  detail::check_nll_normalization(fn, o.nll_normalization());
  detail::check_reduction(fn, o.reduction());
  detail::check(!in.weights().has_value(), fn,
                ": per-pair weights are a DPO-family input; got weights");
  const Eigen::Index B = detail::check_pair_inputs(fn, in, /*needs_reference=*/false);
  // Legal, but what no term reads would train with nothing changed: a warning each, as in the
  // libtorch layer.
  if (in.nll_loss().has_value() && o.nll_normalization() != ORPOLossOptions().nll_normalization()) {
    detail::warn_once(detail::str(fn, "/unread_nll_normalization"),
                      detail::str(fn, ": nll_normalization = NLLNormalization::kSequenceMean is ",
                                  "not read when nll_loss is given (the NLL term is the host's): ",
                                  "it is ignored"));
  }
  if (in.reference_chosen_logps().has_value() || in.reference_rejected_logps().has_value()) {
    detail::warn_once(detail::str(fn, "/unread_reference"),
                      detail::str(fn, ": the reference log-probs are given but no term reads ",
                                  "them (ORPO is reference-free): they are ignored"));
  }
  const auto lp = detail::form_logps(fn, "orpo", in, LogpsForm::kMean);
  const Vector<T>& c = lp.policy_chosen;
  const Vector<T>& r = lp.policy_rejected;
  const T beta = static_cast<T>(o.beta());
  Vector<T> log_odds(B), ratio(B), dc(B), dr(B);  // dc, dr: d ratio / d ā
  for (Eigen::Index b = 0; b < B; ++b) {
    const auto [lo, da, db] = detail::orpo_log_odds(c(b), r(b));
    log_odds(b) = lo;
    ratio(b) = detail::log_sigmoid(lo);
    const T dratio = detail::log_sigmoid_grad(lo);
    dc(b) = dratio * da;
    dr(b) = dratio * db;
  }
  // Per pair with the sequence mean (LLaMA-Factory's per-pair loss), the batch scalar else.
  const auto nll =
      detail::chosen_nll(fn, in, c, LogpsForm::kMean, o.nll_normalization(), /*per_pair=*/true);
  ORPOLossResult<T> res;
  res.losses = (nll.per_pair ? nll.seq : Vector<T>::Constant(B, nll.value)) - ratio * beta;
  res.loss = detail::reduce<T>(res.losses, o.reduction());
  const T scale = detail::reduction_scale<T>(o.reduction(), B);
  Vector<T> gc = -(dc * beta) * scale;
  const Vector<T> gr = -(dr * beta) * scale;
  if (nll.per_pair) {
    gc += nll.dlogps * scale;
  } else {
    const T g = scale * static_cast<T>(B);  // every pair carries the batch's NLL
    gc += nll.dlogps * g;
    if (nll.given) res.grad_nll_loss = g;
  }
  res.chosen_rewards = c * beta;
  res.rejected_rewards = r * beta;
  res.log_odds_ratio = ratio;
  res.log_odds_chosen = log_odds;
  res.nll_loss = nll.per_pair ? detail::mean_or_zero<T>(nll.seq) : nll.value;
  res.chosen_logps = c;
  res.rejected_logps = r;
  res.grad_policy_chosen = gc.cwiseProduct(lp.jac_chosen);
  res.grad_policy_rejected = gr.cwiseProduct(lp.jac_rejected);
  return res;
}

}  // namespace eigen
PREFOPT_END_NAMESPACE
