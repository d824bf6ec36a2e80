// SPDX-License-Identifier: Apache-2.0
// Reference-free pairwise losses: CPO (sigmoid, hinge, ipo), SimPO and AlphaPO, with the
// optional NLL term on the chosen completions.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_CPO
#endif

#include <prefopt/losses/common.h>

#include <string>

PREFOPT_BEGIN_NAMESPACE

/// TRL's name of a CPO loss type (`"sigmoid"`, `"simpo"`, ...).
PREFOPT_API const char* cpo_loss_type_name(CPOLossType type);
/// The CPO loss type TRL calls `name`; a TORCH_CHECK_VALUE for anything else.
PREFOPT_API CPOLossType cpo_loss_type_from_name(const std::string& name);

/// Options of `functional::cpo_loss`; defaults are TRL `CPOConfig`'s.
///
/// Example:
/// ```
/// auto opts = prefopt::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO).cpo_alpha(0);
/// ```
struct CPOLossOptions {
  CPOLossOptions() = default;
  /// Lets a reduction tag stand for the options.
  template <typename R, typename = detail::if_reduction_tag<R>>
  CPOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// The loss. Default: kSigmoid.
  TORCH_ARG(CPOLossType, loss_type) = CPOLossType::kSigmoid;
  /// β > 0. Default: 0.1.
  TORCH_ARG(double, beta) = 0.1;
  /// ε ∈ [0, 0.5) for sigmoid/simpo/alphapo; hinge and ipo do not take it (an error when set).
  /// Default: 0.
  TORCH_ARG(double, label_smoothing) = 0.0;
  /// SimPO's target margin γ (an absolute margin: the sigmoid sees βm − γ). Read by simpo and
  /// alphapo only: another value than 0.5 with sigmoid, hinge or ipo warns that it is ignored.
  /// Default: 0.5.
  TORCH_ARG(double, simpo_gamma) = 0.5;
  /// Weight of the NLL of the chosen completions added to the loss (CPO's BC term; TRL's
  /// simpo includes it by default, the SimPO paper does not). Not read by kAlphaPO (TRL's
  /// alphapo sets it to 0): another value than 1 with it warns that it is ignored. A negative
  /// weight warns. Default: 1.0.
  TORCH_ARG(double, cpo_alpha) = 1.0;
  /// AlphaPO's α: with α ≠ 0 every log-prob is first mapped to r = (1 − e^{−α·logp})/α.
  /// Default: 0.
  TORCH_ARG(double, alpha) = 0.0;
  /// Averaging of the NLL term. Not read without one (cpo_alpha = 0, alphapo) nor when
  /// `PairInputs::nll_loss` is given: kSequenceMean then warns that it is ignored.
  /// Default: kTokenMean (TRL, Liger).
  TORCH_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: torch::kMean.
  TORCH_ARG(LossReduction, reduction) = torch::kMean;
};

/// Options of `functional::simpo_loss`: the SimPO paper's (and torchtune's) defaults, no NLL.
///
/// Example:
/// ```
/// auto opts = prefopt::SimPOLossOptions().beta(2.5).simpo_gamma(1.4);
/// ```
struct SimPOLossOptions {
  SimPOLossOptions() = default;
  /// Lets a reduction tag stand for the options.
  template <typename R, typename = detail::if_reduction_tag<R>>
  SimPOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// β > 0. Default: 2.0.
  TORCH_ARG(double, beta) = 2.0;
  /// Target margin γ. Default: 0.5.
  TORCH_ARG(double, simpo_gamma) = 0.5;
  /// ε ∈ [0, 0.5). Default: 0.
  TORCH_ARG(double, label_smoothing) = 0.0;
  /// NLL weight (TRL's `cpo_alpha`, Liger's `alpha`). Default: 0.
  TORCH_ARG(double, cpo_alpha) = 0.0;
  /// AlphaPO's α (0: plain SimPO). Default: 0.
  TORCH_ARG(double, alpha) = 0.0;
  /// Averaging of the NLL term. Not read with `cpo_alpha` 0 nor when `PairInputs::nll_loss`
  /// is given: kSequenceMean then warns that it is ignored. Default: kTokenMean.
  TORCH_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: torch::kMean.
  TORCH_ARG(LossReduction, reduction) = torch::kMean;
};

/// Result of `functional::cpo_loss` and `functional::simpo_loss`.
struct CPOLossResult {
  at::Tensor loss;              ///< reduce(losses) + cpo_alpha·NLL
  at::Tensor losses;            ///< [B] per-pair preference loss (NLL excluded)
  at::Tensor chosen_rewards;    ///< [B] β·s_c (β·r_c with α ≠ 0), detached
  at::Tensor rejected_rewards;  ///< [B] β·s_r, detached
  at::Tensor nll_loss;          ///< the NLL term before its weight (detached); undefined if unused
  at::Tensor chosen_logps;    ///< [B] policy log-probs the loss consumed (sums or means), detached
  at::Tensor rejected_logps;  ///< [B] the same for the rejected completions
};

namespace functional {

/// The options of the functional form (`CPOLossOptions`, as libtorch names them).
using CPOLossFuncOptions = CPOLossOptions;
/// The options of the functional form (`SimPOLossOptions`, as libtorch names them).
using SimPOLossFuncOptions = SimPOLossOptions;

/// CPO / SimPO / AlphaPO loss of B pairs, reference-free (arXiv:2401.08417, 2405.14734,
/// 2501.03884).
///
/// `loss = reduce(losses) + cpo_alpha·NLL`, e.g. SimPO: `losses = −log σ(β(ā_c − ā_r) − γ)`.
///
/// - `inputs.policy_*_logps`: [B]; native form sums for sigmoid and hinge, per-token means for
///   ipo, simpo and alphapo (`PairInputs::averaged`), as TRL's CPOTrainer feeds them; the other
///   form is converted with the lengths. bf16/fp16 computed in fp32; differentiable.
/// - `inputs.chosen_lengths`: [B] token counts, needed for the token-mean NLL (or pass
///   `inputs.nll_loss`).
/// - `inputs.reference_*_logps`: not read (the loss is reference-free); given, they are
///   checked and ignored with a warning.
///
/// Returns `CPOLossResult` {loss, losses, chosen_rewards, rejected_rewards, nll_loss,
/// chosen_logps, rejected_logps}.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto r = F::cpo_loss(prefopt::PairInputs(policy));   // sigmoid CPO + NLL
/// ```
PREFOPT_API CPOLossResult cpo_loss(const PairInputs& inputs,
                                   const CPOLossFuncOptions& options = {});

/// SimPO (AlphaPO with α ≠ 0) on per-token mean log-probs `[B]` (these two tensors are taken as
/// means):
/// `losses = −(1−ε)ℓ(β(ā_c − ā_r) − γ) − εℓ(γ − β(ā_c − ā_r))`, plus `cpo_alpha`·NLL.
///
/// Example:
/// ```
/// auto r = F::simpo_loss(pair.chosen.mean, pair.rejected.mean);  // β = 2, γ = 0.5
/// ```
PREFOPT_API CPOLossResult simpo_loss(const at::Tensor& policy_chosen_logps,
                                     const at::Tensor& policy_rejected_logps,
                                     const SimPOLossFuncOptions& options = {});

/// SimPO on `PairInputs` (needed for the NLL term: lengths or `nll_loss`).
PREFOPT_API CPOLossResult simpo_loss(const PairInputs& inputs,
                                     const SimPOLossFuncOptions& options = {});

}  // namespace functional

/// Functor form of `functional::cpo_loss`.
///
/// Example:
/// ```
/// prefopt::CPOLoss cpo(prefopt::CPOLossOptions().loss_type(prefopt::CPOLossType::kHinge));
/// auto r = cpo(prefopt::PairInputs(policy));
/// ```
class CPOLoss {
 public:
  /// A CPO loss with `options`.
  explicit CPOLoss(CPOLossOptions options = {}) : options_(std::move(options)) {}
  /// `functional::cpo_loss(inputs, options())`.
  CPOLossResult operator()(const PairInputs& inputs) const {
    return functional::cpo_loss(inputs, options_);
  }
  /// The options the functor was made with.
  const CPOLossOptions& options() const noexcept { return options_; }

 private:
  CPOLossOptions options_;
};

/// Functor form of `functional::simpo_loss`.
///
/// Example:
/// ```
/// prefopt::SimPOLoss simpo;
/// auto r = simpo(pair.chosen.mean, pair.rejected.mean);
/// ```
class SimPOLoss {
 public:
  /// A SimPO loss with `options`.
  explicit SimPOLoss(SimPOLossOptions options = {}) : options_(std::move(options)) {}
  /// `functional::simpo_loss` on two per-token mean log-prob vectors.
  CPOLossResult operator()(const at::Tensor& policy_chosen_logps,
                           const at::Tensor& policy_rejected_logps) const {
    return functional::simpo_loss(policy_chosen_logps, policy_rejected_logps, options_);
  }
  /// `functional::simpo_loss(inputs, options())`.
  CPOLossResult operator()(const PairInputs& inputs) const {
    return functional::simpo_loss(inputs, options_);
  }
  /// The options the functor was made with.
  const SimPOLossOptions& options() const noexcept { return options_; }

 private:
  SimPOLossOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_CPO
#undef PREFOPT_OUTERMOST_LOSSES_CPO
#include <prefopt/detail/header_only.h>
#endif
