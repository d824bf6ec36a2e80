// SPDX-License-Identifier: Apache-2.0
// TPO: CPO's machinery (sigmoid, hinge, ipo, and tpo-l as SimPO) with the gold response's NLL.
#pragma once

#include <prefopt/losses/cpo-inl.h>
#include <prefopt/losses/tpo.h>

#include <cmath>
#include <string>

PREFOPT_BEGIN_NAMESPACE

PREFOPT_INLINE const char* tpo_loss_type_name(TPOLossType type) { return detail::name_of(type); }

PREFOPT_INLINE TPOLossType tpo_loss_type_from_name(const std::string& name) {
  return detail::loss_type_from_name<TPOLossType>("prefopt::tpo_loss_type_from_name", "TPO", name);
}

namespace detail {

// TPO is CPO's machinery with its own names (`tpo_as_cpo`) and the NLL of the gold response
// instead of the chosen one.
PREFOPT_INLINE TPOLossResult tpo_impl(const PairInputs& in, const TPOLossOptions& o) {
  constexpr const char* fn = "prefopt::tpo_loss";
  CPOLossType type = CPOLossType::kSigmoid;
  TORCH_CHECK_VALUE(tpo_as_cpo(o.loss_type(), &type), fn,
                    ": loss_type is not a TPOLossType value (got ", static_cast<int>(o.loss_type()),
                    ")");
  TORCH_CHECK_VALUE(std::isfinite(o.tpo_alpha()), fn, ": expected a finite tpo_alpha, got ",
                    o.tpo_alpha());
  TORCH_CHECK(o.tpo_alpha() == 0 || in.nll_loss().defined(), fn, ": tpo_alpha = ", o.tpo_alpha(),
              " weights the gold response's NLL; pass the gold SequenceLogprobs (or nll_loss), ",
              "or set tpo_alpha(0)");
  return {cpo_impl(fn, in,
                   {type, o.beta(), o.label_smoothing(), o.tpo_l_gamma(), o.tpo_alpha(), 0.0,
                    NLLNormalization::kTokenMean, o.reduction(), tpo_loss_type_name(o.loss_type()),
                    o.tpo_l_gamma() != TPOLossOptions().tpo_l_gamma()})};
}

}  // namespace detail

namespace functional {

PREFOPT_INLINE TPOLossResult tpo_loss(const PairInputs& inputs, const SequenceLogprobs& gold,
                                      const TPOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::tpo_loss";
  if (o.tpo_alpha() == 0) {
    // Legal, but the gold responses' log-probs were computed for nothing: most likely a
    // tpo_alpha set to 0 by mistake.
    if ((gold.sum.defined() && gold.sum.numel() > 0) ||
        (gold.count.defined() && gold.count.numel() > 0)) {
      TORCH_WARN_ONCE(fn, ": the gold SequenceLogprobs are given but no term reads them ",
                      "(tpo_alpha = 0): they are ignored");
    }
    return detail::tpo_impl(inputs, o);
  }
  TORCH_CHECK(gold.sum.defined() && gold.count.defined(), fn, ": expected the gold responses' ",
              "SequenceLogprobs with sum and count, got ",
              gold.sum.defined() ? "no count" : "no sum");
  TORCH_CHECK(gold.sum.dim() == 1 && gold.count.sizes() == gold.sum.sizes(), fn,
              ": expected gold.sum and gold.count of shape [B], got ", gold.sum.sizes(), " and ",
              gold.count.sizes());
  TORCH_CHECK(at::isFloatingType(gold.sum.scalar_type()), fn,
              ": expected gold.sum to be floating point, got ", gold.sum.scalar_type());
  detail::check_counts(fn, "gold.count", gold.count);
  // One gold response per pair (TRL's third branch of the same batch), on the pairs' device.
  const auto& pc = inputs.policy_chosen_logps();
  if (pc.defined() && pc.dim() == 1) {
    TORCH_CHECK(gold.sum.size(0) == pc.size(0), fn, ": expected one gold response per pair, ",
                "gold.sum of shape [", pc.size(0), "] like policy_chosen_logps, got ",
                gold.sum.sizes());
    TORCH_CHECK(gold.sum.device() == pc.device() && gold.count.device() == pc.device(), fn,
                ": expected gold.sum and gold.count on ", pc.device(),
                " like policy_chosen_logps, got ", gold.sum.device(), " and ", gold.count.device());
  }
  TORCH_CHECK(!inputs.nll_loss().defined(), fn, ": got both the gold SequenceLogprobs and ",
              "nll_loss; pass one");
  // TRL's cross-entropy over every gold completion token of the batch; 0 over none.
  const auto dt = detail::opmath_type(gold.sum);
  const auto nll =
      detail::cast(gold.sum, dt).sum().neg() / detail::cast(gold.count, dt).sum().clamp_min(1);
  return detail::tpo_impl(PairInputs(inputs).nll_loss(nll), o);
}

PREFOPT_INLINE TPOLossResult tpo_loss(const PairInputs& inputs, const TPOLossFuncOptions& o) {
  return detail::tpo_impl(inputs, o);
}

}  // namespace functional
PREFOPT_END_NAMESPACE
