// SPDX-License-Identifier: Apache-2.0
// ORPO: the odds-ratio preference term with a stable log(1 − p), plus the chosen NLL.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_ORPO
#endif

#include <prefopt/losses/common.h>

PREFOPT_BEGIN_NAMESPACE

/// Options of `functional::orpo_loss`.
///
/// Example:
/// ```
/// auto opts = prefopt::ORPOLossOptions().beta(0.1);
/// ```
struct ORPOLossOptions {
  ORPOLossOptions() = default;
  /// Lets a reduction tag stand for the options.
  template <typename R, typename = detail::if_reduction_tag<R>>
  ORPOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// λ, the weight of the odds-ratio term (TRL calls it `beta`). Must be > 0. Default: 0.1.
  TORCH_ARG(double, beta) = 0.1;
  /// The NLL term when `PairInputs::nll_loss` is not given: kTokenMean over the chosen
  /// completion tokens (Liger; needs `chosen_lengths`) or kSequenceMean, −mean(ā_c)
  /// (LLaMA-Factory). TRL's NLL also covers the prompt: compute it with the gathering op on
  /// prompt + completion labels and pass it as `nll_loss`, which this option does not read
  /// (kSequenceMean with `nll_loss` warns that it is ignored). Default: kTokenMean.
  TORCH_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Reduction of the per-pair losses. Default: torch::kMean.
  TORCH_ARG(LossReduction, reduction) = torch::kMean;
};

/// Result of `functional::orpo_loss`.
struct ORPOLossResult {
  at::Tensor loss;    ///< reduce(losses) = NLL − λ·mean(log σ(log_odds)) with kMean
  at::Tensor losses;  ///< [B] NLL_b − λ·log σ(log_odds_b) (NLL_b: per pair or the batch's)
  at::Tensor chosen_rewards;    ///< [B] λ·ā_c, detached
  at::Tensor rejected_rewards;  ///< [B] λ·ā_r, detached
  at::Tensor log_odds_ratio;    ///< [B] log σ(log_odds), detached (TRL logs its mean)
  at::Tensor log_odds_chosen;   ///< [B] log_odds, detached (TRL logs its mean)
  at::Tensor nll_loss;          ///< 0-dim NLL term, detached (0 for an empty batch)
  at::Tensor chosen_logps;      ///< [B] per-token mean log-probs the loss consumed, detached
  at::Tensor rejected_logps;    ///< [B] the same for the rejected completions
};

namespace functional {

/// The options of the functional form (`ORPOLossOptions`, as libtorch names them).
using ORPOLossFuncOptions = ORPOLossOptions;

/// ORPO (arXiv:2403.07691) on per-token mean log-probs ā (`PairInputs::averaged`).
///
/// `log_odds = (ā_c − ā_r) − (log(1 − e^{ā_c}) − log(1 − e^{ā_r}))`,
/// `loss = NLL − λ · mean(log σ(log_odds))`.
///
/// The log(1 − e^a) difference is computed in fp32 (fp64 for fp64) as
/// log(expm1(ā_r) / expm1(ā_c)): expm1 is exact near 0, where the naive log1p(−exp(a)) of
/// LLaMA-Factory and Liger cancels, so confident completions (ā → 0⁻, e.g. −1e-8) give finite
/// values and gradients (trl#2564), and the quotient of two numbers in (−1, 0) never
/// saturates, so very unlikely completions (ā = −800) keep their exact log-odds. ā ≥ 0 (e.g. an
/// empty completion's mean of 0) is moved just below 0 instead of producing inf.
///
/// - `inputs.policy_*_logps`: [B] per-token mean log-probs (native form; sums are converted
///   with the lengths); differentiable.
/// - `inputs.chosen_lengths` (token-mean NLL) or `inputs.nll_loss`.
/// - `inputs.reference_*_logps`: not read (ORPO is reference-free); given, they are checked
///   and ignored with a warning.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto r = F::orpo_loss(prefopt::PairInputs::averaged(policy));
/// ```
PREFOPT_API ORPOLossResult orpo_loss(const PairInputs& inputs,
                                     const ORPOLossFuncOptions& options = {});

}  // namespace functional

/// Functor form of `functional::orpo_loss`.
///
/// Example:
/// ```
/// prefopt::ORPOLoss orpo(prefopt::ORPOLossOptions().beta(0.2));
/// auto r = orpo(prefopt::PairInputs::averaged(policy));
/// ```
class ORPOLoss {
 public:
  /// An ORPO loss with `options`.
  explicit ORPOLoss(ORPOLossOptions options = {}) : options_(std::move(options)) {}
  /// `functional::orpo_loss(inputs, options())`.
  ORPOLossResult operator()(const PairInputs& inputs) const {
    return functional::orpo_loss(inputs, options_);
  }
  /// The options the functor was made with.
  const ORPOLossOptions& options() const noexcept { return options_; }

 private:
  ORPOLossOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_ORPO
#undef PREFOPT_OUTERMOST_LOSSES_ORPO
#include <prefopt/detail/header_only.h>
#endif
