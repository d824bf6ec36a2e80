// SPDX-License-Identifier: Apache-2.0
// Every loss on 64 pairs, forward + backward, against a hand-written libtorch composite of the
// same formula computing the same outputs (loss, per-pair losses, detached rewards), as a
// Python trainer writes it. What is measured is prefopt's overhead: options, checks, result
// structs, and its guarded forms (discopop, ORPO's log1mexp) where they cost extra ops.
//
//   bench_losses [--smoke] [--threads=N] [--device=cuda] [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <prefopt/prefopt.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "bench_main.h"

namespace {

namespace F = prefopt::functional;
using prefopt::DPOLossOptions;
using prefopt::DPOLossType;

struct Inputs {
  at::Tensor pc, pr, rc, rr, nc, nr;
  explicit Inputs(int64_t B) {
    const auto o = at::TensorOptions().device(prefopt_bench::bench_device()).dtype(at::kFloat);
    pc = (-20 + 5 * at::randn({B}, o)).requires_grad_();
    pr = (-24 + 5 * at::randn({B}, o)).requires_grad_();
    rc = pc.detach() + at::randn({B}, o);
    rr = pr.detach() + at::randn({B}, o);
    nc = at::randint(1, 200, {B}, o.dtype(at::kLong));
    nr = at::randint(1, 200, {B}, o.dtype(at::kLong));
  }
  prefopt::PairInputs pair() const {
    return prefopt::PairInputs()
        .policy_chosen_logps(pc)
        .policy_rejected_logps(pr)
        .reference_chosen_logps(rc)
        .reference_rejected_logps(rr)
        .chosen_lengths(nc)
        .rejected_lengths(nr)
        .logps_form(prefopt::LogpsForm::kSum);
  }
};

/// A method returns {loss, chosen_rewards, rejected_rewards}; the benchmark differentiates loss.
using Out = std::vector<at::Tensor>;
using Method = std::function<Out(const Inputs&)>;

constexpr double kBeta = 0.1;

at::Tensor ls(const at::Tensor& x) { return at::log_sigmoid(x); }

/// The composite's rewards, as TRL writes them: β·(π − ref).detach().
Out with_rewards(const Inputs& in, const at::Tensor& loss) {
  return {loss, (in.pc - in.rc).detach() * kBeta, (in.pr - in.rr).detach() * kBeta};
}

Method prefopt_dpo(DPOLossType t, double eps = 0) {
  const auto o = DPOLossOptions().loss_type(t).beta(kBeta).label_smoothing(eps);
  return [o](const Inputs& in) {
    auto r = F::dpo_loss(in.pair(), o);
    return Out{r.loss, r.chosen_rewards, r.rejected_rewards};
  };
}

/// Hand-written composites, one per DPO loss type (TRL ≥ 0.29's formulas).
Out composite_dpo(const std::string& t, const Inputs& in) {
  const double b = kBeta, e = 0.1;
  const auto rho_c = in.pc - in.rc, rho_r = in.pr - in.rr;
  const auto z = (rho_c - rho_r) * b;
  at::Tensor l;
  if (t == "sigmoid") {
    l = -ls(z);
  } else if (t == "hinge") {
    l = at::relu(1 - z);
  } else if (t == "ipo") {
    const auto d = rho_c / in.nc.clamp_min(1) - rho_r / in.nr.clamp_min(1);
    l = (d - 1 / (2 * b)).pow(2);
  } else if (t == "robust") {
    l = (-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e);
  } else if (t == "exo_pair") {
    l = at::sigmoid(z) * (ls(z) - std::log1p(-e)) + at::sigmoid(-z) * (ls(-z) - std::log(e));
  } else if (t == "nca_pair") {
    l = -ls(rho_c * b) - 0.5 * ls(-rho_c * b) - 0.5 * ls(-rho_r * b);
  } else if (t == "bco_pair") {
    l = -ls(rho_c * b) - ls(-rho_r * b);
  } else if (t == "sppo_hard") {
    l = (rho_c - 0.5 / b).pow(2) + (rho_r + 0.5 / b).pow(2);
  } else if (t == "aot") {
    const auto d =
        std::get<0>(at::sort(in.pc - in.pr, 0)) - std::get<0>(at::sort(in.rc - in.rr, 0));
    l = -ls(d * b);
  } else if (t == "aot_unpaired") {
    l = -ls((std::get<0>(at::sort(rho_c, 0)) - std::get<0>(at::sort(rho_r, 0))) * b);
  } else if (t == "apo_zero") {
    l = (1 - at::sigmoid(rho_c * b)) + at::sigmoid(rho_r * b);
  } else if (t == "apo_down") {
    l = at::sigmoid(rho_c * b) + (1 - at::sigmoid(z));
  } else if (t == "discopop") {
    const auto m = at::sigmoid(z / 0.05);
    l = -ls(z) * (1 - m) + at::exp(-z) * m;
  } else if (t == "sigmoid_norm") {
    l = -ls((rho_c / in.nc.clamp_min(1) - rho_r / in.nr.clamp_min(1)) * b);
  } else if (t == "sft") {
    l = (-in.pc.sum() / in.nc.sum().clamp_min(1)).expand({in.pc.size(0)});
  }
  return with_rewards(in, l.mean());
}

struct Case {
  std::string name;
  Method prefopt, composite;
};

std::vector<Case> cases() {
  std::vector<Case> cs;
  for (const char* t :
       {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"}) {
    const std::string name = t;
    const double eps = (name == "robust" || name == "exo_pair") ? 0.1 : 0.0;
    cs.push_back({name, prefopt_dpo(prefopt::dpo_loss_type_from_name(name), eps),
                  [name](const Inputs& in) { return composite_dpo(name, in); }});
  }
  cs.push_back({"cpo_sigmoid",
                [](const Inputs& in) {
                  auto pair = in.pair();  // reference-free: a reference would warn
                  pair.reference_chosen_logps(at::Tensor()).reference_rejected_logps(at::Tensor());
                  auto r = F::cpo_loss(pair);
                  return Out{r.loss, r.chosen_rewards, r.rejected_rewards};
                },
                [](const Inputs& in) {
                  const auto l = -ls((in.pc - in.pr) * kBeta);
                  const auto nll = -in.pc.sum() / in.nc.sum();
                  return Out{l.mean() + nll, in.pc.detach() * kBeta, in.pr.detach() * kBeta};
                }});
  cs.push_back({"simpo",
                [](const Inputs& in) {
                  auto r = F::simpo_loss(in.pc, in.pr);
                  return Out{r.loss, r.chosen_rewards, r.rejected_rewards};
                },
                [](const Inputs& in) {
                  const auto l = -ls((in.pc - in.pr) * 2.0 - 0.5);
                  return Out{l.mean(), in.pc.detach() * 2.0, in.pr.detach() * 2.0};
                }});
  // ORPO on per-token means. The composite is TRL's since 2026-01: fp32 and the two-branch
  // log1mexp (log(−expm1(a)) above −ln 2, log1p(−exp(a)) below); orpo_naive is the naive
  // log1p(−exp(a)) of LLaMA-Factory and Liger, which gives NaN for confident completions.
  auto orpo = [](const Inputs& in) {
    auto r = F::orpo_loss(prefopt::PairInputs()
                              .policy_chosen_logps(in.pc / 100)
                              .policy_rejected_logps(in.pr / 100)
                              .chosen_lengths(in.nc)
                              .logps_form(prefopt::LogpsForm::kMean));
    return Out{r.loss, r.chosen_rewards, r.rejected_rewards};
  };
  auto orpo_composite = [](const Inputs& in, bool naive) {
    const auto a = in.pc / 100, r = in.pr / 100;
    auto log1mexp = [naive](const at::Tensor& x) {
      if (naive) return at::log1p(-at::exp(x));
      return at::where(x > -0.6931471805599453, at::log(-at::expm1(x)), at::log1p(-at::exp(x)));
    };
    const auto lo = (a - r) - (log1mexp(a) - log1mexp(r));
    const auto ratio = ls(lo);
    const auto n = in.nc.to(at::kFloat);
    const auto nll = -(a * n).sum() / n.sum();
    return Out{nll - kBeta * ratio.mean(), a.detach() * kBeta, r.detach() * kBeta};
  };
  cs.push_back({"orpo", orpo, [=](const Inputs& in) { return orpo_composite(in, false); }});
  cs.push_back({"orpo_naive", orpo, [=](const Inputs& in) { return orpo_composite(in, true); }});
  cs.push_back({"kto",
                [](const Inputs& in) {
                  auto r = F::kto_loss(prefopt::KTOInputs()
                                           .policy_chosen_logps(in.pc)
                                           .policy_rejected_logps(in.pr)
                                           .reference_chosen_logps(in.rc)
                                           .reference_rejected_logps(in.rr)
                                           .policy_KL_logps(in.pr.detach())
                                           .reference_KL_logps(in.rc));
                  return Out{r.loss, r.chosen_rewards, r.rejected_rewards};
                },
                [](const Inputs& in) {
                  const auto kl = (in.pr.detach() - in.rc).mean().clamp_min(0).detach();
                  const auto rc = in.pc - in.rc, rr = in.pr - in.rr;
                  const auto l = at::cat(
                      {1 - at::sigmoid(kBeta * (rc - kl)), 1 - at::sigmoid(kBeta * (kl - rr))});
                  return Out{l.mean(), rc.detach() * kBeta, rr.detach() * kBeta};
                }});
  return cs;
}

void run(benchmark::State& state, const Method& m, int64_t B) {
  at::manual_seed(0);
  const Inputs in(B);
  for (auto _ : state) {
    auto out = m(in);
    auto g = torch::autograd::grad({out[0]}, {in.pc, in.pr}, {}, c10::nullopt, false, true);
    benchmark::DoNotOptimize(g);
    prefopt_bench::sync();
  }
}

void register_all(bool smoke) {
  static const auto all = cases();
  const int64_t B = 64;
  for (const auto& c : all) {
    for (const auto& [method, fn] :
         {std::make_pair("prefopt", c.prefopt), std::make_pair("composite", c.composite)}) {
      auto* b = benchmark::RegisterBenchmark(("loss/" + c.name + "/" + method).c_str(),
                                             [fn = fn, B](benchmark::State& s) { run(s, fn, B); });
      b->Unit(benchmark::kMicrosecond);
      if (smoke) {
        b->Iterations(2);
      } else {
        b->Repetitions(7)->ReportAggregatesOnly(true)->MinTime(0.2);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return prefopt_bench::bench_main(argc, argv, register_all); }
