// SPDX-License-Identifier: Apache-2.0
// KTO on unpaired desirable/undesirable completions, and APO-zero's unpaired form.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_KTO
#endif

#include <prefopt/losses/common.h>

#include <string>

PREFOPT_BEGIN_NAMESPACE

/// TRL's name of a KTO loss type.
PREFOPT_API const char* kto_loss_type_name(KTOLossType type);
/// The KTO loss type TRL calls `name`; a TORCH_CHECK_VALUE for anything else.
PREFOPT_API KTOLossType kto_loss_type_from_name(const std::string& name);

/// The tensors of a KTO batch: the desirable ("chosen", N_d of them) and undesirable
/// ("rejected", N_u) examples' summed completion log-probs under the policy and the reference,
/// and the KL estimate's mismatched completions (TRL rotates completions by one within the
/// micro-batch). Either side may be empty ([0]).
///
/// Example:
/// ```
/// auto in = prefopt::KTOInputs().policy_chosen_logps(pd).policy_rejected_logps(pu)
///               .reference_chosen_logps(rd).reference_rejected_logps(ru)
///               .policy_KL_logps(pkl).reference_KL_logps(rkl);
/// ```
struct KTOInputs {
  /// [N_d] policy log-probs of the desirable completions (differentiable).
  TORCH_ARG(at::Tensor, policy_chosen_logps);
  /// [N_u] policy log-probs of the undesirable completions (differentiable).
  TORCH_ARG(at::Tensor, policy_rejected_logps);
  /// [N_d] reference log-probs of the desirable completions.
  TORCH_ARG(at::Tensor, reference_chosen_logps);
  /// [N_u] reference log-probs of the undesirable completions.
  TORCH_ARG(at::Tensor, reference_rejected_logps);
  /// [M] policy log-probs of the mismatched (prompt, completion) pairs of the KL estimate.
  TORCH_ARG(at::Tensor, policy_KL_logps);
  /// [M] reference log-probs of the same mismatched pairs.
  TORCH_ARG(at::Tensor, reference_KL_logps);
  /// The KL estimate itself (0-dim), used instead of the KL log-probs: e.g. the mean over all
  /// ranks (distributed helpers). Clamped at 0 and detached like the local estimate. Where
  /// both are given, `kl` decides and the KL log-probs are not read (the usual distributed
  /// step: `inputs.kl(F::kto_kl(pkl, rkl, group))` on inputs that hold the local ones).
  TORCH_ARG(at::Tensor, kl);
};

/// Options of `functional::kto_loss`; defaults are TRL `KTOConfig`'s.
///
/// Example:
/// ```
/// auto opts = prefopt::KTOLossOptions().beta(0.1).desirable_weight(1.33);
/// ```
struct KTOLossOptions {
  KTOLossOptions() = default;
  /// Lets a reduction tag stand for the options.
  template <typename R, typename = detail::if_reduction_tag<R>>
  KTOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// The loss. Default: kKTO.
  TORCH_ARG(KTOLossType, loss_type) = KTOLossType::kKTO;
  /// β > 0. Default: 0.1.
  TORCH_ARG(double, beta) = 0.1;
  /// Weight of each desirable example's loss (≥ 0). Default: 1.
  TORCH_ARG(double, desirable_weight) = 1.0;
  /// Weight of each undesirable example's loss (≥ 0). Default: 1.
  TORCH_ARG(double, undesirable_weight) = 1.0;
  /// Reduction over the N_d + N_u weighted losses (kMean over none gives 0). Default: kMean.
  TORCH_ARG(LossReduction, reduction) = torch::kMean;
};

/// Result of `functional::kto_loss`.
struct KTOLossResult {
  at::Tensor loss;              ///< reduced loss
  at::Tensor losses;            ///< [N_d + N_u] weighted losses, desirable first
  at::Tensor chosen_rewards;    ///< [N_d] β·ρ of the desirable examples, detached
  at::Tensor rejected_rewards;  ///< [N_u] β·ρ of the undesirable examples, detached
  at::Tensor kl;  ///< 0-dim z = max(0, mean(π_KL − ref_KL)), detached (0 without KL)
};

namespace functional {

/// The options of the functional form (`KTOLossOptions`, as libtorch names them).
using KTOLossFuncOptions = KTOLossOptions;

/// KTO (arXiv:2402.01306) as TRL computes it, with ρ = logp_policy − logp_reference:
///
/// `losses = [w_d·(1 − σ(β(ρ_d − z))), w_u·(1 − σ(β(z − ρ_u)))]`, `loss = mean(losses)`,
/// `z = max(0, mean(policy_KL − reference_KL))`, detached (0, with a warning, when the kto type
/// gets no KL input).
///
/// - log-probs: [N] sums, any floating dtype (fp32 compute, fp64 for fp64); N may be 0.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto r = F::kto_loss(prefopt::KTOInputs().policy_chosen_logps(pd) /* ... */);
/// ```
PREFOPT_API KTOLossResult kto_loss(const KTOInputs& inputs, const KTOLossFuncOptions& options = {});

/// The KL estimate of KTO: max(0, mean(policy_KL_logps − reference_KL_logps)), detached;
/// 0 for empty inputs.
PREFOPT_API at::Tensor kto_kl(const at::Tensor& policy_KL_logps,
                              const at::Tensor& reference_KL_logps);

}  // namespace functional

/// Functor form of `functional::kto_loss`.
///
/// Example:
/// ```
/// prefopt::KTOLoss kto;
/// auto r = kto(inputs);
/// ```
class KTOLoss {
 public:
  /// A KTO loss with `options`.
  explicit KTOLoss(KTOLossOptions options = {}) : options_(std::move(options)) {}
  /// `functional::kto_loss(inputs, options())`.
  KTOLossResult operator()(const KTOInputs& inputs) const {
    return functional::kto_loss(inputs, options_);
  }
  /// The options the functor was made with.
  const KTOLossOptions& options() const noexcept { return options_; }

 private:
  KTOLossOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_KTO
#undef PREFOPT_OUTERMOST_LOSSES_KTO
#include <prefopt/detail/header_only.h>
#endif
