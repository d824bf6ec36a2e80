// SPDX-License-Identifier: Apache-2.0
// The DPO family: every loss type, f-divergences, multi-loss weights, the bco baseline.
#pragma once

#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/dpo.h>

#include <algorithm>
#include <cmath>

PREFOPT_BEGIN_NAMESPACE

namespace detail {
namespace dpo {

constexpr const char* kFn = "prefopt::dpo_loss";

PREFOPT_INLINE void check_options(const DPOLossOptions& o) {
  const auto& types = o.loss_type();
  TORCH_CHECK_VALUE(!types.empty(), kFn, ": expected at least one loss_type, got none");
  TORCH_CHECK_VALUE(o.loss_weights().empty() || o.loss_weights().size() == types.size(), kFn,
                    ": expected one loss_weight per loss_type (", types.size(), "), got ",
                    o.loss_weights().size());
  for (double w : o.loss_weights())
    TORCH_CHECK_VALUE(std::isfinite(w), kFn, ": expected finite loss_weights, got ", w);
  TORCH_CHECK_VALUE(std::isfinite(o.beta()) && o.beta() > 0, kFn, ": expected beta > 0, got ",
                    o.beta());
  const double eps = o.label_smoothing();
  TORCH_CHECK_VALUE(eps >= 0 && eps < 0.5, kFn, ": expected label_smoothing in [0, 0.5), got ",
                    eps);
  const bool cdpo = o.cdpo();
  if (eps != 0) {
    TORCH_CHECK_VALUE(
        std::any_of(types.begin(), types.end(),
                    [cdpo](DPOLossType t) { return dpo_reads_label_smoothing(t, cdpo); }),
        kFn, ": label_smoothing = ", eps, " is not used by any of the loss types (robust, ",
        "exo_pair, aot and aot_unpaired take it; sigmoid and sigmoid_norm only with cdpo(true), ",
        "conservative DPO, since TRL 0.29 ignores it there)");
  }
  if (cdpo) {
    TORCH_CHECK_VALUE(has_loss_type(types, DPOLossType::kSigmoid) ||
                          has_loss_type(types, DPOLossType::kSigmoidNorm),
                      kFn, ": cdpo(true) smooths sigmoid and sigmoid_norm, and neither is among ",
                      "the loss types");
    if (eps == 0) {
      TORCH_WARN_ONCE(kFn, ": cdpo(true) with label_smoothing 0 is plain sigmoid; set the ",
                      "label-flip rate with label_smoothing");
    }
  }
  TORCH_CHECK_VALUE(!has_loss_type(types, DPOLossType::kExoPair) || eps > 0, kFn,
                    ": exo_pair needs label_smoothing in (0, 0.5), got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(o.discopop_tau()) && o.discopop_tau() > 0, kFn,
                    ": expected discopop_tau > 0, got ", o.discopop_tau());
  TORCH_CHECK_VALUE(std::isfinite(o.f_alpha_divergence_coef()), kFn,
                    ": expected a finite f_alpha_divergence_coef, got ",
                    o.f_alpha_divergence_coef());
  TORCH_CHECK_VALUE(std::isfinite(o.rpo_alpha()), kFn, ": expected a finite rpo_alpha, got ",
                    o.rpo_alpha());
  // Legal (TRL takes them), but a negative weight maximises its term: most likely a sign slip.
  for (double w : o.loss_weights()) {
    if (w < 0) {
      TORCH_WARN_ONCE(kFn, ": loss_weight ", w, " < 0 maximises its loss term");
    }
  }
  if (o.rpo_alpha() < 0) {
    TORCH_WARN_ONCE(kFn, ": rpo_alpha = ", o.rpo_alpha(), " < 0 maximises the chosen NLL");
  }
  // Hand-built options can hold integers cast to the enums.
  const int ipo = static_cast<int>(o.ipo_normalization());
  TORCH_CHECK_VALUE(ipo == 0 || ipo == 1, kFn, ": ipo_normalization is not an IPONormalization ",
                    "value (got ", ipo, ")");
  const int nll = static_cast<int>(o.nll_normalization());
  TORCH_CHECK_VALUE(nll == 0 || nll == 1, kFn, ": nll_normalization is not an NLLNormalization ",
                    "value (got ", nll, ")");
  TORCH_CHECK_VALUE(detail::is_valid(o.f_divergence_type()), kFn,
                    ": f_divergence_type is not an FDivergence value (got ",
                    static_cast<int>(o.f_divergence_type()), ")");
  for (DPOLossType t : types) {
    TORCH_CHECK_VALUE(detail::is_valid(t), kFn, ": loss_type holds a value that is not a ",
                      "DPOLossType (", static_cast<int>(t), ")");
    TORCH_CHECK_VALUE(
        o.f_divergence_type() == FDivergence::kReverseKL || dpo_takes_f_divergence(t), kFn,
        ": f_divergence_type = ", name_of(o.f_divergence_type()), " is only defined for the ",
        "loss types built on the chosen - rejected difference (sigmoid, sigmoid_norm, hinge, ",
        "ipo, exo_pair, robust, discopop, sft), got ", name_of(t), "; use reverse_kl with it");
  }
}

// Options that only some loss types read, set to another value than the default of
// `DPOLossOptions` while no selected type reads them: legal, but the call would train with
// nothing changed, so each warns (once per site). `nll_given`: the host's `nll_loss`, which
// replaces the NLL that `nll_normalization` averages.
PREFOPT_INLINE void warn_unread_options(const DPOLossOptions& o, bool nll_given) {
  const DPOLossOptions defaults;
  const auto& types = o.loss_type();
  const bool scores = std::any_of(types.begin(), types.end(), dpo_reads_f_divergence);
  if (o.f_divergence_type() != defaults.f_divergence_type() && !scores) {
    TORCH_WARN_ONCE(kFn, ": f_divergence_type = ", name_of(o.f_divergence_type()), " maps the ",
                    "log-ratios of sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust and ",
                    "discopop, and none is among the loss types (sft reads none): it is ignored");
  }
  if (o.f_alpha_divergence_coef() != defaults.f_alpha_divergence_coef() &&
      o.f_divergence_type() != FDivergence::kAlphaDivergence) {
    TORCH_WARN_ONCE(kFn, ": f_alpha_divergence_coef = ", o.f_alpha_divergence_coef(),
                    " is read by f_divergence_type alpha_divergence only, got ",
                    name_of(o.f_divergence_type()), ": it is ignored");
  }
  if (o.discopop_tau() != defaults.discopop_tau() &&
      !has_loss_type(types, DPOLossType::kDiscoPOP)) {
    TORCH_WARN_ONCE(kFn, ": discopop_tau = ", o.discopop_tau(), " is read by the discopop ",
                    "loss type only, and it is not among the loss types: it is ignored");
  }
  if (o.ipo_normalization() != defaults.ipo_normalization() &&
      !has_loss_type(types, DPOLossType::kIPO)) {
    TORCH_WARN_ONCE(kFn, ": ipo_normalization = IPONormalization::kNone is read by the ipo loss ",
                    "type only, and it is not among the loss types: it is ignored");
  }
  if (o.nll_normalization() != defaults.nll_normalization()) {
    if (!has_loss_type(types, DPOLossType::kSFT) && o.rpo_alpha() == 0) {
      TORCH_WARN_ONCE(kFn, ": nll_normalization = NLLNormalization::kSequenceMean averages the ",
                      "NLL of sft and rpo_alpha, and there is none (no sft loss type, ",
                      "rpo_alpha = 0): it is ignored");
    } else if (nll_given) {
      TORCH_WARN_ONCE(kFn, ": nll_normalization = NLLNormalization::kSequenceMean is not read ",
                      "when nll_loss is given (the NLL term is the host's): it is ignored");
    }
  }
}

// Score f′(e^ρ) of a log-ratio under the f-divergence, with TRL ≥ 1.10's constants
// (`_compute_loss`): forward_kl 1 − e^{−ρ} = −expm1(−ρ), js_divergence log 2 + ℓ(ρ),
// alpha_divergence expm1((α−1)ρ)/(α−1). expm1 keeps the scores exact near ρ = 0, where
// 1 − e^{−ρ} cancels; the exponent is capped as in `capped_expm1`.
PREFOPT_INLINE at::Tensor f_score(const at::Tensor& rho, const DPOLossOptions& o) {
  switch (o.f_divergence_type()) {
    case FDivergence::kReverseKL:
      return rho;
    case FDivergence::kForwardKL:
      return detail::capped_expm1(rho.neg()).neg();
    case FDivergence::kJSDivergence:
      return at::log_sigmoid(rho) + std::log(2.0);
    case FDivergence::kAlphaDivergence: {
      const double a1 = o.f_alpha_divergence_coef() - 1.0;
      if (std::abs(a1) < 1e-6) return rho;
      return detail::capped_expm1(rho * a1) * (1.0 / a1);
    }
  }
  return rho;
}

}  // namespace dpo
}  // namespace detail

PREFOPT_INLINE const char* dpo_loss_type_name(DPOLossType type) { return detail::name_of(type); }

PREFOPT_INLINE DPOLossType dpo_loss_type_from_name(const std::string& name) {
  DPOLossType t{};
  TORCH_CHECK_VALUE(detail::value_of(name, &t), "prefopt::dpo_loss_type_from_name: unknown DPO ",
                    "loss type '", name, "'; expected one of ", detail::all_names<DPOLossType>());
  return t;
}

PREFOPT_INLINE const char* f_divergence_name(FDivergence f) { return detail::name_of(f); }

PREFOPT_INLINE FDivergence f_divergence_from_name(const std::string& name) {
  FDivergence f{};
  TORCH_CHECK_VALUE(detail::value_of(name, &f), "prefopt::f_divergence_from_name: unknown ",
                    "f_divergence_type '", name, "'; expected one of ",
                    detail::all_names<FDivergence>());
  return f;
}

namespace detail {
namespace dpo {
PREFOPT_INLINE bool valid_moments(double mean, double var, double count) {
  return std::isfinite(mean) && std::isfinite(var) && var >= 0 && std::isfinite(count) && count > 0;
}
}  // namespace dpo
}  // namespace detail

PREFOPT_INLINE void BCOBaseline::load(double mean, double var, double count) {
  TORCH_CHECK_VALUE(detail::dpo::valid_moments(mean, var, count),
                    "prefopt::BCOBaseline::load: expected a ",
                    "finite mean, a finite var >= 0 and a finite count > 0, got mean ", mean,
                    ", var ", var, ", count ", count);
  mean_ = mean;
  var_ = var;
  count_ = count;
}

PREFOPT_INLINE double BCOBaseline::update(double mean, double var, double count) {
  TORCH_CHECK_VALUE(detail::dpo::valid_moments(mean, var, count),
                    "prefopt::BCOBaseline::update: expected a ",
                    "finite mean, a finite var >= 0 and a finite count > 0, got mean ", mean,
                    ", var ", var, ", count ", count);
  // Chan et al.'s parallel update, as TRL's RunningMoments does it.
  const double delta = mean - mean_;
  const double total = count_ + count;
  const double m2 = var_ * count_ + delta * delta * count_ * count / total + var * count;
  mean_ += delta * count / total;
  var_ = m2 / total;
  count_ = total;
  return mean_;
}

PREFOPT_INLINE at::Tensor BCOBaseline::update(const at::Tensor& chosen_rewards,
                                              const at::Tensor& rejected_rewards) {
  const auto all =
      at::cat({chosen_rewards.detach().flatten(), rejected_rewards.detach().flatten()});
  TORCH_CHECK(all.numel() > 0, "prefopt::BCOBaseline::update: expected at least one reward, ",
              "got none");
  const double m = update(all.to(at::kDouble).mean().item<double>());
  return at::scalar_tensor(m, all.options());
}

namespace detail {
namespace dpo {

PREFOPT_INLINE DPOLossResult dpo_impl(const PairInputs& in, const at::Tensor* bco_delta,
                                      const DPOLossOptions& o) {
  check_options(o);
  const bool ref_free = o.reference_free();
  detail::check_pair_inputs(kFn, in, !ref_free);
  const bool has_ref = in.reference_chosen_logps().defined();
  if (ref_free && has_ref) {
    TORCH_WARN_ONCE(kFn, ": reference_free(true) leaves the reference log-probs out of the ",
                    "loss; they only feed the logged rewards beta*(policy - reference), as in ",
                    "TRL <= 0.28");
  }
  const auto& types = o.loss_type();
  // What nothing would read is an error, not a loss without it.
  const bool has_delta = bco_delta != nullptr && bco_delta->defined();
  TORCH_CHECK_VALUE(!has_delta || has_loss_type(types, DPOLossType::kBCOPair), kFn,
                    ": bco_delta is read by bco_pair only, and bco_pair is not among the loss ",
                    "types");
  TORCH_CHECK_VALUE(bco_delta != nullptr || !o.bco_running_mean(), kFn,
                    ": bco_running_mean(true) needs the running baseline that the DPOLoss ",
                    "functor keeps; the functional form takes the baseline's delta through its ",
                    "bco_delta overload");
  if (has_delta && bco_delta->device().is_cpu()) {  // (a CUDA δ would cost a sync)
    const double d = bco_delta->to(at::kDouble).item<double>();
    TORCH_CHECK_VALUE(std::isfinite(d), kFn, ": expected a finite bco_delta, got ", d);
  }
  const bool aot =
      has_loss_type(types, DPOLossType::kAOT) || has_loss_type(types, DPOLossType::kAOTUnpaired);
  TORCH_CHECK(!(aot && in.weights().defined()), kFn,
              ": aot and aot_unpaired sort the batch, so per-pair weights (WPO) cannot apply; ",
              "got weights");
  warn_unread_options(o, in.nll_loss().defined());
  const double beta = o.beta();
  const double eps = o.label_smoothing();

  const auto dt = detail::opmath_type(in.policy_chosen_logps());
  const auto lp = detail::form_logps(kFn, "dpo_loss", in, LogpsForm::kSum, dt);
  const auto& pc = lp.policy_chosen;
  const auto& pr = lp.policy_rejected;
  at::Tensor rc, rr, rho_c, rho_r;
  if (ref_free) {
    rho_c = pc;
    rho_r = pr;
  } else {
    rc = lp.reference_chosen;
    rr = lp.reference_rejected;
    rho_c = pc - rc;
    rho_r = pr - rr;
  }
  const bool plain_scores = o.f_divergence_type() == FDivergence::kReverseKL;
  at::Tensor score_c, score_r, delta;
  auto scores = [&] {
    if (!score_c.defined()) {
      score_c = plain_scores ? rho_c : f_score(rho_c, o);
      score_r = plain_scores ? rho_r : f_score(rho_r, o);
    }
  };
  auto z = [&] {  // β·Δ
    if (!delta.defined()) {
      scores();
      delta = (score_c - score_r) * beta;
    }
    return delta;
  };
  auto lengths = [&](const char* type) {
    TORCH_CHECK(in.chosen_lengths().defined() && in.rejected_lengths().defined(), kFn, ": ", type,
                " normalises by completion length and needs chosen_lengths and ",
                "rejected_lengths, got ",
                in.chosen_lengths().defined() ? "no rejected_lengths" : "no chosen_lengths");
    return std::make_pair(detail::cast(in.chosen_lengths(), dt).clamp_min(1),
                          detail::cast(in.rejected_lengths(), dt).clamp_min(1));
  };
  at::Tensor nll;
  auto get_nll = [&] {
    if (!nll.defined()) {
      nll = detail::chosen_nll(kFn, in, pc, LogpsForm::kSum, o.nll_normalization(), dt,
                               /*per_pair=*/true);
    }
    return nll;
  };

  at::Tensor total;
  for (size_t k = 0; k < types.size(); ++k) {
    const double w = o.loss_weights().empty() ? 1.0 : o.loss_weights()[k];
    at::Tensor l;
    switch (types[k]) {
      case DPOLossType::kSigmoid:
        l = detail::smoothed_sigmoid(z(), o.cdpo() ? eps : 0.0);
        break;
      case DPOLossType::kHinge:
        l = at::relu(1.0 - z());
        break;
      case DPOLossType::kIPO: {
        scores();
        at::Tensor d;
        if (o.ipo_normalization() == IPONormalization::kPerToken) {
          const auto [nc, nr] = lengths("ipo");
          d = score_c / nc - score_r / nr;
        } else {
          d = score_c - score_r;
        }
        l = (d - 1.0 / (2.0 * beta)).square();
        break;
      }
      case DPOLossType::kRobust:
        l = (at::log_sigmoid(z()) * (eps - 1.0) + at::log_sigmoid(z().neg()) * eps) /
            (1.0 - 2.0 * eps);
        break;
      case DPOLossType::kExoPair: {
        const auto zz = z();
        const auto lq = at::log_sigmoid(zz), lq_neg = at::log_sigmoid(zz.neg());
        l = lq.exp() * (lq - std::log1p(-eps)) + lq_neg.exp() * (lq_neg - std::log(eps));
        break;
      }
      case DPOLossType::kNCAPair: {  // raw log-ratios: no f-divergence (check_options)
        const auto c = rho_c * beta, r = rho_r * beta;
        l = at::log_sigmoid(c).neg() - 0.5 * at::log_sigmoid(c.neg()) -
            0.5 * at::log_sigmoid(r.neg());
        break;
      }
      case DPOLossType::kBCOPair: {
        auto c = rho_c * beta, r = rho_r * beta;
        if (bco_delta != nullptr && bco_delta->defined()) {
          const auto d = bco_delta->to(c.options()).reshape({});
          c = c - d;
          r = r - d;
        }
        l = at::log_sigmoid(c).neg() - at::log_sigmoid(r.neg());
        break;
      }
      case DPOLossType::kSPPOHard:
        l = (rho_c - 0.5 / beta).square() + (rho_r + 0.5 / beta).square();
        break;
      case DPOLossType::kAOT: {
        const auto pi = std::get<0>(at::sort(pc - pr, 0));
        const auto ref = ref_free ? at::zeros_like(pi) : std::get<0>(at::sort(rc - rr, 0));
        l = detail::smoothed_sigmoid((pi - ref) * beta, eps);
        break;
      }
      case DPOLossType::kAOTUnpaired: {
        const auto c = std::get<0>(at::sort(rho_c, 0)), r = std::get<0>(at::sort(rho_r, 0));
        l = detail::smoothed_sigmoid((c - r) * beta, eps);
        break;
      }
      case DPOLossType::kAPOZero:
        l = at::sigmoid(rho_c * -beta) + at::sigmoid(rho_r * beta);
        break;
      case DPOLossType::kAPODown:
        l = at::sigmoid(rho_c * beta) + at::sigmoid((rho_r - rho_c) * beta);
        break;
      case DPOLossType::kDiscoPOP: {
        // −ℓ(z)(1 − σ(z/τ)) + e^{−z}σ(z/τ), with e^{−z}σ(z/τ) = exp(−z + ℓ(z/τ)): the product
        // that overflows to inf·0 = NaN in TRL and Liger stays finite for any finite z.
        const auto zz = z(), zt = zz / o.discopop_tau();
        l = at::softplus(zz.neg()) * at::sigmoid(zt.neg()) + (at::log_sigmoid(zt) - zz).exp();
        break;
      }
      case DPOLossType::kSigmoidNorm: {
        scores();
        const auto [nc, nr] = lengths("sigmoid_norm");
        l = detail::smoothed_sigmoid((score_c / nc - score_r / nr) * beta, o.cdpo() ? eps : 0.0);
        break;
      }
      case DPOLossType::kSFT:
        l = get_nll().expand({pc.size(0)});
        break;
    }
    if (w != 1.0) l = l * w;
    total = total.defined() ? total + l : l;
  }
  if (o.rpo_alpha() != 0) total = total + get_nll() * o.rpo_alpha();
  // Constants of the loss, as TRL computes them (under no_grad) and `fused_dpo_loss` takes them.
  if (in.weights().defined()) total = total * detail::cast(in.weights().detach(), dt);

  DPOLossResult r;
  r.losses = total;
  r.loss = detail::reduce(total, o.reduction());
  // Logged rewards β·(π − ref), with the reference whenever one is given (reference_free
  // drops it from the loss only).
  const auto rc_d = has_ref ? (pc - lp.reference_chosen).detach() : pc.detach();
  const auto rr_d = has_ref ? (pr - lp.reference_rejected).detach() : pr.detach();
  double reward_scale = beta;
  if (o.weighted_rewards()) {
    // TRL ≤ 0.28 summed each type's rewards β·ρ with its weight, `sft`'s included.
    reward_scale = 0;
    for (size_t k = 0; k < types.size(); ++k)
      reward_scale += beta * (o.loss_weights().empty() ? 1.0 : o.loss_weights()[k]);
  }
  r.chosen_rewards = rc_d * reward_scale;
  r.rejected_rewards = rr_d * reward_scale;
  r.chosen_logps = pc.detach();
  r.rejected_logps = pr.detach();
  if (nll.defined()) {
    r.nll_loss = (nll.dim() == 0 ? nll : detail::reduce(nll, torch::kMean)).detach();
  } else if (in.nll_loss().defined()) {  // a host's NLL that neither the loss nor the result takes
    TORCH_WARN_ONCE(kFn, ": nll_loss is given but no term reads it (no sft loss type, ",
                    "rpo_alpha = 0): it is ignored");
  }
  return r;
}

}  // namespace dpo
}  // namespace detail

namespace functional {

PREFOPT_INLINE DPOLossResult dpo_loss(const PairInputs& inputs, const DPOLossFuncOptions& options) {
  return detail::dpo::dpo_impl(inputs, nullptr, options);
}

PREFOPT_INLINE DPOLossResult dpo_loss(const at::Tensor& policy_chosen_logps,
                                      const at::Tensor& policy_rejected_logps,
                                      const at::Tensor& reference_chosen_logps,
                                      const at::Tensor& reference_rejected_logps,
                                      const DPOLossFuncOptions& options) {
  return detail::dpo::dpo_impl(PairInputs()
                                   .policy_chosen_logps(policy_chosen_logps)
                                   .policy_rejected_logps(policy_rejected_logps)
                                   .reference_chosen_logps(reference_chosen_logps)
                                   .reference_rejected_logps(reference_rejected_logps)
                                   .logps_form(LogpsForm::kSum),
                               nullptr, options);
}

PREFOPT_INLINE DPOLossResult dpo_loss(const PairInputs& inputs, const at::Tensor& bco_delta,
                                      const DPOLossFuncOptions& options) {
  TORCH_CHECK(!bco_delta.defined() || bco_delta.numel() == 1, detail::dpo::kFn,
              ": expected bco_delta to be a scalar, got shape ", bco_delta.sizes());
  return detail::dpo::dpo_impl(inputs, &bco_delta, options);
}

}  // namespace functional

PREFOPT_INLINE DPOLoss::DPOLoss(DPOLossOptions options) : options_(std::move(options)) {
  if (options_.bco_running_mean()) {
    TORCH_CHECK_VALUE(detail::has_loss_type(options_.loss_type(), DPOLossType::kBCOPair),
                      "prefopt::DPOLoss: ",
                      "bco_running_mean(true) keeps bco_pair's baseline, and bco_pair is not ",
                      "among the loss types");
    baseline_ = std::make_shared<BCOBaseline>();
  }
}

PREFOPT_INLINE BCOBaseline& DPOLoss::bco_baseline() const {
  TORCH_CHECK(baseline_ != nullptr, "prefopt::DPOLoss::bco_baseline: this loss keeps no ",
              "baseline; construct it with bco_running_mean(true) and bco_pair");
  return *baseline_;
}

PREFOPT_INLINE DPOLossResult DPOLoss::operator()(const PairInputs& inputs) const {
  if (baseline_ == nullptr) return functional::dpo_loss(inputs, options_);
  // The step's rewards join the running mean before the loss uses it (TRL ≤ 0.28). The update
  // goes to a copy that replaces the baseline only once the loss succeeded: a call that throws
  // leaves the state as it was.
  detail::dpo::check_options(options_);
  detail::check_pair_inputs(detail::dpo::kFn, inputs, !options_.reference_free());
  const auto dt = detail::opmath_type(inputs.policy_chosen_logps());
  const auto lp = detail::form_logps(detail::dpo::kFn, "dpo_loss", inputs, LogpsForm::kSum, dt);
  const auto rho = [&](const at::Tensor& p, const at::Tensor& ref) {
    const auto d = p.detach().to(at::kDouble);
    return options_.reference_free() ? d : d - ref.to(at::kDouble);
  };
  const auto c = rho(lp.policy_chosen, lp.reference_chosen);
  const auto r = rho(lp.policy_rejected, lp.reference_rejected);
  BCOBaseline next = *baseline_;
  const auto delta = next.update(c * options_.beta(), r * options_.beta());
  auto result = functional::dpo_loss(inputs, delta, options_);
  *baseline_ = next;
  return result;
}

PREFOPT_END_NAMESPACE
