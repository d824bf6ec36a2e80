// SPDX-License-Identifier: Apache-2.0
// KTO and apo_zero_unpaired on unpaired desirable and undesirable examples.
#pragma once

#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/kto.h>

#include <cmath>
#include <string>

PREFOPT_BEGIN_NAMESPACE

PREFOPT_INLINE const char* kto_loss_type_name(KTOLossType type) { return detail::name_of(type); }

PREFOPT_INLINE KTOLossType kto_loss_type_from_name(const std::string& name) {
  return detail::loss_type_from_name<KTOLossType>("prefopt::kto_loss_type_from_name", "KTO", name);
}

namespace functional {

PREFOPT_INLINE at::Tensor kto_kl(const at::Tensor& policy_KL_logps,
                                 const at::Tensor& reference_KL_logps) {
  constexpr const char* fn = "prefopt::kto_kl";
  TORCH_CHECK(policy_KL_logps.defined() && reference_KL_logps.defined(), fn,
              ": expected policy_KL_logps and reference_KL_logps, got ",
              policy_KL_logps.defined() ? "no reference_KL_logps" : "no policy_KL_logps");
  detail::check_logps(fn, "policy_KL_logps", policy_KL_logps, -1, policy_KL_logps.device());
  detail::check_logps(fn, "reference_KL_logps", reference_KL_logps, policy_KL_logps.size(0),
                      policy_KL_logps.device());
  detail::check_floating_logps(fn, "policy_KL_logps", policy_KL_logps);
  detail::check_floating_logps(fn, "reference_KL_logps", reference_KL_logps);
  const auto dt = detail::opmath_type(policy_KL_logps);
  const auto d =
      detail::cast(policy_KL_logps.detach(), dt) - detail::cast(reference_KL_logps.detach(), dt);
  return detail::reduce(d, torch::kMean).clamp_min(0);
}

PREFOPT_INLINE KTOLossResult kto_loss(const KTOInputs& in, const KTOLossFuncOptions& o) {
  constexpr const char* fn = "prefopt::kto_loss";
  detail::check_beta(fn, o.beta());
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
                    ": loss_type is not a KTOLossType value (got ", static_cast<int>(o.loss_type()),
                    ")");
  const auto dt = detail::opmath_type(pc);
  const bool kl_logps = in.policy_KL_logps().defined() || in.reference_KL_logps().defined();
  TORCH_CHECK(!kl_logps || (in.policy_KL_logps().defined() && in.reference_KL_logps().defined()),
              fn, ": expected both policy_KL_logps and reference_KL_logps for the KL estimate, ",
              "got only ",
              in.policy_KL_logps().defined() ? "policy_KL_logps" : "reference_KL_logps");
  at::Tensor z;
  if (o.loss_type() == KTOLossType::kAPOZeroUnpaired) {
    // TRL's apo_zero_unpaired has no KL term (and logs kl = 0).
    if (in.kl().defined() || kl_logps) {
      TORCH_WARN_ONCE(fn, ": apo_zero_unpaired uses no KL estimate; the kl and KL log-probs ",
                      "given are ignored");
    }
    z = at::zeros({}, pc.options().dtype(dt));
  } else if (in.kl().defined()) {
    TORCH_CHECK(in.kl().numel() == 1, fn, ": expected kl to be a scalar, got shape ",
                in.kl().sizes());
    TORCH_CHECK(at::isFloatingType(in.kl().scalar_type()), fn,
                ": expected kl to be floating point, got ", in.kl().scalar_type());
    // Read on CPU only (a device value would cost a synchronisation every step).
    TORCH_CHECK_VALUE(!in.kl().device().is_cpu() || std::isfinite(in.kl().item<double>()), fn,
                      ": expected a finite kl, got ", in.kl().item<double>());
    z = in.kl().detach().reshape({}).to(dev, dt).clamp_min(0);
  } else if (kl_logps) {
    z = detail::cast(kto_kl(in.policy_KL_logps(), in.reference_KL_logps()), dt);
  } else {
    // Legal (z = 0), but TRL's kto always estimates the KL: most likely an input forgotten.
    TORCH_WARN_ONCE(fn, ": the kto loss got neither kl nor KL log-probs; it uses z = 0 (TRL ",
                    "always estimates the KL)");
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
