// SPDX-License-Identifier: Apache-2.0
// TPO (Triple Preference Optimization): a reference-free preference loss on the policy margin
// plus the NLL of a third, gold response, as TRL's experimental TPOTrainer (TRL ≥ 1.3).
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_TPO
#endif

#include <prefopt/losses/cpo.h>

#include <string>

PREFOPT_BEGIN_NAMESPACE

/// TRL's name of a TPO loss type (`"sigmoid"`, `"tpo-l"`, ...).
PREFOPT_API const char* tpo_loss_type_name(TPOLossType type);
/// The TPO loss type TRL calls `name`; a TORCH_CHECK_VALUE for anything else.
PREFOPT_API TPOLossType tpo_loss_type_from_name(const std::string& name);

/// Options of `functional::tpo_loss`; defaults are TRL `TPOConfig`'s (1.3 and later).
///
/// Example:
/// ```
/// auto opts = prefopt::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL).beta(0.01);
/// ```
struct TPOLossOptions {
  TPOLossOptions() = default;
  /// Lets a reduction tag stand for the options.
  template <typename R, typename = detail::if_reduction_tag<R>>
  TPOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// The loss. Default: kSigmoid.
  TORCH_ARG(TPOLossType, loss_type) = TPOLossType::kSigmoid;
  /// β > 0 (τ of ipo). Default: 0.01.
  TORCH_ARG(double, beta) = 0.01;
  /// ε ∈ [0, 0.5) for sigmoid and tpo-l. TRL warns and ignores it for hinge and ipo; here a
  /// non-zero ε with those is an error. Default: 0.
  TORCH_ARG(double, label_smoothing) = 0.0;
  /// Weight of the gold response's NLL (0: no NLL term, and no gold input needed; negative:
  /// a warning). Default: 1.
  TORCH_ARG(double, tpo_alpha) = 1.0;
  /// γ of tpo-l (an absolute margin: the sigmoid sees βΔ − γ). Read by tpo-l only: another
  /// value than 0.5 with another type warns that it is ignored. Default: 0.5.
  TORCH_ARG(double, tpo_l_gamma) = 0.5;
  /// Reduction of the per-pair preference losses. Default: torch::kMean (TRL).
  TORCH_ARG(LossReduction, reduction) = torch::kMean;
};

/// Result of `functional::tpo_loss`: `loss = reduce(losses) + tpo_alpha·nll_loss`, rewards
/// β·s (no reference, no γ; s in the loss's form, as TRL logs them), `nll_loss` the gold
/// response's token-mean NLL. CPO's fields in a type of its own, so that
/// `MetricAccumulator::add` logs what TRL's TPOTrainer logs (no `nll_loss`; `entropy` over
/// the gold responses too).
struct TPOLossResult : CPOLossResult {};

namespace functional {

/// The options of the functional form (`TPOLossOptions`, as libtorch names them).
using TPOLossFuncOptions = TPOLossOptions;

/// TPO of B triples (prompt, chosen, rejected, gold) as TRL's TPOTrainer computes it
/// (Saeidi et al. 2024, "Triple Preference Optimization"):
///
/// `loss = mean_b(pref_b) + tpo_alpha · NLL_gold`, with `pref_b` per `TPOLossType` and
/// `NLL_gold = −Σ_b gold.sum_b / Σ_b gold.count_b`, the cross-entropy averaged over every gold
/// completion token of the batch (0 when there are none, where TRL gives NaN).
///
/// - `inputs.policy_*_logps`: [B]; native form sums for sigmoid and hinge, per-token means for
///   ipo and tpo-l (the other form is converted with the lengths); differentiable.
/// - `gold`: the policy's `SequenceLogprobs` of the B gold responses (`sum` and `count`; `sum`
///   differentiable). With `tpo_alpha = 0` nothing reads them: they are ignored, with a
///   warning.
/// - `inputs.reference_*_logps`: not read (TPO is reference-free); given, they are checked
///   and ignored with a warning.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto pair = F::split_pairs(F::gather_logprobs(logits, labels));  // rows [chosen; rejected]
/// auto gold = F::gather_logprobs(gold_logits, gold_labels);       // the B gold responses
/// auto r = F::tpo_loss(prefopt::PairInputs(pair), gold);
/// ```
PREFOPT_API TPOLossResult tpo_loss(const PairInputs& inputs, const SequenceLogprobs& gold,
                                   const TPOLossFuncOptions& options = {});

/// TPO with the gold NLL given as `inputs.nll_loss` (a scalar the host computed); it may be
/// undefined only with `tpo_alpha = 0`.
PREFOPT_API TPOLossResult tpo_loss(const PairInputs& inputs,
                                   const TPOLossFuncOptions& options = {});

}  // namespace functional

/// Functor form of `functional::tpo_loss`.
///
/// Example:
/// ```
/// const prefopt::TPOLoss tpo(prefopt::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL));
/// auto r = tpo(prefopt::PairInputs(pair), gold);
/// ```
class TPOLoss {
 public:
  /// A TPO loss with `options`.
  explicit TPOLoss(TPOLossOptions options = {}) : options_(std::move(options)) {}
  /// `functional::tpo_loss(inputs, gold, options())`.
  TPOLossResult operator()(const PairInputs& inputs, const SequenceLogprobs& gold) const {
    return functional::tpo_loss(inputs, gold, options_);
  }
  /// `functional::tpo_loss(inputs, options())` (the gold NLL in `inputs.nll_loss`).
  TPOLossResult operator()(const PairInputs& inputs) const {
    return functional::tpo_loss(inputs, options_);
  }
  /// The options the functor was made with.
  const TPOLossOptions& options() const noexcept { return options_; }

 private:
  TPOLossOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_TPO
#undef PREFOPT_OUTERMOST_LOSSES_TPO
#include <prefopt/detail/header_only.h>
#endif
