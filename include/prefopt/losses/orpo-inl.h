// SPDX-License-Identifier: Apache-2.0
// ORPO: the odds-ratio term on per-token means, with a log-odds that never saturates.
#pragma once

#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/orpo.h>

#include <cmath>

PREFOPT_BEGIN_NAMESPACE
namespace functional {

PREFOPT_INLINE ORPOLossResult orpo_loss(const PairInputs& in, const ORPOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::orpo_loss";
  detail::check_beta(fn, o.beta());
  const int norm = static_cast<int>(o.nll_normalization());
  TORCH_CHECK_VALUE(norm == 0 || norm == 1, fn, ": nll_normalization is not an ",
                    "NLLNormalization value (got ", norm, ")");
  TORCH_CHECK(!in.weights().defined(), fn, ": per-pair weights are a DPO-family input; got ",
              "weights");
  detail::check_pair_inputs(fn, in, /*needs_reference=*/false);
  // Legal, but what no term reads would train with nothing changed: a warning each.
  if (in.nll_loss().defined() && o.nll_normalization() != ORPOLossOptions().nll_normalization()) {
    TORCH_WARN_ONCE(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read when ",
                    "nll_loss is given (the NLL term is the host's): it is ignored");
  }
  if (in.reference_chosen_logps().defined() || in.reference_rejected_logps().defined()) {
    TORCH_WARN_ONCE(fn, ": the reference log-probs are given but no term reads them (ORPO is ",
                    "reference-free): they are ignored");
  }
  const auto dt = detail::opmath_type(in.policy_chosen_logps());
  const auto lp = detail::form_logps(fn, "orpo", in, LogpsForm::kMean, dt);
  const auto& c = lp.policy_chosen;
  const auto& r = lp.policy_rejected;
  const auto log_odds = detail::orpo_log_odds(c, r);
  const auto ratio = at::log_sigmoid(log_odds);
  // Per pair with the sequence mean (LLaMA-Factory's per-pair loss), the batch scalar else.
  const auto nll = detail::chosen_nll(fn, in, c, LogpsForm::kMean, o.nll_normalization(), dt,
                                      /*per_pair=*/true);
  ORPOLossResult res;
  res.losses = nll - ratio * o.beta();
  res.loss = detail::reduce(res.losses, o.reduction());
  res.chosen_rewards = c.detach() * o.beta();
  res.rejected_rewards = r.detach() * o.beta();
  res.log_odds_ratio = ratio.detach();
  res.log_odds_chosen = log_odds.detach();
  // The batch's NLL; an empty batch gives 0 under either normalisation, never NaN.
  res.nll_loss = (nll.dim() == 0 ? nll : detail::reduce(nll, torch::kMean)).detach();
  res.chosen_logps = c.detach();
  res.rejected_logps = r.detach();
  return res;
}

}  // namespace functional
PREFOPT_END_NAMESPACE
