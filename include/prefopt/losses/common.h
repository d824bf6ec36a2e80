// SPDX-License-Identifier: Apache-2.0
// What every preference loss shares: the reduction tags, the pairwise inputs and the NLL term.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_COMMON
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/types.h>
#include <torch/enum.h>  // torch::kNone / kMean / kSum, the tags torch's own losses take

#include <type_traits>
#include <variant>

PREFOPT_BEGIN_NAMESPACE

/// How a loss reduces its per-pair (per-example for KTO) vector: `torch::kMean` (every anchor's
/// default), `torch::kSum`, or `torch::kNone` (the `loss` field is then the vector itself).
using LossReduction =
    std::variant<torch::enumtype::kNone, torch::enumtype::kMean, torch::enumtype::kSum>;

/// The [B] tensors a pairwise loss (DPO family, CPO/SimPO/AlphaPO, TPO, ORPO) consumes. Only
/// the policy log-probs are always needed; the rest depend on the loss and its options.
///
/// The log-probs say what they hold (`logps_form`): sums or per-token means. Each loss takes
/// the form its anchor uses (its *native form*: sums for the DPO family and CPO/TPO
/// sigmoid/hinge, means for SimPO, AlphaPO, CPO/TPO ipo, tpo-l and ORPO) and converts the other
/// form with the token counts, or refuses it, saying what it needs, when they are missing.
/// The reference log-probs are in the same form as the policy's.
///
/// Example:
/// ```
/// auto in = prefopt::PairInputs(policy_pair, reference_pair);  // sums, from F::split_pairs
/// auto avg = prefopt::PairInputs::averaged(policy_pair);       // means
/// auto in2 = prefopt::PairInputs().policy_chosen_logps(pc).policy_rejected_logps(pr)
///                .logps_form(prefopt::LogpsForm::kSum);
/// ```
struct PairInputs {
  PairInputs() = default;
  /// Sums and token counts of the policy, and of the reference when given (the usual DPO
  /// batch after `functional::split_pairs`).
  PairInputs(const PairLogprobs& policy, const PairLogprobs& reference) : PairInputs(policy) {
    reference_chosen_logps_ = reference.chosen.sum;
    reference_rejected_logps_ = reference.rejected.sum;
  }
  /// Sums and token counts of the policy only (reference-free losses).
  explicit PairInputs(const PairLogprobs& policy)
      : policy_chosen_logps_(policy.chosen.sum),
        policy_rejected_logps_(policy.rejected.sum),
        chosen_lengths_(policy.chosen.count),
        rejected_lengths_(policy.rejected.count),
        logps_form_(LogpsForm::kSum) {}

  /// Per-token means of the policy and their token counts: the native form of SimPO, AlphaPO,
  /// CPO ipo and ORPO.
  static PairInputs averaged(const PairLogprobs& policy) {
    return PairInputs()
        .policy_chosen_logps(policy.chosen.mean)
        .policy_rejected_logps(policy.rejected.mean)
        .chosen_lengths(policy.chosen.count)
        .rejected_lengths(policy.rejected.count)
        .logps_form(LogpsForm::kMean);
  }

  /// The reference's sums alone, for the fused losses (`functional::fused_dpo_loss`), which
  /// compute the policy's side themselves.
  static PairInputs reference_only(const PairLogprobs& reference) {
    return PairInputs()
        .reference_chosen_logps(reference.chosen.sum)
        .reference_rejected_logps(reference.rejected.sum)
        .logps_form(LogpsForm::kSum);
  }

  /// [B] policy log-probs of the chosen completions (differentiable).
  TORCH_ARG(at::Tensor, policy_chosen_logps);
  /// [B] policy log-probs of the rejected completions (differentiable).
  TORCH_ARG(at::Tensor, policy_rejected_logps);
  /// [B] reference log-probs of the chosen completions (no gradient flows into them).
  TORCH_ARG(at::Tensor, reference_chosen_logps);
  /// [B] reference log-probs of the rejected completions.
  TORCH_ARG(at::Tensor, reference_rejected_logps);
  /// [B] scored completion tokens of each chosen completion (any numeric dtype); needed by
  /// per-token normalised losses (IPO, `sigmoid_norm`) and the token-mean NLL.
  TORCH_ARG(at::Tensor, chosen_lengths);
  /// [B] scored completion tokens of each rejected completion.
  TORCH_ARG(at::Tensor, rejected_lengths);
  /// [B] per-pair weights multiplying each per-pair loss, e.g. WPO's
  /// `functional::wpo_pair_weights` (DPO family only). Constants of the loss: no gradient
  /// reaches them (TRL computes WPO's weights under no_grad).
  TORCH_ARG(at::Tensor, weights);
  /// Scalar NLL term computed by the host, used instead of the one derived from the chosen
  /// log-probs: e.g. TRL ORPO's cross-entropy over prompt + completion, or the plain NLL when
  /// the chosen log-probs are LD-DPO weighted. A loss with no NLL term (DPO without kSFT or
  /// `rpo_alpha`, CPO with `cpo_alpha` 0 or AlphaPO, TPO with `tpo_alpha` 0) ignores it with a
  /// warning.
  TORCH_ARG(at::Tensor, nll_loss);
  /// What the log-probs hold. Set by the constructors; kUnspecified for a `PairInputs` built
  /// field by field. Default: kUnspecified.
  TORCH_ARG(LogpsForm, logps_form) = LogpsForm::kUnspecified;
};

namespace detail {

/// The dtype a loss computes in: fp64 for fp64 inputs, fp32 for everything else.
inline at::ScalarType opmath_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// Applies a reduction to a per-pair loss vector.
inline at::Tensor reduce(const at::Tensor& losses, const LossReduction& reduction) {
  if (std::holds_alternative<torch::enumtype::kMean>(reduction)) {
    // mean of nothing is 0, not NaN: an empty side contributes nothing.
    return losses.numel() == 0 ? losses.sum() : losses.mean();
  }
  if (std::holds_alternative<torch::enumtype::kSum>(reduction)) return losses.sum();
  return losses;
}

/// Checks a [B] log-prob input: defined, 1-D, floating, of batch size `batch` (when ≥ 0) and
/// on `device`.
void check_logps(const char* fn, const char* name, const at::Tensor& t, int64_t batch,
                 const at::Device& device);

/// Checks that the log-probs `t` are floating point: integer or complex ones are refused, not
/// cast silently.
void check_floating_logps(const char* fn, const char* name, const at::Tensor& t);

/// Checks that the token counts `t` (lengths) are >= 0; on CPU only, since reading the
/// answer of a device tensor would synchronise with the device.
void check_counts(const char* fn, const char* name, const at::Tensor& t);

/// Validates the tensors of `in` that a pairwise loss needs and returns the batch size.
/// `needs_reference`: reference tensors must be present.
int64_t check_pair_inputs(const char* fn, const PairInputs& in, bool needs_reference);

/// The log-probs of `in` in the form a loss consumes, in `dtype`; the reference ones are
/// detached (no gradient ever reaches them) and undefined when `in` has none.
struct FormLogps {
  at::Tensor policy_chosen, policy_rejected, reference_chosen, reference_rejected;
  LogpsForm given;  ///< what `in` held (kUnspecified resolved to the native form)
};

/// Warns (once per process) that a `PairInputs` does not say whether its log-probs are sums or
/// per-token means, and that `loss` takes them as `native` (kSum or kMean), its own form.
void warn_unsaid_form(const char* fn, const char* loss, LogpsForm native);

/// `in`'s log-probs converted to `native` (kSum or kMean) with the token counts when `in`
/// holds the other form. `loss` names the loss in the messages: a TORCH_CHECK when the counts
/// needed are missing, a warning (once per process) when `in` does not say its form.
FormLogps form_logps(const char* fn, const char* loss, const PairInputs& in, LogpsForm native,
                     at::ScalarType dtype);

/// NLL of the chosen completions from their log-probs (see `NLLNormalization`), or the host's
/// `in.nll_loss()`. `chosen` are the chosen log-probs in form `form`. Returns a 0-dim tensor
/// in `dtype`, or a [B] tensor for kSequenceMean when `per_pair` is set.
at::Tensor chosen_nll(const char* fn, const PairInputs& in, const at::Tensor& chosen,
                      LogpsForm form, NLLNormalization norm, at::ScalarType dtype, bool per_pair);

/// Implicit-construction helper: options structs take a reduction tag directly, as torch's do
/// (`F::dpo_loss(pc, pr, rc, rr, torch::kSum)`).
template <typename T>
using if_reduction_tag = std::enable_if_t<std::is_same_v<T, torch::enumtype::kNone> ||
                                          std::is_same_v<T, torch::enumtype::kMean> ||
                                          std::is_same_v<T, torch::enumtype::kSum>>;

}  // namespace detail

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_COMMON
#undef PREFOPT_OUTERMOST_LOSSES_COMMON
#include <prefopt/detail/header_only.h>
#endif
