// SPDX-License-Identifier: Apache-2.0
// Reference-free pairwise losses on Eigen vectors, with closed-form gradients: CPO (sigmoid,
// hinge, ipo), SimPO and AlphaPO, with the optional NLL term on the chosen completions.
//
// Mirrors include/prefopt/losses/cpo.h and `cpo_impl` in include/prefopt/losses/cpo-inl.h (the
// reference this layer is tested against, in tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// Options of `eigen::cpo_loss`: the libtorch layer's `CPOLossOptions` (TRL `CPOConfig`'s
/// defaults).
///
/// Example:
/// ```
/// auto o = prefopt::eigen::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO).cpo_alpha(0);
/// ```
struct CPOLossOptions {
  /// The defaults.
  CPOLossOptions() = default;
  /// Lets a reduction stand for the options.
  CPOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)
  /// The loss. Default: kSigmoid.
  PREFOPT_EIGEN_ARG(CPOLossType, loss_type) = CPOLossType::kSigmoid;
  /// β > 0. Default: 0.1.
  PREFOPT_EIGEN_ARG(double, beta) = 0.1;
  /// ε ∈ [0, 0.5) for sigmoid/simpo/alphapo; hinge and ipo do not take it (an error when set).
  /// Default: 0.
  PREFOPT_EIGEN_ARG(double, label_smoothing) = 0.0;
  /// SimPO's target margin γ (the sigmoid sees βm − γ). Read by simpo and alphapo only:
  /// another value than 0.5 with sigmoid, hinge or ipo warns. Default: 0.5.
  PREFOPT_EIGEN_ARG(double, simpo_gamma) = 0.5;
  /// Weight of the chosen NLL added to the loss (CPO's BC term; TRL's simpo includes it). Not
  /// read by kAlphaPO: another value than 1 with it warns. Default: 1.0.
  PREFOPT_EIGEN_ARG(double, cpo_alpha) = 1.0;
  /// AlphaPO's α: with α ≠ 0 every log-prob is first mapped to r = (1 − e^{−α·logp})/α.
  /// Default: 0.
  PREFOPT_EIGEN_ARG(double, alpha) = 0.0;
  /// Averaging of the NLL term. Not read without one (cpo_alpha = 0, alphapo) nor when
  /// `PairInputs::nll_loss` is given: kSequenceMean then warns. Default: kTokenMean.
  PREFOPT_EIGEN_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: kMean.
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;
};

/// Options of `eigen::simpo_loss`: the SimPO paper's (and torchtune's) defaults, no NLL.
///
/// Example:
/// ```
/// auto o = prefopt::eigen::SimPOLossOptions().beta(2.5).simpo_gamma(1.4);
/// ```
struct SimPOLossOptions {
  /// The defaults.
  SimPOLossOptions() = default;
  /// Lets a reduction stand for the options.
  SimPOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)
  /// β > 0. Default: 2.0.
  PREFOPT_EIGEN_ARG(double, beta) = 2.0;
  /// Target margin γ. Default: 0.5.
  PREFOPT_EIGEN_ARG(double, simpo_gamma) = 0.5;
  /// ε ∈ [0, 0.5). Default: 0.
  PREFOPT_EIGEN_ARG(double, label_smoothing) = 0.0;
  /// NLL weight (TRL's `cpo_alpha`, Liger's `alpha`). Default: 0.
  PREFOPT_EIGEN_ARG(double, cpo_alpha) = 0.0;
  /// AlphaPO's α (0: plain SimPO). Default: 0.
  PREFOPT_EIGEN_ARG(double, alpha) = 0.0;
  /// Averaging of the NLL term. Not read with `cpo_alpha` 0 nor when `PairInputs::nll_loss`
  /// is given: kSequenceMean then warns. Default: kTokenMean.
  PREFOPT_EIGEN_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: kMean.
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;
};

/// Result of `eigen::cpo_loss`, `eigen::simpo_loss` and `eigen::tpo_loss`: the libtorch
/// layer's `CPOLossResult` plus the gradients of `loss` (of the sum of its entries with
/// Reduction::kNone) with respect to the input vectors as given.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::cpo_loss(in);
/// double L = r.loss(0);  // r.grad_policy_chosen, r.grad_policy_rejected
/// ```
template <typename T>
struct CPOLossResult {
  Vector<T> loss;  ///< [1] reduce(losses) + cpo_alpha·NLL, or [B] losses + cpo_alpha·NLL (kNone)
  Vector<T> losses;                ///< [B] per-pair preference loss (NLL excluded)
  Vector<T> chosen_rewards;        ///< [B] β·s_c (β·r_c with α ≠ 0)
  Vector<T> rejected_rewards;      ///< [B] β·s_r
  std::optional<T> nll_loss;       ///< the NLL term before its weight; empty if unused
  Vector<T> chosen_logps;          ///< [B] policy log-probs the loss consumed (sums or means)
  Vector<T> rejected_logps;        ///< [B] the same for the rejected completions
  Vector<T> grad_policy_chosen;    ///< [B] d loss / d policy_chosen_logps
  Vector<T> grad_policy_rejected;  ///< [B] d loss / d policy_rejected_logps
  T grad_nll_loss = T(0);          ///< d loss / d PairInputs::nll_loss (0 when it is not given)
  Vector<T> grad_gold_sum;  ///< TPO with gold log-probs: [S] d loss / d gold.sum; [0] otherwise
};

namespace detail {

/// The parameters `cpo_impl` takes from each options struct (CPO, SimPO, TPO).
struct CPOParams {
  CPOLossType type;
  double beta, eps, gamma, nll_weight, alpha;
  NLLNormalization norm;
  Reduction reduction;
  const char* name = nullptr;  // the loss's name in messages; default: the CPO type's
  // Whether γ, the NLL weight and the NLL's normalisation differ from their options struct's
  // defaults (a value that no term reads then warns).
  bool gamma_given = false, nll_weight_given = false, norm_given = false;
};

/// CPO / SimPO / AlphaPO (and TPO's types) with the gradient, as include/prefopt/losses/cpo-inl.h's
/// `cpo_impl`.
template <typename T>
CPOLossResult<T> cpo_impl(const char* fn, const PairInputs<T>& in, const CPOParams& p) {
  check_scalar<T>();
  check(prefopt::detail::is_valid(p.type), fn, ": loss_type is not a CPOLossType value (got ",
        static_cast<int>(p.type), ")");
  check_nll_normalization(fn, p.norm);
  check_beta(fn, p.beta);
  check_smoothing(fn, p.eps);
  const char* name = p.name != nullptr ? p.name : prefopt::detail::name_of(p.type);
  check(p.eps == 0 || (p.type != CPOLossType::kHinge && p.type != CPOLossType::kIPO), fn,
        ": label_smoothing = ", p.eps, " is not used by ", name, "; expected 0");
  // TPO (p.name set) calls the margin and the NLL weight tpo_l_gamma and tpo_alpha.
  const bool tpo = p.name != nullptr;
  check(std::isfinite(p.gamma), fn, ": expected a finite ", tpo ? "tpo_l_gamma" : "simpo_gamma",
        ", got ", p.gamma);
  check(std::isfinite(p.nll_weight), fn, ": expected a finite ", tpo ? "tpo_alpha" : "cpo_alpha",
        ", got ", p.nll_weight);
  check(std::isfinite(p.alpha), fn, ": expected a finite alpha, got ", p.alpha);
  // Legal, but it maximises the NLL: most likely a sign slip (AlphaPO does not read it).
  if (p.nll_weight < 0 && p.type != CPOLossType::kAlphaPO) {
    warn_once(str(fn, "/negative_nll_weight"),
              str(fn, ": ", p.name != nullptr ? "tpo_alpha" : "cpo_alpha", " = ", p.nll_weight,
                  " < 0 maximises the NLL"));
  }
  check_reduction(fn, p.reduction);
  check(!in.weights().has_value(), fn, ": per-pair weights are a DPO-family input; got weights");
  const Eigen::Index B = check_pair_inputs(fn, in, /*needs_reference=*/false);
  // Legal, but what no term reads would train with nothing changed: a warning each, as in the
  // libtorch layer (one key per function and option).
  if (p.gamma_given && !prefopt::detail::cpo_reads_gamma(p.type)) {
    warn_once(str(fn, tpo ? "/unread_tpo_l_gamma" : "/unread_simpo_gamma"),
              tpo ? str(fn, ": tpo_l_gamma = ", p.gamma, " is read by the tpo-l loss type only, ",
                        "got ", name, ": it is ignored")
                  : str(fn, ": simpo_gamma = ", p.gamma, " is read by the simpo and alphapo ",
                        "loss types only, got ", name, ": it is ignored"));
  }
  // cpo_alpha = 0 is what TRL's CPOConfig sets for alphapo: nothing to warn of.
  if (p.nll_weight_given && p.nll_weight != 0 && p.type == CPOLossType::kAlphaPO) {
    warn_once(str(fn, "/unread_cpo_alpha"),
              str(fn, ": cpo_alpha = ", p.nll_weight, " is not read by alphapo, which has no ",
                  "NLL term: it is ignored"));
  }
  const bool has_nll = p.type != CPOLossType::kAlphaPO && p.nll_weight != 0;
  if (p.norm_given && (!has_nll || in.nll_loss().has_value())) {
    // One key per reason, as for DPO: the first reason must not hide the others.
    const char* why = has_nll                           ? "given_nll_loss"
                      : p.type == CPOLossType::kAlphaPO ? "alphapo"
                                                        : "no_nll";
    warn_once(str(fn, "/unread_nll_normalization/", why),
              str(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read ",
                  has_nll ? "when nll_loss is given (the NLL term is the host's)"
                  : p.type == CPOLossType::kAlphaPO ? "by alphapo, which has no NLL term"
                                                    : "without an NLL term (cpo_alpha = 0)",
                  ": it is ignored"));
  }
  if (in.reference_chosen_logps().has_value() || in.reference_rejected_logps().has_value()) {
    warn_once(str(fn, "/unread_reference"),
              str(fn, ": the reference log-probs are given but no term reads them (",
                  tpo ? "TPO" : name, " is reference-free): they are ignored"));
  }

  // sigmoid and hinge take sums (TRL's CPO and TPO), the others per-token means.
  const bool sums = p.type == CPOLossType::kSigmoid || p.type == CPOLossType::kHinge;
  const auto native = sums ? LogpsForm::kSum : LogpsForm::kMean;
  const FormLogps<T> lp = form_logps(fn, name, in, native);
  Vector<T> c = lp.policy_chosen, r = lp.policy_rejected;
  // AlphaPO's r = (1 − p^{−α})/α = −expm1(−α·logp)/α, dr/dlogp = e^{−α·logp}.
  Vector<T> dc = Vector<T>::Ones(B), dr = Vector<T>::Ones(B);
  if (p.alpha != 0) {
    const T na = static_cast<T>(-p.alpha), inv = static_cast<T>(-1.0 / p.alpha);
    for (Eigen::Index b = 0; b < B; ++b) {
      dc(b) = std::exp(c(b) * na) * na * inv;
      dr(b) = std::exp(r(b) * na) * na * inv;
      c(b) = std::expm1(c(b) * na) * inv;
      r(b) = std::expm1(r(b) * na) * inv;
    }
  }
  const T beta = static_cast<T>(p.beta);
  const Vector<T> m = c - r;
  Vector<T> losses(B), dm(B);  // dm: d losses_b / d m_b
  for (Eigen::Index b = 0; b < B; ++b) {
    switch (p.type) {
      case CPOLossType::kSigmoid: {  // −(1−ε)ℓ(βm) − εℓ(−βm)
        const auto [v, d] = smoothed_sigmoid(m(b) * beta, p.eps);
        losses(b) = v;
        dm(b) = d * beta;
        break;
      }
      case CPOLossType::kHinge: {  // relu(1 − βm)
        const auto [v, d] = relu(T(1) - m(b) * beta);
        losses(b) = v;
        dm(b) = -d * beta;
        break;
      }
      case CPOLossType::kIPO: {  // (m − 1/(2β))²
        const T t = m(b) - static_cast<T>(1.0 / (2.0 * p.beta));
        losses(b) = t * t;
        dm(b) = T(2) * t;
        break;
      }
      case CPOLossType::kSimPO:
      case CPOLossType::kAlphaPO: {  // −(1−ε)ℓ(βm − γ) − εℓ(γ − βm)
        const auto [v, d] = smoothed_sigmoid(m(b) * beta - static_cast<T>(p.gamma), p.eps);
        losses(b) = v;
        dm(b) = d * beta;
        break;
      }
    }
  }
  CPOLossResult<T> res;
  res.losses = losses;
  res.loss = reduce<T>(losses, p.reduction);
  const T scale = reduction_scale<T>(p.reduction, B);
  Vector<T> gc = (dm * scale).cwiseProduct(dc);
  Vector<T> gr = -(dm * scale).cwiseProduct(dr);
  const double w = p.type == CPOLossType::kAlphaPO ? 0.0 : p.nll_weight;
  if (w != 0) {
    const NLL<T> nll = chosen_nll(fn, in, lp.policy_chosen, native, p.norm, /*per_pair=*/false);
    const T tw = static_cast<T>(w);
    res.loss =
        res.loss + Vector<T>::Constant(res.loss.size(), w == 1.0 ? nll.value : nll.value * tw);
    // With kNone each of the B entries carries the NLL term: Σ differentiates it B times.
    const T g = tw * static_cast<T>(p.reduction == Reduction::kNone ? B : 1);
    gc += nll.dlogps * g;
    if (nll.given) res.grad_nll_loss = g;
    res.nll_loss = nll.value;
  } else if (in.nll_loss()) {  // a host's NLL that neither the loss nor the result takes
    const char* why = p.name != nullptr                 ? "tpo_alpha = 0"
                      : p.type == CPOLossType::kAlphaPO ? "alphapo has no NLL term"
                                                        : "cpo_alpha = 0";
    // One key per reason, as the libtorch layer has one warning site per reason.
    warn_once(str(fn, "/unread_nll/", why),
              str(fn, ": nll_loss is given but no term reads it (", why, "): it is ignored"));
  }
  res.chosen_rewards = c * beta;
  res.rejected_rewards = r * beta;
  res.chosen_logps = lp.policy_chosen;
  res.rejected_logps = lp.policy_rejected;
  res.grad_policy_chosen = gc.cwiseProduct(lp.jac_chosen);
  res.grad_policy_rejected = gr.cwiseProduct(lp.jac_rejected);
  res.grad_gold_sum.resize(0);
  return res;
}

}  // namespace detail

/// CPO / SimPO / AlphaPO loss of B pairs and its gradient, reference-free (arXiv:2401.08417,
/// 2405.14734, 2501.03884), as `prefopt::functional::cpo_loss` computes it.
///
/// `loss = reduce(losses) + cpo_alpha·NLL`, e.g. SimPO: `losses = −log σ(β(ā_c − ā_r) − γ)`.
///
/// - `inputs.policy_*_logps`: [B]; native form sums for sigmoid and hinge, per-token means for
///   ipo, simpo and alphapo (`PairInputs::averaged`); the other form is converted.
/// - `inputs.chosen_lengths`: needed for the token-mean NLL (or pass `inputs.nll_loss`).
/// - `inputs.reference_*_logps`: not read (reference-free); given, they warn.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::cpo_loss(prefopt::eigen::PairInputs<double>(policy));  // CPO + NLL
/// ```
template <typename T>
CPOLossResult<T> cpo_loss(const PairInputs<T>& inputs, const CPOLossOptions& o = {}) {
  const CPOLossOptions defaults;
  return detail::cpo_impl<T>(
      "prefopt::eigen::cpo_loss", inputs,
      {o.loss_type(), o.beta(), o.label_smoothing(), o.simpo_gamma(), o.cpo_alpha(), o.alpha(),
       o.nll_normalization(), o.reduction(), nullptr, o.simpo_gamma() != defaults.simpo_gamma(),
       o.cpo_alpha() != defaults.cpo_alpha(),
       o.nll_normalization() != defaults.nll_normalization()});
}

/// SimPO (AlphaPO with α ≠ 0) on `PairInputs` (lengths or `nll_loss` for the NLL term):
/// `losses = −(1−ε)ℓ(β(ā_c − ā_r) − γ) − εℓ(γ − β(ā_c − ā_r))`, plus `cpo_alpha`·NLL.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::simpo_loss(prefopt::eigen::PairInputs<float>::averaged(policy));
/// ```
template <typename T>
CPOLossResult<T> simpo_loss(const PairInputs<T>& inputs, const SimPOLossOptions& o = {}) {
  // SimPO reads its γ and NLL weight; only the normalisation can go unread (no NLL term).
  const bool norm_given = o.nll_normalization() != SimPOLossOptions().nll_normalization();
  return detail::cpo_impl<T>(
      "prefopt::eigen::simpo_loss", inputs,
      {CPOLossType::kSimPO, o.beta(), o.label_smoothing(), o.simpo_gamma(), o.cpo_alpha(),
       o.alpha(), o.nll_normalization(), o.reduction(), nullptr, false, false, norm_given});
}

/// SimPO on two [B] vectors of per-token mean log-probs.
///
/// Example:
/// ```
/// auto r = prefopt::eigen::simpo_loss<float>(pair.chosen.mean, pair.rejected.mean);  // β = 2
/// ```
template <typename T>
CPOLossResult<T> simpo_loss(const Vector<T>& policy_chosen_logps,
                            const Vector<T>& policy_rejected_logps,
                            const SimPOLossOptions& options = {}) {
  return simpo_loss(PairInputs<T>()
                        .policy_chosen_logps(policy_chosen_logps)
                        .policy_rejected_logps(policy_rejected_logps)
                        .logps_form(LogpsForm::kMean),
                    options);
}

}  // namespace eigen
PREFOPT_END_NAMESPACE
