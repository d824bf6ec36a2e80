// SPDX-License-Identifier: Apache-2.0
// Float64 reference losses, written from the formulas of reference/losses.md as plainly as
// possible (log(sigmoid(x)), 1 − sigmoid(x), log1p(−exp(a)), ...), with no stabilisation.
// Differentiable: the tests compare gradients by autograd through these.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>  // torch::autograd::grad, for the gradient checks

#include <cmath>
#include <string>

namespace prefopt_ref {

inline at::Tensor logsig(const at::Tensor& x) { return at::log(at::sigmoid(x)); }

/// The f-divergence score f′(e^ρ) of a log-ratio, constants included (TRL ≥ 1.10).
inline at::Tensor score(const at::Tensor& rho, const std::string& f, double alpha) {
  if (f == "forward_kl") return 1 - at::exp(-rho);
  if (f == "js_divergence") return std::log(2.0) + logsig(rho);
  if (f == "alpha_divergence") {
    if (std::abs(alpha - 1) < 1e-6) return rho;
    return (at::exp((alpha - 1) * rho) - 1) / (alpha - 1);
  }
  return rho;
}

struct DPORef {
  std::string type = "sigmoid";
  std::string f = "reverse_kl";
  double alpha = 0.5, beta = 0.1, eps = 0.0, tau = 0.05;
  bool ipo_per_token = true;
};

/// Per-pair loss of one DPO loss type (sft excluded), inputs fp64 [B].
inline at::Tensor dpo_losses(const DPORef& o, const at::Tensor& pc, const at::Tensor& pr,
                             const at::Tensor& rc, const at::Tensor& rr, const at::Tensor& nc,
                             const at::Tensor& nr, double bco_delta = 0.0) {
  const double b = o.beta, e = o.eps;
  const auto rho_c = pc - rc, rho_r = pr - rr;
  const auto sc = score(rho_c, o.f, o.alpha), sr = score(rho_r, o.f, o.alpha);
  const auto z = b * (sc - sr);
  if (o.type == "sigmoid") return -(1 - e) * logsig(z) - e * logsig(-z);
  if (o.type == "hinge") return at::relu(1 - z);
  if (o.type == "ipo") {
    const auto d =
        o.ipo_per_token ? sc / at::clamp_min(nc, 1) - sr / at::clamp_min(nr, 1) : sc - sr;
    return at::pow(d - 1 / (2 * b), 2);
  }
  if (o.type == "robust") return (-(1 - e) * logsig(z) + e * logsig(-z)) / (1 - 2 * e);
  if (o.type == "exo_pair")
    return at::sigmoid(z) * (logsig(z) - std::log(1 - e)) +
           at::sigmoid(-z) * (logsig(-z) - std::log(e));
  // nca_pair, bco_pair, sppo_hard and the apo types read the raw log-ratios.
  if (o.type == "nca_pair")
    return -logsig(b * rho_c) - 0.5 * logsig(-b * rho_c) - 0.5 * logsig(-b * rho_r);
  if (o.type == "bco_pair")
    return -logsig(b * rho_c - bco_delta) - logsig(-(b * rho_r - bco_delta));
  if (o.type == "sppo_hard") return at::pow(rho_c - 0.5 / b, 2) + at::pow(rho_r + 0.5 / b, 2);
  if (o.type == "aot" || o.type == "aot_unpaired") {
    at::Tensor d;
    if (o.type == "aot") {
      d = std::get<0>(at::sort(pc - pr)) - std::get<0>(at::sort(rc - rr));
    } else {
      d = std::get<0>(at::sort(rho_c)) - std::get<0>(at::sort(rho_r));
    }
    return -(1 - e) * logsig(b * d) - e * logsig(-b * d);
  }
  if (o.type == "apo_zero") return (1 - at::sigmoid(b * rho_c)) + at::sigmoid(b * rho_r);
  if (o.type == "apo_down") return at::sigmoid(b * rho_c) + (1 - at::sigmoid(b * (rho_c - rho_r)));
  if (o.type == "discopop") {
    const auto m = at::sigmoid(z / o.tau);
    return -logsig(z) * (1 - m) + at::exp(-z) * m;
  }
  if (o.type == "sigmoid_norm") {
    const auto zz = b * (sc / at::clamp_min(nc, 1) - sr / at::clamp_min(nr, 1));
    return -(1 - e) * logsig(zz) - e * logsig(-zz);
  }
  throw std::runtime_error("unknown reference loss type " + o.type);
}

/// CPO family per-pair losses on the given (already summed or averaged) log-probs.
inline at::Tensor cpo_losses(const std::string& type, double b, double e, double gamma,
                             double alpha, const at::Tensor& pc, const at::Tensor& pr) {
  auto c = pc, r = pr;
  if (alpha != 0) {
    c = (1 - at::pow(at::exp(pc), -alpha)) / alpha;
    r = (1 - at::pow(at::exp(pr), -alpha)) / alpha;
  }
  auto m = c - r;
  if (type == "hinge") return at::relu(1 - b * m);
  if (type == "ipo") return at::pow(m - 1 / (2 * b), 2);
  if (type == "simpo" || type == "alphapo") m = m - gamma / b;
  return -(1 - e) * logsig(b * m) - e * logsig(-b * m);
}

/// ORPO's log-odds of averaged log-probs, with the naive log(1 − e^a).
inline at::Tensor orpo_log_odds(const at::Tensor& ac, const at::Tensor& ar) {
  return (ac - ar) - (at::log1p(-at::exp(ac)) - at::log1p(-at::exp(ar)));
}

/// KTO per-example losses, desirable then undesirable.
inline at::Tensor kto_losses(double b, double wd, double wu, double z, const at::Tensor& pc,
                             const at::Tensor& rc, const at::Tensor& pu, const at::Tensor& ru,
                             bool apo_zero_unpaired = false) {
  const auto rd = pc - rc, ruu = pu - ru;
  if (apo_zero_unpaired)
    return at::cat({wd * (1 - at::sigmoid(b * rd)), wu * at::sigmoid(b * ruu)});
  return at::cat({wd * (1 - at::sigmoid(b * (rd - z))), wu * (1 - at::sigmoid(b * (z - ruu)))});
}

}  // namespace prefopt_ref
