// SPDX-License-Identifier: Apache-2.0
// CPO / SimPO / AlphaPO, ORPO and KTO.
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>

#include <cmath>

#include "losses/math.h"

PREFOPT_BEGIN_NAMESPACE

namespace {

void check_beta(const char* fn, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, fn, ": expected beta > 0, got ", beta);
}

void check_smoothing(const char* fn, double eps) {
  TORCH_CHECK_VALUE(eps >= 0 && eps < 0.5, fn, ": expected label_smoothing in [0, 0.5), got ", eps);
}

struct CPOParams {
  CPOLossType type;
  double beta, eps, gamma, nll_weight, alpha;
  NLLNormalization norm;
  LossReduction reduction;
  const char* name = nullptr;  // the loss's name in messages; default: the CPO type's
};

CPOLossResult cpo_impl(const char* fn, const PairInputs& in, const CPOParams& p) {
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
  TORCH_CHECK_VALUE(std::isfinite(p.gamma), fn, ": expected a finite simpo_gamma, got ", p.gamma);
  TORCH_CHECK_VALUE(std::isfinite(p.nll_weight), fn, ": expected a finite cpo_alpha, got ",
                    p.nll_weight);
  TORCH_CHECK_VALUE(std::isfinite(p.alpha), fn, ": expected a finite alpha, got ", p.alpha);
  TORCH_CHECK(!in.weights().defined(), fn, ": per-pair weights are a DPO-family input; got ",
              "weights");
  detail::check_pair_inputs(fn, in, /*needs_reference=*/false);

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
  }
  res.chosen_rewards = c.detach() * p.beta;
  res.rejected_rewards = r.detach() * p.beta;
  res.chosen_logps = logps_c;
  res.rejected_logps = logps_r;
  return res;
}

}  // namespace

const char* cpo_loss_type_name(CPOLossType type) { return detail::name_of(type); }
const char* tpo_loss_type_name(TPOLossType type) { return detail::name_of(type); }
const char* kto_loss_type_name(KTOLossType type) { return detail::name_of(type); }

namespace {
template <typename E>
E from_name(const char* fn, const char* what, const std::string& name) {
  E value{};
  TORCH_CHECK_VALUE(detail::value_of(name, &value), fn, ": unknown ", what, " loss type '", name,
                    "'; expected one of ", detail::all_names<E>());
  return value;
}
}  // namespace

CPOLossType cpo_loss_type_from_name(const std::string& name) {
  return from_name<CPOLossType>("prefopt::cpo_loss_type_from_name", "CPO", name);
}
TPOLossType tpo_loss_type_from_name(const std::string& name) {
  return from_name<TPOLossType>("prefopt::tpo_loss_type_from_name", "TPO", name);
}
KTOLossType kto_loss_type_from_name(const std::string& name) {
  return from_name<KTOLossType>("prefopt::kto_loss_type_from_name", "KTO", name);
}

namespace functional {

CPOLossResult cpo_loss(const PairInputs& inputs, const CPOLossFuncOptions& o) {
  return cpo_impl("prefopt::cpo_loss", inputs,
                  {o.loss_type(), o.beta(), o.label_smoothing(), o.simpo_gamma(), o.cpo_alpha(),
                   o.alpha(), o.nll_normalization(), o.reduction()});
}

CPOLossResult simpo_loss(const PairInputs& inputs, const SimPOLossFuncOptions& o) {
  return cpo_impl("prefopt::simpo_loss", inputs,
                  {CPOLossType::kSimPO, o.beta(), o.label_smoothing(), o.simpo_gamma(),
                   o.cpo_alpha(), o.alpha(), o.nll_normalization(), o.reduction()});
}

CPOLossResult simpo_loss(const at::Tensor& policy_chosen_logps,
                         const at::Tensor& policy_rejected_logps,
                         const SimPOLossFuncOptions& options) {
  return simpo_loss(PairInputs()
                        .policy_chosen_logps(policy_chosen_logps)
                        .policy_rejected_logps(policy_rejected_logps)
                        .logps_form(LogpsForm::kMean),
                    options);
}

namespace {

// TPO is CPO's machinery with its own names: sigmoid/hinge/ipo as CPO's, tpo-l as SimPO's,
// and the NLL of the gold response instead of the chosen one.
TPOLossResult tpo_impl(const PairInputs& in, const TPOLossOptions& o) {
  constexpr const char* fn = "prefopt::tpo_loss";
  CPOLossType type = CPOLossType::kSigmoid;
  switch (o.loss_type()) {
    case TPOLossType::kSigmoid:
      type = CPOLossType::kSigmoid;
      break;
    case TPOLossType::kHinge:
      type = CPOLossType::kHinge;
      break;
    case TPOLossType::kIPO:
      type = CPOLossType::kIPO;
      break;
    case TPOLossType::kTPOL:
      type = CPOLossType::kSimPO;
      break;
    default:
      TORCH_CHECK_VALUE(false, fn, ": loss_type is not a TPOLossType value (got ",
                        static_cast<int>(o.loss_type()), ")");
  }
  TORCH_CHECK_VALUE(std::isfinite(o.tpo_alpha()), fn, ": expected a finite tpo_alpha, got ",
                    o.tpo_alpha());
  TORCH_CHECK(o.tpo_alpha() == 0 || in.nll_loss().defined(), fn, ": tpo_alpha = ", o.tpo_alpha(),
              " weights the gold response's NLL; pass the gold SequenceLogprobs (or nll_loss), ",
              "or set tpo_alpha(0)");
  return cpo_impl(fn, in,
                  {type, o.beta(), o.label_smoothing(), o.tpo_l_gamma(), o.tpo_alpha(), 0.0,
                   NLLNormalization::kTokenMean, o.reduction(), tpo_loss_type_name(o.loss_type())});
}

}  // namespace

TPOLossResult tpo_loss(const PairInputs& inputs, const SequenceLogprobs& gold,
                       const TPOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::tpo_loss";
  if (o.tpo_alpha() == 0) return tpo_impl(inputs, o);
  TORCH_CHECK(gold.sum.defined() && gold.count.defined(), fn, ": expected the gold responses' ",
              "SequenceLogprobs with sum and count, got ",
              gold.sum.defined() ? "no count" : "no sum");
  TORCH_CHECK(gold.sum.dim() == 1 && gold.count.sizes() == gold.sum.sizes(), fn,
              ": expected gold.sum and gold.count of shape [B], got ", gold.sum.sizes(), " and ",
              gold.count.sizes());
  TORCH_CHECK(at::isFloatingType(gold.sum.scalar_type()), fn,
              ": expected gold.sum to be floating point, got ", gold.sum.scalar_type());
  TORCH_CHECK(!inputs.nll_loss().defined(), fn, ": got both the gold SequenceLogprobs and ",
              "nll_loss; pass one");
  // TRL's cross-entropy over every gold completion token of the batch; 0 over none.
  const auto dt = detail::opmath_type(gold.sum);
  const auto nll =
      detail::cast(gold.sum, dt).sum().neg() / detail::cast(gold.count, dt).sum().clamp_min(1);
  return tpo_impl(PairInputs(inputs).nll_loss(nll), o);
}

TPOLossResult tpo_loss(const PairInputs& inputs, const TPOLossFuncOptions& o) {
  return tpo_impl(inputs, o);
}

ORPOLossResult orpo_loss(const PairInputs& in, const ORPOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::orpo_loss";
  check_beta(fn, o.beta());
  const int norm = static_cast<int>(o.nll_normalization());
  TORCH_CHECK_VALUE(norm == 0 || norm == 1, fn, ": nll_normalization is not an ",
                    "NLLNormalization value (got ", norm, ")");
  TORCH_CHECK(!in.weights().defined(), fn, ": per-pair weights are a DPO-family input; got ",
              "weights");
  detail::check_pair_inputs(fn, in, /*needs_reference=*/false);
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

at::Tensor kto_kl(const at::Tensor& policy_KL_logps, const at::Tensor& reference_KL_logps) {
  constexpr const char* fn = "prefopt::kto_kl";
  TORCH_CHECK(policy_KL_logps.defined() && reference_KL_logps.defined(), fn,
              ": expected policy_KL_logps and reference_KL_logps, got ",
              policy_KL_logps.defined() ? "no reference_KL_logps" : "no policy_KL_logps");
  detail::check_logps(fn, "policy_KL_logps", policy_KL_logps, -1, policy_KL_logps.device());
  detail::check_logps(fn, "reference_KL_logps", reference_KL_logps, policy_KL_logps.size(0),
                      policy_KL_logps.device());
  const auto dt = detail::opmath_type(policy_KL_logps);
  const auto d =
      detail::cast(policy_KL_logps.detach(), dt) - detail::cast(reference_KL_logps.detach(), dt);
  return detail::reduce(d, torch::kMean).clamp_min(0);
}

KTOLossResult kto_loss(const KTOInputs& in, const KTOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::kto_loss";
  check_beta(fn, o.beta());
  TORCH_CHECK_VALUE(std::isfinite(o.desirable_weight()) && o.desirable_weight() >= 0, fn,
                    ": expected desirable_weight >= 0, got ", o.desirable_weight());
  TORCH_CHECK_VALUE(std::isfinite(o.undesirable_weight()) && o.undesirable_weight() >= 0, fn,
                    ": expected undesirable_weight >= 0, got ", o.undesirable_weight());
  const auto& pc = in.policy_chosen_logps();
  TORCH_CHECK(pc.defined(), fn, ": expected policy_chosen_logps (the desirable examples; an ",
              "empty [0] tensor when there are none), got undefined");
  TORCH_CHECK(pc.dim() == 1, fn, ": expected policy_chosen_logps of shape [N_d] (1-D), got ",
              pc.sizes());
  TORCH_CHECK(at::isFloatingType(pc.scalar_type()), fn, ": expected floating-point log-probs, got ",
              pc.scalar_type());
  const auto dev = pc.device();
  detail::check_logps(fn, "policy_rejected_logps", in.policy_rejected_logps(), -1, dev);
  detail::check_logps(fn, "reference_chosen_logps", in.reference_chosen_logps(), pc.size(0), dev);
  detail::check_logps(fn, "reference_rejected_logps", in.reference_rejected_logps(),
                      in.policy_rejected_logps().size(0), dev);
  for (const auto& [name, t] :
       {std::make_pair("policy_rejected_logps", &in.policy_rejected_logps()),
        std::make_pair("reference_chosen_logps", &in.reference_chosen_logps()),
        std::make_pair("reference_rejected_logps", &in.reference_rejected_logps())}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": expected ", name,
                " to be floating point (fp64/fp32/bf16/fp16), got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(detail::is_valid(o.loss_type()), fn,
                    ": loss_type is not a KTOLossType value (got ",
                    static_cast<int>(o.loss_type()), ")");
  const auto dt = detail::opmath_type(pc);
  at::Tensor z;
  if (in.kl().defined()) {
    TORCH_CHECK(in.kl().numel() == 1, fn, ": expected kl to be a scalar, got shape ",
                in.kl().sizes());
    z = in.kl().detach().reshape({}).to(dev, dt).clamp_min(0);
  } else if (o.loss_type() == KTOLossType::kKTO &&
             (in.policy_KL_logps().defined() || in.reference_KL_logps().defined())) {
    z = detail::cast(kto_kl(in.policy_KL_logps(), in.reference_KL_logps()), dt);
  } else {
    z = at::zeros({}, pc.options().dtype(dt));
  }
  // The reference is a constant of the loss: detached, so no gradient reaches it.
  const auto rho_d = detail::cast(pc, dt) - detail::cast(in.reference_chosen_logps().detach(), dt);
  const auto rho_u = detail::cast(in.policy_rejected_logps(), dt) -
                     detail::cast(in.reference_rejected_logps().detach(), dt);
  const double beta = o.beta();
  at::Tensor ld, lu;
  if (o.loss_type() == KTOLossType::kKTO) {
    ld = at::sigmoid((rho_d - z) * -beta);  // 1 − σ(β(ρ − z))
    lu = at::sigmoid((rho_u - z) * beta);   // 1 − σ(β(z − ρ))
  } else {
    ld = at::sigmoid(rho_d * -beta);
    lu = at::sigmoid(rho_u * beta);
  }
  if (o.desirable_weight() != 1.0) ld = ld * o.desirable_weight();
  if (o.undesirable_weight() != 1.0) lu = lu * o.undesirable_weight();
  KTOLossResult res;
  res.losses = at::cat({ld, lu});
  res.loss = detail::reduce(res.losses, o.reduction());
  res.chosen_rewards = rho_d.detach() * beta;
  res.rejected_rewards = rho_u.detach() * beta;
  res.kl = z;
  return res;
}

}  // namespace functional

PREFOPT_END_NAMESPACE
