// SPDX-License-Identifier: Apache-2.0
// CPO, SimPO and AlphaPO: reference-free margins with the optional NLL of the chosen side.
#pragma once

#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/cpo.h>

#include <cmath>
#include <string>

PREFOPT_BEGIN_NAMESPACE
namespace detail {

struct CPOParams {
  CPOLossType type;
  double beta, eps, gamma, nll_weight, alpha;
  NLLNormalization norm;
  LossReduction reduction;
  const char* name = nullptr;  // the loss's name in messages; default: the CPO type's
  // Whether γ, the NLL weight and the NLL's normalisation differ from their options struct's
  // defaults (a value that no term reads then warns).
  bool gamma_given = false, nll_weight_given = false, norm_given = false;
};

PREFOPT_INLINE CPOLossResult cpo_impl(const char* fn, const PairInputs& in, const CPOParams& p) {
  TORCH_CHECK_VALUE(detail::is_valid(p.type), fn, ": loss_type is not a CPOLossType value (got ",
                    static_cast<int>(p.type), ")");
  const int norm = static_cast<int>(p.norm);
  TORCH_CHECK_VALUE(norm == 0 || norm == 1, fn, ": nll_normalization is not an ",
                    "NLLNormalization value (got ", norm, ")");
  check_beta(fn, p.beta);
  check_smoothing(fn, p.eps);
  const char* name = p.name != nullptr ? p.name : cpo_loss_type_name(p.type);
  TORCH_CHECK_VALUE(p.eps == 0 || (p.type != CPOLossType::kHinge && p.type != CPOLossType::kIPO),
                    fn, ": label_smoothing = ", p.eps, " is not used by ", name, "; expected 0");
  // TPO (p.name set) calls the margin and the NLL weight tpo_l_gamma and tpo_alpha.
  const bool tpo = p.name != nullptr;
  TORCH_CHECK_VALUE(std::isfinite(p.gamma), fn, ": expected a finite ",
                    tpo ? "tpo_l_gamma" : "simpo_gamma", ", got ", p.gamma);
  TORCH_CHECK_VALUE(std::isfinite(p.nll_weight), fn, ": expected a finite ",
                    tpo ? "tpo_alpha" : "cpo_alpha", ", got ", p.nll_weight);
  TORCH_CHECK_VALUE(std::isfinite(p.alpha), fn, ": expected a finite alpha, got ", p.alpha);
  // Legal, but it maximises the NLL: most likely a sign slip (AlphaPO does not read it). One
  // warning site per option, since TORCH_WARN_ONCE fires once per site.
  if (p.nll_weight < 0 && p.type != CPOLossType::kAlphaPO) {
    if (p.name != nullptr) {
      TORCH_WARN_ONCE(fn, ": tpo_alpha = ", p.nll_weight, " < 0 maximises the NLL");
    } else {
      TORCH_WARN_ONCE(fn, ": cpo_alpha = ", p.nll_weight, " < 0 maximises the NLL");
    }
  }
  TORCH_CHECK(!in.weights().defined(), fn, ": per-pair weights are a DPO-family input; got ",
              "weights");
  detail::check_pair_inputs(fn, in, /*needs_reference=*/false);
  // Legal, but what no term reads would train with nothing changed: a warning each. One site
  // per option and loss (TPO or CPO/SimPO), since TORCH_WARN_ONCE fires once per site.
  if (p.gamma_given && !cpo_reads_gamma(p.type)) {
    if (tpo) {
      TORCH_WARN_ONCE(fn, ": tpo_l_gamma = ", p.gamma, " is read by the tpo-l loss type only, ",
                      "got ", name, ": it is ignored");
    } else {
      TORCH_WARN_ONCE(fn, ": simpo_gamma = ", p.gamma, " is read by the simpo and alphapo loss ",
                      "types only, got ", name, ": it is ignored");
    }
  }
  // cpo_alpha = 0 is what TRL's CPOConfig sets for alphapo: nothing to warn of.
  if (p.nll_weight_given && p.nll_weight != 0 && p.type == CPOLossType::kAlphaPO) {
    TORCH_WARN_ONCE(fn, ": cpo_alpha = ", p.nll_weight, " is not read by alphapo, which has no ",
                    "NLL term: it is ignored");
  }
  const bool has_nll = p.type != CPOLossType::kAlphaPO && p.nll_weight != 0;
  // One site per reason, as for DPO: the first reason must not hide the others.
  if (p.norm_given && has_nll && in.nll_loss().defined()) {
    TORCH_WARN_ONCE(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read when ",
                    "nll_loss is given (the NLL term is the host's): it is ignored");
  } else if (p.norm_given && p.type == CPOLossType::kAlphaPO) {
    TORCH_WARN_ONCE(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read by ",
                    "alphapo, which has no NLL term: it is ignored");
  } else if (p.norm_given && !has_nll) {
    TORCH_WARN_ONCE(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read ",
                    "without an NLL term (cpo_alpha = 0): it is ignored");
  }
  if (in.reference_chosen_logps().defined() || in.reference_rejected_logps().defined()) {
    if (tpo) {
      TORCH_WARN_ONCE(fn, ": the reference log-probs are given but no term reads them (TPO is ",
                      "reference-free): they are ignored");
    } else {
      TORCH_WARN_ONCE(fn, ": the reference log-probs are given but no term reads them (", name,
                      " is reference-free): they are ignored");
    }
  }

  const auto dt = detail::opmath_type(in.policy_chosen_logps());
  // sigmoid and hinge take sums (TRL's CPO and TPO), the others per-token means.
  const bool sums = p.type == CPOLossType::kSigmoid || p.type == CPOLossType::kHinge;
  const auto native = sums ? LogpsForm::kSum : LogpsForm::kMean;
  const auto lp = detail::form_logps(fn, name, in, native, dt);
  auto c = lp.policy_chosen;
  auto r = lp.policy_rejected;
  const auto logps_c = c.detach(), logps_r = r.detach();
  if (p.alpha != 0) {
    // AlphaPO's r = (1 − p^{−α})/α = −expm1(−α·logp)/α, without forming p.
    c = at::expm1(c * -p.alpha) * (-1.0 / p.alpha);
    r = at::expm1(r * -p.alpha) * (-1.0 / p.alpha);
  }
  const auto m = c - r;
  at::Tensor losses;
  switch (p.type) {
    case CPOLossType::kSigmoid:
      losses = detail::smoothed_sigmoid(m * p.beta, p.eps);
      break;
    case CPOLossType::kHinge:
      losses = at::relu(1.0 - m * p.beta);
      break;
    case CPOLossType::kIPO:
      losses = (m - 1.0 / (2.0 * p.beta)).square();
      break;
    case CPOLossType::kSimPO:
    case CPOLossType::kAlphaPO:
      losses = detail::smoothed_sigmoid(m * p.beta - p.gamma, p.eps);
      break;
  }
  CPOLossResult res;
  res.losses = losses;
  res.loss = detail::reduce(losses, p.reduction);
  const double w = p.type == CPOLossType::kAlphaPO ? 0.0 : p.nll_weight;
  if (w != 0) {
    const auto nll = detail::chosen_nll(fn, in, lp.policy_chosen, native, p.norm, dt,
                                        /*per_pair=*/false);
    res.loss = res.loss + (w == 1.0 ? nll : nll * w);
    res.nll_loss = nll.detach();
  } else if (in.nll_loss().defined()) {
    // A host's NLL that neither the loss nor the result takes. One site per case, since
    // TORCH_WARN_ONCE fires once per site.
    if (p.name != nullptr) {
      TORCH_WARN_ONCE(fn, ": nll_loss is given but no term reads it (tpo_alpha = 0): it is ",
                      "ignored");
    } else if (p.type == CPOLossType::kAlphaPO) {
      TORCH_WARN_ONCE(fn, ": nll_loss is given but no term reads it (alphapo has no NLL term): ",
                      "it is ignored");
    } else {
      TORCH_WARN_ONCE(fn, ": nll_loss is given but no term reads it (cpo_alpha = 0): it is ",
                      "ignored");
    }
  }
  res.chosen_rewards = c.detach() * p.beta;
  res.rejected_rewards = r.detach() * p.beta;
  res.chosen_logps = logps_c;
  res.rejected_logps = logps_r;
  return res;
}

}  // namespace detail

PREFOPT_INLINE const char* cpo_loss_type_name(CPOLossType type) { return detail::name_of(type); }

PREFOPT_INLINE CPOLossType cpo_loss_type_from_name(const std::string& name) {
  return detail::loss_type_from_name<CPOLossType>("prefopt::cpo_loss_type_from_name", "CPO", name);
}

namespace functional {

PREFOPT_INLINE CPOLossResult cpo_loss(const PairInputs& inputs, const CPOLossFuncOptions& o) {
  const CPOLossOptions defaults;
  return detail::cpo_impl(
      "prefopt::cpo_loss", inputs,
      {o.loss_type(), o.beta(), o.label_smoothing(), o.simpo_gamma(), o.cpo_alpha(), o.alpha(),
       o.nll_normalization(), o.reduction(), nullptr, o.simpo_gamma() != defaults.simpo_gamma(),
       o.cpo_alpha() != defaults.cpo_alpha(),
       o.nll_normalization() != defaults.nll_normalization()});
}

PREFOPT_INLINE CPOLossResult simpo_loss(const PairInputs& inputs, const SimPOLossFuncOptions& o) {
  // SimPO reads its γ and NLL weight; only the normalisation can go unread (no NLL term).
  const bool norm_given = o.nll_normalization() != SimPOLossOptions().nll_normalization();
  return detail::cpo_impl(
      "prefopt::simpo_loss", inputs,
      {CPOLossType::kSimPO, o.beta(), o.label_smoothing(), o.simpo_gamma(), o.cpo_alpha(),
       o.alpha(), o.nll_normalization(), o.reduction(), nullptr, false, false, norm_given});
}

PREFOPT_INLINE CPOLossResult simpo_loss(const at::Tensor& policy_chosen_logps,
                                        const at::Tensor& policy_rejected_logps,
                                        const SimPOLossFuncOptions& options) {
  return simpo_loss(PairInputs()
                        .policy_chosen_logps(policy_chosen_logps)
                        .policy_rejected_logps(policy_rejected_logps)
                        .logps_form(LogpsForm::kMean),
                    options);
}

}  // namespace functional
PREFOPT_END_NAMESPACE
