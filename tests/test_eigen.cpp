// SPDX-License-Identifier: Apache-2.0
// prefopt/eigen.h against the libtorch layer, which is its reference: every loss, option and
// gradient (the libtorch layer's autograd; the reference vectors, which the libtorch layer
// detaches, against autograd through tests/reference and central finite differences of the
// libtorch layer's loss), the numeric extremes of the libtorch tests, float against double,
// log-prob gathering and its gradient, the metrics and the error messages.
#include <prefopt/eigen.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>
#include <prefopt/metrics.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
namespace pe = prefopt::eigen;
using prefopt::DPOLossType;
using prefopt::LogpsForm;
using prefopt::NLLNormalization;
using prefopt_test::AllClose;

namespace {

// ------------------------------------------------------------------------------ conversions

template <typename T>
at::ScalarType dtype_of() {
  return std::is_same<T, double>::value ? at::kDouble : at::kFloat;
}

template <typename T>
at::Tensor to_torch(const pe::Vector<T>& v) {
  auto t = at::empty({v.size()}, at::TensorOptions().dtype(dtype_of<T>()));
  if (v.size()) std::memcpy(t.data_ptr(), v.data(), sizeof(T) * static_cast<size_t>(v.size()));
  return t;
}

template <typename T>
pe::Vector<T> to_eigen(const at::Tensor& t) {
  const auto c = t.detach().to(at::kCPU, dtype_of<T>()).contiguous();
  pe::Vector<T> v(c.numel());
  if (v.size()) std::memcpy(v.data(), c.data_ptr(), sizeof(T) * static_cast<size_t>(v.size()));
  return v;
}

inline Eigen::VectorXd lengths_of(const at::Tensor& n) { return to_eigen<double>(n); }

template <typename T>
at::Tensor scalar_torch(T v) {
  return at::scalar_tensor(static_cast<double>(v), at::TensorOptions().dtype(dtype_of<T>()));
}

pe::Reduction reduction_of(const prefopt::LossReduction& r) {
  if (std::holds_alternative<torch::enumtype::kNone>(r)) return pe::Reduction::kNone;
  if (std::holds_alternative<torch::enumtype::kSum>(r)) return pe::Reduction::kSum;
  return pe::Reduction::kMean;
}

prefopt::LossReduction torch_reduction(pe::Reduction r) {
  switch (r) {
    case pe::Reduction::kNone:
      return torch::kNone;
    case pe::Reduction::kSum:
      return torch::kSum;
    default:
      return torch::kMean;
  }
}

pe::DPOLossOptions eigen_of(const prefopt::DPOLossOptions& o) {
  return pe::DPOLossOptions()
      .loss_type(o.loss_type())
      .loss_weights(o.loss_weights())
      .beta(o.beta())
      .label_smoothing(o.label_smoothing())
      .cdpo(o.cdpo())
      .f_divergence_type(o.f_divergence_type())
      .f_alpha_divergence_coef(o.f_alpha_divergence_coef())
      .discopop_tau(o.discopop_tau())
      .ipo_normalization(o.ipo_normalization())
      .reference_free(o.reference_free())
      .rpo_alpha(o.rpo_alpha())
      .nll_normalization(o.nll_normalization())
      .weighted_rewards(o.weighted_rewards())
      .bco_running_mean(o.bco_running_mean())
      .reduction(reduction_of(o.reduction()));
}

/// The libtorch `loss` (0-dim or [B]) as the Eigen layer's [1] or [B].
at::Tensor as_vector(const at::Tensor& loss) { return loss.dim() == 0 ? loss.reshape({1}) : loss; }

/// Gradients of `loss` (of Σ loss for a vector) with respect to `inputs`; zeros where unused.
std::vector<at::Tensor> grads_of(const at::Tensor& loss, const std::vector<at::Tensor>& inputs) {
  const auto go = at::ones_like(loss);
  auto g = torch::autograd::grad({loss}, inputs, {go}, /*retain_graph=*/true,
                                 /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t i = 0; i < g.size(); ++i)
    if (!g[i].defined()) g[i] = at::zeros_like(inputs[i]);
  return g;
}

/// Central finite differences of the scalar `f` at `x` (fp64).
at::Tensor finite_differences(const std::function<double(const at::Tensor&)>& f,
                              const at::Tensor& x0) {
  const auto x = x0.detach().to(at::kDouble).clone();
  auto g = at::zeros_like(x);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double xi = x[i].item<double>();
    const double h = 1e-6 * std::max(1.0, std::abs(xi));
    auto xp = x.clone(), xm = x.clone();
    xp[i] = xi + h;
    xm[i] = xi - h;
    g[i] = (f(xp) - f(xm)) / (2 * h);
  }
  return g;
}

constexpr double kRtol = 1e-12, kAtol = 1e-14;

#define EXPECT_VEC(actual, expected, rtol, atol, what) \
  EXPECT_TRUE(AllClose(to_torch(actual), (expected), (rtol), (atol))) << (what)

// ------------------------------------------------------------------------------ pair batches

/// Random pairs in fp64, as test_dpo.cpp draws them: sums around −20, the reference near the
/// policy (β·Δ = O(1)), zero-length chosen completions included; with `form` kMean the
/// log-probs are the per-token means of those sums.
struct Pairs {
  at::Tensor pc, pr, rc, rr, nc, nr, w;
  LogpsForm form;
  explicit Pairs(int64_t B, LogpsForm f = LogpsForm::kSum, double spread = 8.0) : form(f) {
    const auto o = at::TensorOptions().dtype(at::kDouble);
    pc = -20 + spread * at::randn({B}, o);
    pr = -24 + spread * at::randn({B}, o);
    rc = pc + 2 * at::randn({B}, o);
    rr = pr + 2 * at::randn({B}, o);
    nc = at::randint(0, 40, {B}, at::kLong);
    nr = at::randint(1, 40, {B}, at::kLong);
    w = 0.5 + at::rand({B}, o);
    if (form == LogpsForm::kMean) {
      const auto dc = nc.clamp_min(1).to(at::kDouble), dr = nr.clamp_min(1).to(at::kDouble);
      pc = pc / dc, rc = rc / dc, pr = pr / dr, rr = rr / dr;
    }
  }
};

/// What a comparison feeds both layers.
struct Feed {
  bool reference = true, weights = false, lengths = true;
  std::optional<double> nll;
};

/// The libtorch inputs, with fresh leaves for the policy (and the host NLL).
struct TorchPairs {
  at::Tensor pc, pr, nll;
  prefopt::PairInputs in;
  std::vector<at::Tensor> leaves() const {
    std::vector<at::Tensor> v{pc, pr};
    if (nll.defined()) v.push_back(nll);
    return v;
  }
};

TorchPairs torch_pairs(const Pairs& p, const Feed& f, at::ScalarType dt = at::kDouble) {
  TorchPairs t;
  t.pc = p.pc.to(dt).detach().clone().requires_grad_();
  t.pr = p.pr.to(dt).detach().clone().requires_grad_();
  t.in = prefopt::PairInputs().policy_chosen_logps(t.pc).policy_rejected_logps(t.pr).logps_form(
      p.form);
  if (f.reference) t.in.reference_chosen_logps(p.rc.to(dt)).reference_rejected_logps(p.rr.to(dt));
  if (f.lengths) t.in.chosen_lengths(p.nc).rejected_lengths(p.nr);
  if (f.weights) t.in.weights(p.w.to(dt));
  if (f.nll) {
    t.nll = at::scalar_tensor(*f.nll, at::TensorOptions().dtype(dt)).requires_grad_();
    t.in.nll_loss(t.nll);
  }
  return t;
}

template <typename T>
pe::PairInputs<T> eigen_pairs(const Pairs& p, const Feed& f) {
  auto in = pe::PairInputs<T>()
                .policy_chosen_logps(to_eigen<T>(p.pc))
                .policy_rejected_logps(to_eigen<T>(p.pr))
                .logps_form(p.form);
  if (f.reference)
    in.reference_chosen_logps(to_eigen<T>(p.rc)).reference_rejected_logps(to_eigen<T>(p.rr));
  if (f.lengths) in.chosen_lengths(lengths_of(p.nc)).rejected_lengths(lengths_of(p.nr));
  if (f.weights) in.weights(to_eigen<T>(p.w));
  if (f.nll) in.nll_loss(static_cast<T>(*f.nll));
  return in;
}

/// The libtorch layer's DPO loss summed (what the Eigen gradients differentiate), as a function
/// of one of the reference vectors, for finite differences.
double torch_dpo_total(const Pairs& p, const Feed& f, const prefopt::DPOLossOptions& o,
                       const at::Tensor* rc, const at::Tensor* rr) {
  auto in = prefopt::PairInputs()
                .policy_chosen_logps(p.pc)
                .policy_rejected_logps(p.pr)
                .reference_chosen_logps(rc ? *rc : p.rc)
                .reference_rejected_logps(rr ? *rr : p.rr)
                .logps_form(p.form);
  if (f.lengths) in.chosen_lengths(p.nc).rejected_lengths(p.nr);
  if (f.weights) in.weights(p.w);
  if (f.nll) in.nll_loss(at::scalar_tensor(*f.nll, at::kDouble));
  return F::dpo_loss(in, o).loss.sum().item<double>();
}

/// Compares the Eigen layer's DPO loss, outputs and gradients with the libtorch layer's in fp64:
/// policy gradients against autograd to 1e-12, reference gradients against central finite
/// differences of the libtorch loss (it detaches the reference) to 1e-6.
void expect_dpo_matches(const Pairs& p, const Feed& f, const prefopt::DPOLossOptions& o,
                        const std::string& what, const double* bco_delta = nullptr) {
  SCOPED_TRACE(what);
  const auto t = torch_pairs(p, f);
  const auto tr = bco_delta ? F::dpo_loss(t.in, at::scalar_tensor(*bco_delta, at::kDouble), o)
                            : F::dpo_loss(t.in, o);
  const auto ein = eigen_pairs<double>(p, f);
  const auto er =
      bco_delta ? pe::dpo_loss(ein, *bco_delta, eigen_of(o)) : pe::dpo_loss(ein, eigen_of(o));
  EXPECT_VEC(er.loss, as_vector(tr.loss), kRtol, kAtol, "loss");
  EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
  EXPECT_VEC(er.chosen_rewards, tr.chosen_rewards, kRtol, kAtol, "chosen_rewards");
  EXPECT_VEC(er.rejected_rewards, tr.rejected_rewards, kRtol, kAtol, "rejected_rewards");
  EXPECT_VEC(er.chosen_logps, tr.chosen_logps, kRtol, kAtol, "chosen_logps");
  EXPECT_VEC(er.rejected_logps, tr.rejected_logps, kRtol, kAtol, "rejected_logps");
  EXPECT_EQ(er.nll_loss.has_value(), tr.nll_loss.defined());
  if (er.nll_loss && tr.nll_loss.defined()) {
    EXPECT_NEAR(*er.nll_loss, tr.nll_loss.item<double>(), 1e-12 * std::abs(*er.nll_loss) + 1e-14);
  }
  const auto g = grads_of(tr.loss, t.leaves());
  EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad_policy_chosen");
  EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad_policy_rejected");
  if (f.nll) {
    EXPECT_NEAR(er.grad_nll_loss, g[2].item<double>(), 1e-12);
  }
  if (!f.reference) {
    EXPECT_EQ(er.grad_reference_chosen.size(), 0);
    return;
  }
  if (bco_delta) return;  // the finite differences below call the overload without δ
  const auto frc = finite_differences(
      [&](const at::Tensor& x) { return torch_dpo_total(p, f, o, &x, nullptr); }, p.rc);
  const auto frr = finite_differences(
      [&](const at::Tensor& x) { return torch_dpo_total(p, f, o, nullptr, &x); }, p.rr);
  EXPECT_VEC(er.grad_reference_chosen, frc, 1e-6, 1e-8, "grad_reference_chosen");
  EXPECT_VEC(er.grad_reference_rejected, frr, 1e-6, 1e-8, "grad_reference_rejected");
}

const std::vector<DPOLossType> kAllDPOTypes = {
    DPOLossType::kSigmoid,     DPOLossType::kHinge,       DPOLossType::kIPO,
    DPOLossType::kRobust,      DPOLossType::kExoPair,     DPOLossType::kNCAPair,
    DPOLossType::kBCOPair,     DPOLossType::kSPPOHard,    DPOLossType::kAOT,
    DPOLossType::kAOTUnpaired, DPOLossType::kAPOZero,     DPOLossType::kAPODown,
    DPOLossType::kDiscoPOP,    DPOLossType::kSigmoidNorm, DPOLossType::kSFT};

/// Options of one type with the ε it needs (robust, exo_pair, aot, aot_unpaired).
prefopt::DPOLossOptions dpo_options(DPOLossType t) {
  auto o = prefopt::DPOLossOptions().loss_type(t);
  if (t == DPOLossType::kRobust || t == DPOLossType::kExoPair || t == DPOLossType::kAOT ||
      t == DPOLossType::kAOTUnpaired)
    o.label_smoothing(0.1);
  return o;
}

std::string name(DPOLossType t) { return prefopt::detail::name_of(t); }

}  // namespace

// Named for ctest: every test of the Eigen layer is eigen.* (`ctest -R eigen`).
struct eigen : prefopt_test::SeededTest {};

// ------------------------------------------------------------------------------ DPO family

TEST_F(eigen, DPOEveryTypeFormAndReductionMatchesLibtorch) {
  for (int64_t B : {1, 3, 17}) {
    for (auto form : {LogpsForm::kSum, LogpsForm::kMean}) {
      const Pairs p(B, form);
      for (auto t : kAllDPOTypes) {
        for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
          auto o = dpo_options(t).reduction(torch_reduction(red));
          expect_dpo_matches(p, {}, o,
                             name(t) + " B=" + std::to_string(B) +
                                 (form == LogpsForm::kMean ? " means" : " sums") + " red " +
                                 std::to_string(static_cast<int>(red)));
        }
      }
    }
  }
}

// The reference gradients against autograd through the differentiable fp64 formulas of
// tests/reference (the libtorch layer detaches the reference), per type, to 1e-10.
TEST_F(eigen, DPOReferenceGradientsMatchAutogradThroughTheReferenceFormulas) {
  for (int64_t B : {1, 3, 17}) {
    const Pairs p(B);
    for (auto t : kAllDPOTypes) {
      if (t == DPOLossType::kSFT) continue;
      const auto o = dpo_options(t);
      prefopt_ref::DPORef ref;
      ref.type = name(t);
      ref.beta = o.beta();
      ref.eps = (t == DPOLossType::kSigmoid || t == DPOLossType::kSigmoidNorm)
                    ? 0.0
                    : o.label_smoothing();
      const auto rc = p.rc.clone().requires_grad_(), rr = p.rr.clone().requires_grad_();
      const auto pc = p.pc.clone().requires_grad_(), pr = p.pr.clone().requires_grad_();
      const auto loss =
          prefopt_ref::dpo_losses(ref, pc, pr, rc, rr, p.nc.to(at::kDouble), p.nr.to(at::kDouble))
              .mean();
      const auto g = grads_of(loss, {pc, pr, rc, rr});
      const auto er = pe::dpo_loss(eigen_pairs<double>(p, {}), eigen_of(o));
      SCOPED_TRACE(name(t) + " B=" + std::to_string(B));
      EXPECT_VEC(er.grad_policy_chosen, g[0], 1e-10, 1e-13, "pc");
      EXPECT_VEC(er.grad_policy_rejected, g[1], 1e-10, 1e-13, "pr");
      EXPECT_VEC(er.grad_reference_chosen, g[2], 1e-10, 1e-13, "rc");
      EXPECT_VEC(er.grad_reference_rejected, g[3], 1e-10, 1e-13, "rr");
    }
  }
}

TEST_F(eigen, DPOFDivergencesMatchLibtorch) {
  const Pairs p(17);
  for (auto f : {prefopt::FDivergence::kForwardKL, prefopt::FDivergence::kJSDivergence,
                 prefopt::FDivergence::kAlphaDivergence}) {
    for (double alpha : {0.5, 1.0, 1.5, -0.5}) {
      if (f != prefopt::FDivergence::kAlphaDivergence && alpha != 0.5) continue;
      for (auto t : kAllDPOTypes) {
        // The other types refuse an f-divergence in both layers (TRL ≥ 1.10).
        if (!prefopt::detail::dpo_takes_f_divergence(t)) continue;
        auto o = dpo_options(t).f_divergence_type(f).f_alpha_divergence_coef(alpha);
        expect_dpo_matches(
            p, {}, o, name(t) + " " + prefopt::detail::name_of(f) + " α " + std::to_string(alpha));
      }
    }
  }
}

// The exponentials of forward_kl and alpha_divergence are capped at 700 in double (80 in
// float): above the cap the score is constant and its gradient 0, in both layers.
TEST_F(eigen, DPOFDivergenceCapsMatchLibtorch) {
  Pairs p(5);
  // ρ_c = −800 and −750 (forward_kl: e^{−ρ} capped), +800 (alpha: e^{(α−1)ρ} capped for α = 2).
  p.pc = at::tensor({-900.0, -800.0, -20.0, 780.0, -10.0}, at::kDouble);
  p.rc = at::tensor({-100.0, -50.0, -21.0, -20.0, -10.5}, at::kDouble);
  for (auto f : {prefopt::FDivergence::kForwardKL, prefopt::FDivergence::kAlphaDivergence}) {
    for (auto t : {DPOLossType::kSigmoid, DPOLossType::kHinge, DPOLossType::kDiscoPOP,
                   DPOLossType::kSigmoidNorm}) {
      auto o = dpo_options(t).f_divergence_type(f).f_alpha_divergence_coef(2.0);
      SCOPED_TRACE(name(t) + " " + prefopt::detail::name_of(f));
      const auto t_in = torch_pairs(p, {});
      const auto tr = F::dpo_loss(t_in.in, o);
      const auto er = pe::dpo_loss(eigen_pairs<double>(p, {}), eigen_of(o));
      EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
      const auto g = grads_of(tr.loss, t_in.leaves());
      EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad pc");
      EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad pr");
    }
  }
  // The float cap is 80: ρ = −90 under forward_kl gives a constant score, gradient 0.
  const pe::Vector<float> pc = (pe::Vector<float>(2) << -90.f, -10.f).finished();
  const pe::Vector<float> z = pe::Vector<float>::Zero(2);
  const auto er = pe::dpo_loss<float>(
      pc, z, z, z, pe::DPOLossOptions().f_divergence_type(prefopt::FDivergence::kForwardKL));
  const auto tpc = to_torch(pc).requires_grad_();
  const auto tz = to_torch(z);
  const auto tr =
      F::dpo_loss(tpc, tz, tz, tz,
                  prefopt::DPOLossOptions().f_divergence_type(prefopt::FDivergence::kForwardKL));
  EXPECT_EQ(er.grad_policy_chosen(0), 0.f);
  EXPECT_TRUE(AllClose(to_torch(er.grad_policy_chosen), grads_of(tr.loss, {tpc})[0], 1e-6, 1e-9));
}

TEST_F(eigen, DPOOptionsMatchLibtorch) {
  for (int64_t B : {1, 3, 17}) {
    const Pairs p(B), pm(B, LogpsForm::kMean);
    const std::string b = " B=" + std::to_string(B);
    using O = prefopt::DPOLossOptions;
    // cDPO on sigmoid and sigmoid_norm; IPO without normalisation.
    expect_dpo_matches(p, {}, O().label_smoothing(0.2).cdpo(true), "cdpo sigmoid" + b);
    expect_dpo_matches(p, {},
                       O().loss_type(DPOLossType::kSigmoidNorm).label_smoothing(0.2).cdpo(true),
                       "cdpo sigmoid_norm" + b);
    expect_dpo_matches(
        p, {}, O().loss_type(DPOLossType::kIPO).ipo_normalization(prefopt::IPONormalization::kNone),
        "ipo none" + b);
    // reference_free, with and without a reference.
    for (auto t : {DPOLossType::kSigmoid, DPOLossType::kAOT, DPOLossType::kAOTUnpaired,
                   DPOLossType::kAPOZero}) {
      auto o = dpo_options(t).reference_free(true);
      expect_dpo_matches(p, {}, o, "reference_free " + name(t) + b);
      Feed no_ref;
      no_ref.reference = false;
      expect_dpo_matches(p, no_ref, o, "reference_free, no reference " + name(t) + b);
    }
    // RPO and sft under both NLL normalisations, in both forms, and the host's NLL.
    for (auto norm : {NLLNormalization::kTokenMean, NLLNormalization::kSequenceMean}) {
      for (const Pairs* q : {&p, &pm}) {
        for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
          const auto r = torch_reduction(red);
          const std::string s =
              std::string(norm == NLLNormalization::kTokenMean ? " token" : " seq") +
              (q == &pm ? " means" : " sums") + " red " + std::to_string(static_cast<int>(red)) + b;
          expect_dpo_matches(*q, {}, O().rpo_alpha(0.7).nll_normalization(norm).reduction(r),
                             "rpo" + s);
          expect_dpo_matches(*q, {},
                             O().loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                                 .loss_weights({1.0, 0.4})
                                 .nll_normalization(norm)
                                 .reduction(r),
                             "sigmoid+sft" + s);
          Feed host;
          host.nll = 1.25;
          expect_dpo_matches(
              *q, host,
              O().loss_type({DPOLossType::kIPO, DPOLossType::kSFT}).rpo_alpha(0.3).reduction(r),
              "host nll" + s);
        }
      }
    }
    // MPO: several types, their weights, weighted rewards, per-pair weights (WPO).
    const auto mpo = O().loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair, DPOLossType::kSFT,
                                    DPOLossType::kRobust, DPOLossType::kExoPair})
                         .loss_weights({0.8, 0.2, 1.0, 0.5, 0.25})
                         .label_smoothing(0.15);
    expect_dpo_matches(p, {}, mpo, "mpo" + b);
    expect_dpo_matches(p, {}, O(mpo).weighted_rewards(true), "mpo weighted rewards" + b);
    Feed wpo;
    wpo.weights = true;
    for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone})
      expect_dpo_matches(p, wpo, O(mpo).rpo_alpha(0.5).reduction(torch_reduction(red)), "wpo" + b);
    expect_dpo_matches(pm, wpo, O().loss_type(DPOLossType::kIPO), "wpo ipo means" + b);
    // bco_pair's baseline δ.
    const double delta = -0.37;
    expect_dpo_matches(p, {}, O().loss_type(DPOLossType::kBCOPair), "bco delta" + b, &delta);
  }
}

// DPOLoss with bco_running_mean: the baseline's update and the loss, call after call, as the
// libtorch functor.
TEST_F(eigen, DPOLossFunctorKeepsTheBCOBaselineLikeLibtorch) {
  const auto o = prefopt::DPOLossOptions()
                     .loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair})
                     .bco_running_mean(true);
  const prefopt::DPOLoss tl(o);
  const pe::DPOLoss el(eigen_of(o));
  for (int step = 0; step < 3; ++step) {
    const Pairs p(step == 1 ? 3 : 17);
    const auto t = torch_pairs(p, {});
    const auto tr = tl(t.in);
    const auto er = el(eigen_pairs<double>(p, {}));
    EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
    const auto g = grads_of(tr.loss, t.leaves());
    EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad pc");
    EXPECT_NEAR(el.bco_baseline().mean(), tl.bco_baseline().mean(), 1e-14);
    EXPECT_NEAR(el.bco_baseline().var(), tl.bco_baseline().var(), 1e-13);
    EXPECT_EQ(el.bco_baseline().count(), tl.bco_baseline().count());
  }
  pe::BCOBaseline b;
  b.load(0.5, 2.0, 3.0);
  EXPECT_DOUBLE_EQ(b.update(1.5, 0.0, 1.0), 0.75);
}

// aot sorts the batch: the gradient goes back through the permutations. Central differences
// of the Eigen layer's own loss, and the libtorch layer's autograd.
TEST_F(eigen, DPOSortingGradientsMatchFiniteDifferences) {
  for (auto t : {DPOLossType::kAOT, DPOLossType::kAOTUnpaired}) {
    for (bool ref_free : {false, true}) {
      const Pairs p(17);
      const auto o = dpo_options(t).reference_free(ref_free);
      expect_dpo_matches(p, {}, o, name(t) + (ref_free ? " reference_free" : ""));
      const auto eo = eigen_of(o);
      const auto base = eigen_pairs<double>(p, {});
      const auto loss_at = [&](int which, const at::Tensor& x) {
        auto in = base;
        const auto v = to_eigen<double>(x);
        if (which == 0) in.policy_chosen_logps(v);
        if (which == 1) in.policy_rejected_logps(v);
        if (which == 2) in.reference_chosen_logps(v);
        if (which == 3) in.reference_rejected_logps(v);
        return pe::dpo_loss(in, eo).loss(0);
      };
      const auto er = pe::dpo_loss(base, eo);
      const pe::Vector<double>* grads[4] = {&er.grad_policy_chosen, &er.grad_policy_rejected,
                                            &er.grad_reference_chosen, &er.grad_reference_rejected};
      const at::Tensor* xs[4] = {&p.pc, &p.pr, &p.rc, &p.rr};
      for (int which = 0; which < 4; ++which) {
        const auto fd =
            finite_differences([&](const at::Tensor& x) { return loss_at(which, x); }, *xs[which]);
        EXPECT_VEC(*grads[which], fd, 1e-6, 1e-9, name(t) + " input " + std::to_string(which));
      }
    }
  }
}

// discopop's guarded form: against the libtorch layer, the exact value, and finite differences
// where the naive product would overflow.
TEST_F(eigen, DPODiscoPOPGuardedFormAndGradient) {
  const auto pc = at::tensor({-500.0, -80.0, 3.0, 400.0, -0.4, 0.0}, at::kDouble);
  const auto z = at::zeros({6}, at::kDouble);
  Pairs p(6);
  p.pc = pc, p.pr = z, p.rc = z, p.rr = z;
  for (double beta : {0.1, 1.0, 10.0}) {
    const auto o = prefopt::DPOLossOptions().loss_type(DPOLossType::kDiscoPOP).beta(beta);
    const auto t = torch_pairs(p, {});
    const auto tr = F::dpo_loss(t.in, o);
    const auto er = pe::dpo_loss(eigen_pairs<double>(p, {}), eigen_of(o));
    EXPECT_VEC(er.losses, tr.losses, kRtol, 1e-300, "losses");
    const auto g = grads_of(tr.loss, t.leaves());
    EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad");
    const auto fd = finite_differences(
        [&](const at::Tensor& x) {
          auto in = eigen_pairs<double>(p, {});
          in.policy_chosen_logps(to_eigen<double>(x));
          return pe::dpo_loss(in, eigen_of(o)).loss(0);
        },
        pc);
    EXPECT_VEC(er.grad_policy_chosen, fd, 1e-5, 1e-9, "finite differences");
  }
}

// tests/test_dpo.cpp's ExtremeMarginsStayFinite: |β·Δ| up to 1e4 (1e5 before β) and
// zero-length completions, in double and float; the Eigen layer must match the libtorch one
// and stay finite.
TEST_F(eigen, DPOExtremeMarginsMatchLibtorchAndStayFinite) {
  for (double scale : {-1e5, -1e4, 1e4, 1e5}) {
    for (auto t : kAllDPOTypes) {
      auto o = dpo_options(t);
      Feed f;
      Pairs p(3);
      p.pc = at::tensor({scale / 2, 0.0, scale}, at::kDouble);
      p.pr = at::tensor({-scale / 2, -scale, 0.0}, at::kDouble);
      p.rc = at::zeros({3}, at::kDouble), p.rr = at::zeros({3}, at::kDouble);
      p.nc = p.nr = at::tensor({3, 0, 5});
      const std::string what = name(t) + " scale " + std::to_string(scale);
      {  // double
        SCOPED_TRACE(what + " double");
        const auto tp = torch_pairs(p, f);
        const auto tr = F::dpo_loss(tp.in, o);
        const auto er = pe::dpo_loss(eigen_pairs<double>(p, f), eigen_of(o));
        EXPECT_TRUE(er.losses.allFinite() && er.grad_policy_chosen.allFinite() &&
                    er.grad_policy_rejected.allFinite() && er.grad_reference_chosen.allFinite());
        EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
        const auto g = grads_of(tr.loss, tp.leaves());
        EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad pc");
        EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad pr");
      }
      {  // float
        SCOPED_TRACE(what + " float");
        const auto tp = torch_pairs(p, f, at::kFloat);
        const auto tr = F::dpo_loss(tp.in, o);
        const auto er = pe::dpo_loss(eigen_pairs<float>(p, f), eigen_of(o));
        EXPECT_TRUE(er.losses.allFinite() && er.grad_policy_chosen.allFinite() &&
                    er.grad_policy_rejected.allFinite() && er.grad_reference_chosen.allFinite());
        EXPECT_VEC(er.losses, tr.losses, 1e-6, 1e-6, "losses");
        const auto g = grads_of(tr.loss, tp.leaves());
        EXPECT_VEC(er.grad_policy_chosen, g[0], 1e-6, 1e-7, "grad pc");
        EXPECT_VEC(er.grad_policy_rejected, g[1], 1e-6, 1e-7, "grad pr");
      }
    }
  }
}

// Float inputs: against the libtorch layer in float (the same fp32 arithmetic) and against the
// fp64 results on the same rounded inputs (float tolerance).
TEST_F(eigen, DPOFloatMatchesLibtorchFloatAndDouble) {
  Pairs p(17);
  for (at::Tensor* t : {&p.pc, &p.pr, &p.rc, &p.rr}) *t = t->to(at::kFloat).to(at::kDouble);
  for (auto t : kAllDPOTypes) {
    for (auto form : {LogpsForm::kSum, LogpsForm::kMean}) {
      p.form = form;
      const auto o = dpo_options(t);
      SCOPED_TRACE(name(t) + (form == LogpsForm::kMean ? " means" : " sums"));
      const auto tf = torch_pairs(p, {}, at::kFloat);
      const auto trf = F::dpo_loss(tf.in, o);
      const auto ef = pe::dpo_loss(eigen_pairs<float>(p, {}), eigen_of(o));
      const auto ed = pe::dpo_loss(eigen_pairs<double>(p, {}), eigen_of(o));
      EXPECT_VEC(ef.losses, trf.losses, 1e-5, 1e-6, "float losses vs libtorch float");
      const auto g = grads_of(trf.loss, tf.leaves());
      EXPECT_VEC(ef.grad_policy_chosen, g[0], 1e-5, 1e-7, "float grad pc vs libtorch float");
      EXPECT_VEC(ef.grad_policy_rejected, g[1], 1e-5, 1e-7, "float grad pr vs libtorch float");
      EXPECT_VEC(ef.losses, to_torch(ed.losses), 1e-4, 1e-5, "float vs double losses");
      EXPECT_VEC(ef.grad_policy_chosen, to_torch(ed.grad_policy_chosen), 1e-4, 1e-6,
                 "float vs double grad pc");
      EXPECT_VEC(ef.grad_reference_rejected, to_torch(ed.grad_reference_rejected), 1e-4, 1e-6,
                 "float vs double grad rr");
    }
  }
}

// An empty batch gives 0 (mean and sum) and empty vectors, as the libtorch layer does.
TEST_F(eigen, EmptyBatchesGiveZero) {
  const Pairs p(0);
  for (auto t : kAllDPOTypes) {
    for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone})
      expect_dpo_matches(p, {}, dpo_options(t).reduction(torch_reduction(red)), "empty " + name(t));
  }
  const auto e = pe::Vector<double>(0);
  const auto in = pe::PairInputs<double>()
                      .policy_chosen_logps(e)
                      .policy_rejected_logps(e)
                      .chosen_lengths(Eigen::VectorXd(0))
                      .logps_form(LogpsForm::kMean);
  EXPECT_EQ(pe::orpo_loss(in).loss(0), 0.0);
  EXPECT_EQ(pe::cpo_loss(in, pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO)).loss(0),
            0.0);
  const auto k = pe::kto_loss(pe::KTOInputs<double>()
                                  .policy_chosen_logps(e)
                                  .policy_rejected_logps(e)
                                  .reference_chosen_logps(e)
                                  .reference_rejected_logps(e)
                                  .policy_KL_logps(e)
                                  .reference_KL_logps(e));
  EXPECT_EQ(k.loss(0), 0.0);
  EXPECT_EQ(k.kl, 0.0);
}

// ------------------------------------------------------------------------------ CPO, TPO

namespace {

struct CPOCase {
  prefopt::CPOLossOptions o;
  std::string what;
};

void expect_cpo_matches(const Pairs& p, const Feed& f, const prefopt::CPOLossOptions& o,
                        const std::string& what) {
  SCOPED_TRACE(what);
  const auto t = torch_pairs(p, f);
  const auto tr = F::cpo_loss(t.in, o);
  const auto eo = pe::CPOLossOptions()
                      .loss_type(o.loss_type())
                      .beta(o.beta())
                      .label_smoothing(o.label_smoothing())
                      .simpo_gamma(o.simpo_gamma())
                      .cpo_alpha(o.cpo_alpha())
                      .alpha(o.alpha())
                      .nll_normalization(o.nll_normalization())
                      .reduction(reduction_of(o.reduction()));
  const auto er = pe::cpo_loss(eigen_pairs<double>(p, f), eo);
  EXPECT_VEC(er.loss, as_vector(tr.loss), kRtol, kAtol, "loss");
  EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
  EXPECT_VEC(er.chosen_rewards, tr.chosen_rewards, kRtol, kAtol, "chosen_rewards");
  EXPECT_VEC(er.rejected_rewards, tr.rejected_rewards, kRtol, kAtol, "rejected_rewards");
  EXPECT_VEC(er.chosen_logps, tr.chosen_logps, kRtol, kAtol, "chosen_logps");
  EXPECT_VEC(er.rejected_logps, tr.rejected_logps, kRtol, kAtol, "rejected_logps");
  EXPECT_EQ(er.nll_loss.has_value(), tr.nll_loss.defined());
  if (er.nll_loss && tr.nll_loss.defined()) {
    EXPECT_NEAR(*er.nll_loss, tr.nll_loss.item<double>(), 1e-12 * std::abs(*er.nll_loss) + 1e-14);
  }
  const auto g = grads_of(tr.loss, t.leaves());
  EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad_policy_chosen");
  EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad_policy_rejected");
  if (f.nll) {
    EXPECT_NEAR(er.grad_nll_loss, g[2].item<double>(), 1e-12);
  }
}

}  // namespace

TEST_F(eigen, CPOSimPOAlphaPOMatchLibtorch) {
  using prefopt::CPOLossType;
  for (int64_t B : {1, 3, 17}) {
    for (auto form : {LogpsForm::kSum, LogpsForm::kMean}) {
      const Pairs p(B, form, 3.0);
      for (auto t : {CPOLossType::kSigmoid, CPOLossType::kHinge, CPOLossType::kIPO,
                     CPOLossType::kSimPO, CPOLossType::kAlphaPO}) {
        for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
          for (auto norm : {NLLNormalization::kTokenMean, NLLNormalization::kSequenceMean}) {
            const bool smooth = t != CPOLossType::kHinge && t != CPOLossType::kIPO;
            auto o = prefopt::CPOLossOptions()
                         .loss_type(t)
                         .beta(t == CPOLossType::kSimPO ? 2.0 : 0.5)
                         .label_smoothing(smooth ? 0.1 : 0.0)
                         .simpo_gamma(0.7)
                         .cpo_alpha(0.6)
                         .alpha(t == CPOLossType::kAlphaPO ? 0.25 : 0.0)
                         .nll_normalization(norm)
                         .reduction(torch_reduction(red));
            const std::string what = std::string(prefopt::detail::name_of(t)) +
                                     " B=" + std::to_string(B) +
                                     (form == LogpsForm::kMean ? " means" : " sums") + " red " +
                                     std::to_string(static_cast<int>(red)) +
                                     (norm == NLLNormalization::kTokenMean ? " token" : " seq");
            expect_cpo_matches(p, {}, o, what);
            Feed host;
            host.nll = 0.8;
            expect_cpo_matches(p, host, o, what + " host nll");
            expect_cpo_matches(p, {}, prefopt::CPOLossOptions(o).cpo_alpha(0), what + " no nll");
            // AlphaPO's map on every type.
            expect_cpo_matches(p, {}, prefopt::CPOLossOptions(o).alpha(-0.3), what + " alpha");
          }
        }
      }
    }
  }
  // simpo_loss: SimPO's own defaults, and the two-vector overload (means).
  const Pairs p(9, LogpsForm::kMean, 3.0);
  const auto t = torch_pairs(p, {});
  const auto tr = F::simpo_loss(t.pc, t.pr);
  const auto er = pe::simpo_loss<double>(to_eigen<double>(p.pc), to_eigen<double>(p.pr));
  EXPECT_VEC(er.loss, as_vector(tr.loss), kRtol, kAtol, "simpo loss");
  const auto g = grads_of(tr.loss, t.leaves());
  EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "simpo grad pc");
  const auto tr2 = F::simpo_loss(t.in, prefopt::SimPOLossOptions().cpo_alpha(0.5).alpha(0.2));
  const auto er2 =
      pe::simpo_loss(eigen_pairs<double>(p, {}), pe::SimPOLossOptions().cpo_alpha(0.5).alpha(0.2));
  EXPECT_VEC(er2.loss, as_vector(tr2.loss), kRtol, kAtol, "simpo+nll loss");
  const auto g2 = grads_of(tr2.loss, t.leaves());
  EXPECT_VEC(er2.grad_policy_chosen, g2[0], kRtol, kAtol, "simpo+nll grad pc");
  EXPECT_VEC(er2.grad_policy_rejected, g2[1], kRtol, kAtol, "simpo+nll grad pr");
}

TEST_F(eigen, TPOMatchesLibtorch) {
  for (int64_t B : {1, 3, 17}) {
    for (auto form : {LogpsForm::kSum, LogpsForm::kMean}) {
      const Pairs p(B, form, 3.0);
      const auto gold_sum = (-10 + 3 * at::randn({B}, at::kDouble)).requires_grad_();
      const auto gold_count = at::randint(0, 9, {B}, at::kLong);
      for (auto t : {prefopt::TPOLossType::kSigmoid, prefopt::TPOLossType::kHinge,
                     prefopt::TPOLossType::kIPO, prefopt::TPOLossType::kTPOL}) {
        for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
          for (double tpo_alpha : {1.0, 0.0, 0.4}) {
            const bool smooth =
                t == prefopt::TPOLossType::kSigmoid || t == prefopt::TPOLossType::kTPOL;
            const auto o = prefopt::TPOLossOptions()
                               .loss_type(t)
                               .beta(0.3)
                               .label_smoothing(smooth ? 0.05 : 0.0)
                               .tpo_alpha(tpo_alpha)
                               .tpo_l_gamma(0.4)
                               .reduction(torch_reduction(red));
            const auto eo = pe::TPOLossOptions()
                                .loss_type(t)
                                .beta(0.3)
                                .label_smoothing(smooth ? 0.05 : 0.0)
                                .tpo_alpha(tpo_alpha)
                                .tpo_l_gamma(0.4)
                                .reduction(red);
            SCOPED_TRACE(std::string(prefopt::detail::name_of(t)) + " B=" + std::to_string(B) +
                         " red " + std::to_string(static_cast<int>(red)) + " alpha " +
                         std::to_string(tpo_alpha));
            const auto tp = torch_pairs(p, {});
            prefopt::SequenceLogprobs gold;
            gold.sum = gold_sum, gold.count = gold_count;
            const auto tr = F::tpo_loss(tp.in, gold, o);
            pe::SequenceLogprobs<double> egold;
            egold.sum = to_eigen<double>(gold_sum),
            egold.count = to_eigen<double>(gold_count).cast<int64_t>();
            const auto er = pe::tpo_loss(eigen_pairs<double>(p, {}), egold, eo);
            EXPECT_VEC(er.loss, as_vector(tr.loss), kRtol, kAtol, "loss");
            EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
            EXPECT_VEC(er.chosen_rewards, tr.chosen_rewards, kRtol, kAtol, "rewards");
            std::vector<at::Tensor> leaves = tp.leaves();
            if (tpo_alpha != 0) leaves.push_back(gold_sum);
            const auto g = grads_of(tr.loss, leaves);
            EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad pc");
            EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad pr");
            if (tpo_alpha != 0) {
              EXPECT_VEC(er.grad_gold_sum, g[2], kRtol, kAtol, "grad gold");
            } else {
              EXPECT_EQ(er.grad_gold_sum.size(), 0);
            }
            // The host's gold NLL instead of the gold log-probs.
            Feed host;
            host.nll = 1.3;
            const auto th = torch_pairs(p, host);
            const auto trh = F::tpo_loss(th.in, o);
            const auto erh = pe::tpo_loss(eigen_pairs<double>(p, host), eo);
            EXPECT_VEC(erh.loss, as_vector(trh.loss), kRtol, kAtol, "host loss");
            const auto gh = grads_of(trh.loss, th.leaves());
            EXPECT_VEC(erh.grad_policy_chosen, gh[0], kRtol, kAtol, "host grad pc");
            EXPECT_NEAR(erh.grad_nll_loss, gh[2].item<double>(), 1e-12);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ ORPO

namespace {

void expect_orpo_matches(const Pairs& p, const Feed& f, const prefopt::ORPOLossOptions& o,
                         const std::string& what, double rtol = kRtol) {
  SCOPED_TRACE(what);
  const auto t = torch_pairs(p, f);
  const auto tr = F::orpo_loss(t.in, o);
  const auto eo = pe::ORPOLossOptions()
                      .beta(o.beta())
                      .nll_normalization(o.nll_normalization())
                      .reduction(reduction_of(o.reduction()));
  const auto er = pe::orpo_loss(eigen_pairs<double>(p, f), eo);
  EXPECT_VEC(er.loss, as_vector(tr.loss), rtol, kAtol, "loss");
  EXPECT_VEC(er.losses, tr.losses, rtol, kAtol, "losses");
  EXPECT_VEC(er.log_odds_chosen, tr.log_odds_chosen, rtol, kAtol, "log_odds_chosen");
  EXPECT_VEC(er.log_odds_ratio, tr.log_odds_ratio, rtol, kAtol, "log_odds_ratio");
  EXPECT_VEC(er.chosen_rewards, tr.chosen_rewards, rtol, kAtol, "chosen_rewards");
  EXPECT_VEC(er.chosen_logps, tr.chosen_logps, rtol, kAtol, "chosen_logps");
  EXPECT_NEAR(er.nll_loss, tr.nll_loss.item<double>(), 1e-12 * std::abs(er.nll_loss) + 1e-14);
  const auto g = grads_of(tr.loss, t.leaves());
  EXPECT_VEC(er.grad_policy_chosen, g[0], rtol, kAtol, "grad_policy_chosen");
  EXPECT_VEC(er.grad_policy_rejected, g[1], rtol, kAtol, "grad_policy_rejected");
  if (f.nll) {
    EXPECT_NEAR(er.grad_nll_loss, g[2].item<double>(), 1e-12);
  }
}

}  // namespace

TEST_F(eigen, ORPOMatchesLibtorch) {
  for (int64_t B : {1, 3, 17}) {
    for (auto form : {LogpsForm::kMean, LogpsForm::kSum}) {
      const Pairs p(B, form, 3.0);
      for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
        for (auto norm : {NLLNormalization::kTokenMean, NLLNormalization::kSequenceMean}) {
          const auto o = prefopt::ORPOLossOptions().beta(0.25).nll_normalization(norm).reduction(
              torch_reduction(red));
          const std::string what = "B=" + std::to_string(B) + " red " +
                                   std::to_string(static_cast<int>(red)) +
                                   (form == LogpsForm::kMean ? " means" : " sums") +
                                   (norm == NLLNormalization::kTokenMean ? " token" : " seq");
          expect_orpo_matches(p, {}, o, what);
          Feed host;
          host.nll = 2.5;
          expect_orpo_matches(p, host, o, what + " host nll");
        }
      }
    }
  }
}

// tests/test_orpo.cpp's extremes: means of 0 (clamped just below 0: no gradient through the
// log-odds), −1e-8 (confident: finite, exact via expm1), −800 (exact log-odds), in double and
// float; and finite differences near 0.
TEST_F(eigen, ORPOExtremesMatchLibtorchAndFiniteDifferences) {
  Pairs p(6, LogpsForm::kMean);
  p.pc = at::tensor({0.0, -1e-8, -800.0, -1e-20, -30.0, -1e-3}, at::kDouble);
  p.pr = at::tensor({-1.0, -2.0, -1.0, -1e-7, 0.0, -1e-8}, at::kDouble);
  for (auto norm : {NLLNormalization::kTokenMean, NLLNormalization::kSequenceMean}) {
    const auto o = prefopt::ORPOLossOptions().nll_normalization(norm);
    expect_orpo_matches(p, {}, o, "extremes double");
    const auto t = torch_pairs(p, {}, at::kFloat);
    const auto tr = F::orpo_loss(t.in, o);
    const auto er =
        pe::orpo_loss(eigen_pairs<float>(p, {}), pe::ORPOLossOptions().nll_normalization(norm));
    EXPECT_TRUE(er.losses.allFinite() && er.grad_policy_chosen.allFinite() &&
                er.grad_policy_rejected.allFinite());
    EXPECT_VEC(er.losses, tr.losses, 1e-6, 1e-6, "extremes float");
    const auto g = grads_of(tr.loss, t.leaves());
    EXPECT_VEC(er.grad_policy_chosen, g[0], 1e-6, 1e-6, "extremes float grad pc");
    EXPECT_VEC(er.grad_policy_rejected, g[1], 1e-6, 1e-6, "extremes float grad pr");
  }
  // Finite differences near (not at) 0, where the derivative is large.
  Pairs q(3, LogpsForm::kMean);
  q.pc = at::tensor({-1e-3, -0.05, -2.0}, at::kDouble);
  q.pr = at::tensor({-0.2, -1e-3, -0.01}, at::kDouble);
  const auto er = pe::orpo_loss(eigen_pairs<double>(q, {}));
  for (int which = 0; which < 2; ++which) {
    const auto fd = finite_differences(
        [&](const at::Tensor& x) {
          auto in = eigen_pairs<double>(q, {});
          const auto v = to_eigen<double>(x);
          if (which == 0) in.policy_chosen_logps(v);
          if (which == 1) in.policy_rejected_logps(v);
          return pe::orpo_loss(in).loss(0);
        },
        which == 0 ? q.pc : q.pr);
    EXPECT_VEC(which == 0 ? er.grad_policy_chosen : er.grad_policy_rejected, fd, 1e-5, 1e-8,
               "finite differences");
  }
}

// ------------------------------------------------------------------------------ KTO

namespace {

struct KTOBatch {
  at::Tensor pd, pu, rd, ru, pkl, rkl;
  KTOBatch(int64_t nd, int64_t nu, int64_t m = 8) {
    const auto o = at::TensorOptions().dtype(at::kDouble);
    pd = -20 + 5 * at::randn({nd}, o);
    pu = -25 + 5 * at::randn({nu}, o);
    rd = pd + at::randn({nd}, o);
    ru = pu + at::randn({nu}, o);
    pkl = -20 + 3 * at::randn({m}, o);
    rkl = pkl - 0.5 + at::randn({m}, o);
  }
};

void expect_kto_matches(const KTOBatch& b, const prefopt::KTOLossOptions& o, bool kl_logps,
                        std::optional<double> kl, const std::string& what,
                        at::ScalarType dt = at::kDouble) {
  SCOPED_TRACE(what);
  const auto leaf = [&](const at::Tensor& t) { return t.to(dt).detach().clone().requires_grad_(); };
  const auto pd = leaf(b.pd), pu = leaf(b.pu), rd = leaf(b.rd), ru = leaf(b.ru);
  auto tin = prefopt::KTOInputs()
                 .policy_chosen_logps(pd)
                 .policy_rejected_logps(pu)
                 .reference_chosen_logps(rd)
                 .reference_rejected_logps(ru);
  auto ein = pe::KTOInputs<double>()
                 .policy_chosen_logps(to_eigen<double>(b.pd.to(dt)))
                 .policy_rejected_logps(to_eigen<double>(b.pu.to(dt)))
                 .reference_chosen_logps(to_eigen<double>(b.rd.to(dt)))
                 .reference_rejected_logps(to_eigen<double>(b.ru.to(dt)));
  if (kl_logps) {
    tin.policy_KL_logps(b.pkl.to(dt)).reference_KL_logps(b.rkl.to(dt));
    ein.policy_KL_logps(to_eigen<double>(b.pkl.to(dt)))
        .reference_KL_logps(to_eigen<double>(b.rkl.to(dt)));
  }
  if (kl) {
    tin.kl(at::scalar_tensor(*kl, at::TensorOptions().dtype(dt)));
    ein.kl(*kl);
  }
  const auto tr = F::kto_loss(tin, o);
  const auto eo = pe::KTOLossOptions()
                      .loss_type(o.loss_type())
                      .beta(o.beta())
                      .desirable_weight(o.desirable_weight())
                      .undesirable_weight(o.undesirable_weight())
                      .reduction(reduction_of(o.reduction()));
  const auto er = pe::kto_loss(ein, eo);
  EXPECT_VEC(er.loss, as_vector(tr.loss), kRtol, kAtol, "loss");
  EXPECT_VEC(er.losses, tr.losses, kRtol, kAtol, "losses");
  EXPECT_VEC(er.chosen_rewards, tr.chosen_rewards, kRtol, kAtol, "chosen_rewards");
  EXPECT_VEC(er.rejected_rewards, tr.rejected_rewards, kRtol, kAtol, "rejected_rewards");
  EXPECT_NEAR(er.kl, tr.kl.item<double>(), 1e-14);
  const auto g = grads_of(tr.loss, {pd, pu});
  EXPECT_VEC(er.grad_policy_chosen, g[0], kRtol, kAtol, "grad pd");
  EXPECT_VEC(er.grad_policy_rejected, g[1], kRtol, kAtol, "grad pu");
  // The reference (detached by the libtorch layer) against autograd through the fp64 formula.
  const double z = er.kl;
  const bool apo = o.loss_type() == prefopt::KTOLossType::kAPOZeroUnpaired;
  const auto ref = prefopt_ref::kto_losses(o.beta(), o.desirable_weight(), o.undesirable_weight(),
                                           z, pd.to(at::kDouble), rd.to(at::kDouble),
                                           pu.to(at::kDouble), ru.to(at::kDouble), apo);
  const auto red = reduction_of(o.reduction());
  const auto ref_loss =
      red == pe::Reduction::kMean ? (ref.numel() ? ref.mean() : ref.sum()) : ref.sum();
  const auto gr = grads_of(ref_loss, {rd, ru});
  EXPECT_VEC(er.grad_reference_chosen, gr[0], 1e-10, 1e-14, "grad rd");
  EXPECT_VEC(er.grad_reference_rejected, gr[1], 1e-10, 1e-14, "grad ru");
}

}  // namespace

TEST_F(eigen, KTOMatchesLibtorch) {
  const std::vector<std::pair<int64_t, int64_t>> sizes = {{1, 0}, {0, 3}, {3, 1}, {17, 5}, {0, 0}};
  for (auto [nd, nu] : sizes) {
    const KTOBatch b(nd, nu);
    for (auto t : {prefopt::KTOLossType::kKTO, prefopt::KTOLossType::kAPOZeroUnpaired}) {
      for (auto red : {pe::Reduction::kMean, pe::Reduction::kSum, pe::Reduction::kNone}) {
        const auto o = prefopt::KTOLossOptions()
                           .loss_type(t)
                           .desirable_weight(1.33)
                           .undesirable_weight(0.7)
                           .reduction(torch_reduction(red));
        const std::string what = std::string(prefopt::detail::name_of(t)) +
                                 " Nd=" + std::to_string(nd) + " Nu=" + std::to_string(nu) +
                                 " red " + std::to_string(static_cast<int>(red));
        expect_kto_matches(b, o, true, std::nullopt, what + " KL logps");
        expect_kto_matches(b, o, false, std::nullopt, what + " no KL");
        expect_kto_matches(b, o, true, 0.4, what + " given kl");
        expect_kto_matches(b, o, false, -3.0, what + " negative kl");
        expect_kto_matches(b, prefopt::KTOLossOptions(o).desirable_weight(1).undesirable_weight(1),
                           true, std::nullopt, what + " unit weights");
      }
    }
  }
  // A negative mean KL estimate clamps at 0; an empty one is 0.
  KTOBatch b(3, 3);
  b.rkl = b.pkl + 5;
  expect_kto_matches(b, {}, true, std::nullopt, "clamped KL");
  EXPECT_EQ(pe::kto_kl<double>(pe::Vector<double>(0), pe::Vector<double>(0)), 0.0);
}

// The other families in float (against the libtorch layer in float, and the Eigen layer in
// double on the same rounded inputs) and at tests/test_cpo.cpp's extremes (|s| = 1e4 with a
// zero-length completion), where both layers must agree and stay finite.
TEST_F(eigen, OtherFamiliesInFloatAndAtExtremes) {
  using prefopt::CPOLossType;
  const auto rounded = [](at::Tensor t) { return t.to(at::kFloat).to(at::kDouble); };
  Pairs p(17, LogpsForm::kMean, 2.0);
  p.pc = rounded(p.pc), p.pr = rounded(p.pr);
  for (auto t : {CPOLossType::kSigmoid, CPOLossType::kHinge, CPOLossType::kIPO, CPOLossType::kSimPO,
                 CPOLossType::kAlphaPO}) {
    SCOPED_TRACE(prefopt::detail::name_of(t));
    const auto o =
        prefopt::CPOLossOptions().loss_type(t).alpha(t == CPOLossType::kAlphaPO ? 0.3 : 0);
    const auto eo = pe::CPOLossOptions().loss_type(t).alpha(t == CPOLossType::kAlphaPO ? 0.3 : 0);
    const auto tf = torch_pairs(p, {}, at::kFloat);
    const auto tr = F::cpo_loss(tf.in, o);
    const auto ef = pe::cpo_loss(eigen_pairs<float>(p, {}), eo);
    const auto ed = pe::cpo_loss(eigen_pairs<double>(p, {}), eo);
    EXPECT_VEC(ef.loss, as_vector(tr.loss), 1e-5, 1e-6, "float loss");
    const auto g = grads_of(tr.loss, tf.leaves());
    EXPECT_VEC(ef.grad_policy_chosen, g[0], 1e-5, 1e-7, "float grad pc");
    EXPECT_VEC(ef.grad_policy_rejected, g[1], 1e-5, 1e-7, "float grad pr");
    EXPECT_VEC(ef.grad_policy_chosen, to_torch(ed.grad_policy_chosen), 1e-4, 1e-6, "vs double");
  }
  {  // ORPO and TPO in float
    const auto tf = torch_pairs(p, {}, at::kFloat);
    const auto tr = F::orpo_loss(tf.in);
    const auto ef = pe::orpo_loss(eigen_pairs<float>(p, {}));
    EXPECT_VEC(ef.losses, tr.losses, 1e-5, 1e-6, "orpo float");
    const auto g = grads_of(tr.loss, tf.leaves());
    EXPECT_VEC(ef.grad_policy_chosen, g[0], 1e-5, 1e-7, "orpo float grad");
    Feed host;
    host.nll = 0.5;
    const auto th = torch_pairs(p, host, at::kFloat);
    const auto ttr =
        F::tpo_loss(th.in, prefopt::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL));
    const auto etr = pe::tpo_loss(eigen_pairs<float>(p, host),
                                  pe::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL));
    EXPECT_VEC(etr.loss, as_vector(ttr.loss), 1e-5, 1e-6, "tpo float");
    const auto gt = grads_of(ttr.loss, th.leaves());
    EXPECT_VEC(etr.grad_policy_chosen, gt[0], 1e-5, 1e-7, "tpo float grad");
  }
  {  // KTO in float
    KTOBatch b(17, 5);
    for (at::Tensor* t : {&b.pd, &b.pu, &b.rd, &b.ru, &b.pkl, &b.rkl}) *t = rounded(*t);
    const auto pd = b.pd.to(at::kFloat).requires_grad_(), pu = b.pu.to(at::kFloat).requires_grad_();
    const auto tr = F::kto_loss(prefopt::KTOInputs()
                                    .policy_chosen_logps(pd)
                                    .policy_rejected_logps(pu)
                                    .reference_chosen_logps(b.rd.to(at::kFloat))
                                    .reference_rejected_logps(b.ru.to(at::kFloat))
                                    .policy_KL_logps(b.pkl.to(at::kFloat))
                                    .reference_KL_logps(b.rkl.to(at::kFloat)));
    const auto er = pe::kto_loss(pe::KTOInputs<float>()
                                     .policy_chosen_logps(to_eigen<float>(b.pd))
                                     .policy_rejected_logps(to_eigen<float>(b.pu))
                                     .reference_chosen_logps(to_eigen<float>(b.rd))
                                     .reference_rejected_logps(to_eigen<float>(b.ru))
                                     .policy_KL_logps(to_eigen<float>(b.pkl))
                                     .reference_KL_logps(to_eigen<float>(b.rkl)));
    EXPECT_VEC(er.losses, tr.losses, 1e-5, 1e-6, "kto float");
    const auto g = grads_of(tr.loss, {pd, pu});
    EXPECT_VEC(er.grad_policy_chosen, g[0], 1e-5, 1e-7, "kto float grad pd");
    EXPECT_VEC(er.grad_policy_rejected, g[1], 1e-5, 1e-7, "kto float grad pu");
  }
  // Extremes, in double and float.
  for (double s : {-1e4, 1e4}) {
    Pairs q(2);
    q.pc = at::tensor({s, 0.0}, at::kDouble), q.pr = at::tensor({0.0, s}, at::kDouble);
    q.nc = at::tensor({0, 3}), q.nr = at::tensor({1, 3});
    q.rc = at::zeros({2}, at::kDouble), q.rr = at::zeros({2}, at::kDouble);
    for (auto t :
         {CPOLossType::kSigmoid, CPOLossType::kHinge, CPOLossType::kIPO, CPOLossType::kSimPO}) {
      expect_cpo_matches(
          q, {}, prefopt::CPOLossOptions().loss_type(t),
          std::string("extreme ") + prefopt::detail::name_of(t) + " " + std::to_string(s));
      const auto er = pe::cpo_loss(eigen_pairs<float>(q, {}), pe::CPOLossOptions().loss_type(t));
      EXPECT_TRUE(er.loss.allFinite() && er.grad_policy_chosen.allFinite() &&
                  er.grad_policy_rejected.allFinite());
    }
    KTOBatch b(2, 2);
    b.pd = at::tensor({s, 0.0}, at::kDouble), b.pu = at::tensor({0.0, -s}, at::kDouble);
    b.rd = at::zeros({2}, at::kDouble), b.ru = at::zeros({2}, at::kDouble);
    expect_kto_matches(b, {}, true, std::nullopt, "extreme kto " + std::to_string(s));
    expect_kto_matches(b,
                       prefopt::KTOLossOptions().loss_type(prefopt::KTOLossType::kAPOZeroUnpaired),
                       false, std::nullopt, "extreme apo_zero_unpaired " + std::to_string(s));
  }
}

// ------------------------------------------------------------------------------ gathering

namespace {

struct Packed {
  pe::RowMatrix<double> logits;
  pe::IndexVector labels, cu;
  Packed(const std::vector<int64_t>& lengths, int64_t V) {
    cu = pe::cu_seqlens_from_lengths(Eigen::Map<const pe::IndexVector>(
        lengths.data(), static_cast<Eigen::Index>(lengths.size())));
    const int64_t N = cu(cu.size() - 1);
    logits = to_eigen<double>(3 * at::randn({N * V}, at::kDouble)).reshaped<Eigen::RowMajor>(N, V);
    auto lab = at::randint(V, {N}, at::kLong);
    lab.masked_fill_(at::rand({N}) < 0.3, -100);
    labels = to_eigen<double>(lab).cast<int64_t>();
  }
  at::Tensor torch_logits(at::ScalarType dt) const {
    return at::from_blob(const_cast<double*>(logits.data()), {logits.rows(), logits.cols()},
                         at::kDouble)
        .to(dt)
        .clone();
  }
  at::Tensor torch_labels() const { return to_torch<double>(labels.cast<double>()).to(at::kLong); }
  at::Tensor torch_cu() const { return to_torch<double>(cu.cast<double>()).to(at::kLong); }
};

}  // namespace

TEST_F(eigen, GatheringAndItsGradientMatchLibtorch) {
  // Sequences of 0, 1, 5, 2 and 13 positions.
  const Packed pk({5, 0, 1, 13, 2}, 37);
  for (bool shift : {true, false}) {
    SCOPED_TRACE(shift ? "shift" : "no shift");
    const auto to = prefopt::GatherLogprobsOptions().shift(shift).with_token_logps(true);
    const auto eo = pe::GatherLogprobsOptions().shift(shift);
    for (auto dt : {at::kDouble, at::kFloat}) {
      const bool f64 = dt == at::kDouble;
      const auto logits = pk.torch_logits(dt).requires_grad_();
      const auto tl = F::gather_packed_logprobs(logits, pk.torch_labels(), pk.torch_cu(), to);
      const double rtol = f64 ? kRtol : 1e-5, atol = f64 ? kAtol : 1e-5;
      const auto check_side = [&](const auto& el) {
        EXPECT_VEC(el.sum, tl.sum, rtol, atol, "sum");
        EXPECT_VEC(el.mean, tl.mean, rtol, atol, "mean");
        EXPECT_VEC(el.token_logps, tl.token_logps, rtol, atol, "token_logps");
        EXPECT_TRUE(
            at::equal(to_torch<double>(el.count.template cast<double>()).to(at::kLong), tl.count));
      };
      // dL = Σ gs·sum + Σ gm·mean, on random gs, gm.
      const auto S = tl.sum.size(0);
      const auto gs = at::randn({S}, at::kDouble).to(dt), gm = at::randn({S}, at::kDouble).to(dt);
      const auto g = torch::autograd::grad({(tl.sum * gs).sum() + (tl.mean * gm).sum()}, {logits},
                                           {}, /*retain_graph=*/true)[0];
      if (f64) {
        const auto el = pe::gather_packed_logprobs(pk.logits, pk.labels, pk.cu, eo);
        check_side(el);
        const auto eg = pe::gather_packed_logprobs_backward<double>(
            pk.logits, pk.labels, pk.cu, to_eigen<double>(gs), to_eigen<double>(gm), eo);
        const auto egt =
            at::from_blob(const_cast<double*>(eg.data()), {eg.rows(), eg.cols()}, at::kDouble);
        EXPECT_TRUE(AllClose(egt, g, kRtol, kAtol)) << "dlogits";
        // Only dL/dsum given (empty grad_mean), into a caller's buffer.
        pe::RowMatrix<double> buf(eg.rows(), eg.cols());
        pe::gather_packed_logprobs_backward<double>(
            pk.logits, pk.labels, pk.cu, to_eigen<double>(gs), pe::Vector<double>(), buf, eo);
        const auto g2 = torch::autograd::grad({(tl.sum * gs).sum()}, {logits})[0];
        EXPECT_TRUE(AllClose(at::from_blob(buf.data(), {buf.rows(), buf.cols()}, at::kDouble), g2,
                             kRtol, kAtol));
      } else {
        const pe::RowMatrix<float> lf = pk.logits.cast<float>();
        const auto el = pe::gather_packed_logprobs(lf, pk.labels, pk.cu, eo);
        check_side(el);
        const auto eg = pe::gather_packed_logprobs_backward<float>(
            lf, pk.labels, pk.cu, to_eigen<float>(gs), to_eigen<float>(gm), eo);
        const auto egt =
            at::from_blob(const_cast<float*>(eg.data()), {eg.rows(), eg.cols()}, at::kFloat);
        EXPECT_TRUE(AllClose(egt, g, 1e-5, 1e-6)) << "dlogits float";
        // Float against double on the same (rounded) logits.
        const auto ed = pe::gather_packed_logprobs<double>(lf.cast<double>(), pk.labels, pk.cu, eo);
        EXPECT_VEC(el.sum, to_torch(ed.sum), 1e-5, 1e-5, "float vs double");
      }
    }
  }
  // A map of a host buffer, and split_pairs.
  const Eigen::Map<const pe::RowMatrix<double>> map(pk.logits.data(), pk.logits.rows(),
                                                    pk.logits.cols());
  const auto lp = pe::gather_packed_logprobs(map, pk.labels, pk.cu);
  EXPECT_THROW(pe::split_pairs(lp), std::invalid_argument);
  const Packed even({3, 4, 2, 5}, 11);
  const auto pair = pe::split_pairs(pe::gather_packed_logprobs(even.logits, even.labels, even.cu));
  const auto all = F::split_pairs(F::gather_packed_logprobs(even.torch_logits(at::kDouble),
                                                            even.torch_labels(), even.torch_cu()));
  EXPECT_VEC(pair.chosen.sum, all.chosen.sum, kRtol, kAtol, "chosen");
  EXPECT_VEC(pair.rejected.mean, all.rejected.mean, kRtol, kAtol, "rejected");
  // A PairInputs from the split: sums + counts, as the libtorch constructor.
  const auto in = pe::PairInputs<double>(pair, pair);
  EXPECT_EQ(in.logps_form(), LogpsForm::kSum);
  EXPECT_EQ((*in.chosen_lengths())(0), static_cast<double>(pair.chosen.count(0)));
  EXPECT_EQ(pe::PairInputs<double>::averaged(pair).logps_form(), LogpsForm::kMean);
}

// ------------------------------------------------------------------------------ metrics

TEST_F(eigen, MetricsMatchTheLibtorchAccumulator) {
  for (auto window : {prefopt::MetricWindow::kMeanOfSteps, prefopt::MetricWindow::kCountWeighted}) {
    prefopt::MetricAccumulator tacc(prefopt::MetricsOptions().window(window).prefix("eval_"));
    pe::MetricAccumulator eacc(pe::MetricsOptions()
                                   .window(window == prefopt::MetricWindow::kMeanOfSteps
                                               ? pe::MetricWindow::kMeanOfSteps
                                               : pe::MetricWindow::kCountWeighted)
                                   .prefix("eval_"));
    tacc.add_scalar("grad_norm", 2.0);
    eacc.add_scalar("grad_norm", 2.0);
    for (int64_t B : {3, 1, 17}) {
      const Pairs p(B);
      const auto o = prefopt::DPOLossOptions().rpo_alpha(0.5);
      const auto t = torch_pairs(p, {});
      tacc.add(F::dpo_loss(t.in, o), t.in);
      const auto ein = eigen_pairs<double>(p, {});
      eacc.add(pe::dpo_loss(ein, eigen_of(o)), ein);
      tacc.add_scalar("grad_norm", static_cast<double>(B));
      eacc.add_scalar("grad_norm", static_cast<double>(B));
    }
    const Pairs pm(5, LogpsForm::kMean, 2.0);
    const auto tm = torch_pairs(pm, {});
    tacc.add(F::orpo_loss(tm.in), tm.in);
    const auto em = eigen_pairs<double>(pm, {});
    eacc.add(pe::orpo_loss(em), em);
    tacc.add(F::cpo_loss(tm.in), tm.in);
    eacc.add(pe::cpo_loss(em), em);
    // SimPO (no NLL term: nll_loss logged as 0) and TPO (its NLL not logged), as TRL logs them.
    tacc.add(F::cpo_loss(tm.in, prefopt::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO)),
             tm.in);
    eacc.add(pe::cpo_loss(em, pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO)), em);
    Feed gold_nll;
    gold_nll.nll = 0.7;
    const auto tt = torch_pairs(pm, gold_nll);
    const auto et = eigen_pairs<double>(pm, gold_nll);
    tacc.add(F::tpo_loss(tt.in), tt.in);
    eacc.add(pe::tpo_loss(et), et);
    const std::vector<std::pair<int64_t, int64_t>> sizes = {{3, 0}, {2, 4}};
    for (auto [nd, nu] : sizes) {
      const KTOBatch b(nd, nu);
      auto tin = prefopt::KTOInputs()
                     .policy_chosen_logps(b.pd)
                     .policy_rejected_logps(b.pu)
                     .reference_chosen_logps(b.rd)
                     .reference_rejected_logps(b.ru)
                     .policy_KL_logps(b.pkl)
                     .reference_KL_logps(b.rkl);
      auto ein = pe::KTOInputs<double>()
                     .policy_chosen_logps(to_eigen<double>(b.pd))
                     .policy_rejected_logps(to_eigen<double>(b.pu))
                     .reference_chosen_logps(to_eigen<double>(b.rd))
                     .reference_rejected_logps(to_eigen<double>(b.ru))
                     .policy_KL_logps(to_eigen<double>(b.pkl))
                     .reference_KL_logps(to_eigen<double>(b.rkl));
      tacc.add(F::kto_loss(tin), tin);
      eacc.add(pe::kto_loss(ein), ein);
    }
    EXPECT_EQ(eacc.steps(), tacc.steps());
    for (int window_no = 0; window_no < 2; ++window_no) {
      const auto tm2 = tacc.compute();
      const auto em2 = eacc.compute();
      ASSERT_EQ(em2.size(), tm2.size());
      auto it = tm2.begin();
      for (const auto& [n, v] : em2) {
        EXPECT_EQ(n, it->first);
        EXPECT_NEAR(v, it->second, 1e-12 * std::abs(v) + 1e-14) << n;
        ++it;
      }
      EXPECT_TRUE(em2.contains("eval_num_tokens"));
      EXPECT_EQ(window_no == 0, em2.contains("eval_rewards/chosen"));  // second window is empty
      EXPECT_EQ(window_no == 0, em2.contains("eval_nll_loss"));
    }
  }
  pe::Metrics m;
  m.set("a", 1.0);
  EXPECT_THROW(m.at("b"), std::out_of_range);
}

// ------------------------------------------------------------------------------ errors

namespace {

/// Runs `stmt`, expecting std::invalid_argument whose message starts with `fn` and contains
/// `substr`.
#define EXPECT_EIGEN_THROWS(stmt, fn, substr)                                              \
  do {                                                                                     \
    bool threw = false;                                                                    \
    try {                                                                                  \
      (void)(stmt);                                                                        \
    } catch (const std::invalid_argument& e) {                                             \
      threw = true;                                                                        \
      const std::string msg = e.what();                                                    \
      EXPECT_EQ(msg.rfind(std::string(fn) + ": ", 0), 0u) << msg;                          \
      EXPECT_NE(msg.find(substr), std::string::npos) << msg << "\nexpected: " << (substr); \
    }                                                                                      \
    EXPECT_TRUE(threw) << "expected an error containing: " << (substr);                    \
  } while (0)

/// The libtorch layer's message for the same mistake, without its function name.
template <typename F>
std::string torch_message(F&& f, const std::string& fn) {
  try {
    (void)f();
  } catch (const c10::Error& e) {
    std::string m = e.what_without_backtrace();
    return m.rfind(fn, 0) == 0 ? m.substr(fn.size()) : m;
  }
  return "(no error)";
}

template <typename F>
std::string eigen_message(F&& f, const std::string& fn) {
  try {
    (void)f();
  } catch (const std::invalid_argument& e) {
    std::string m = e.what();
    return m.rfind(fn, 0) == 0 ? m.substr(fn.size()) : m;
  }
  return "(no error)";
}

}  // namespace

TEST_F(eigen, ErrorsNameTheFunctionAndSayExpectedVersusGiven) {
  const Pairs p(3);
  const auto in = eigen_pairs<double>(p, {});
  const auto t = torch_pairs(p, {});
  const char* dpo = "prefopt::eigen::dpo_loss";
  using O = pe::DPOLossOptions;
  using TO = prefopt::DPOLossOptions;
  // The same message as the libtorch layer, after the function name.
  const std::vector<std::pair<O, TO>> option_cases = {
      {O().label_smoothing(0.5), TO().label_smoothing(0.5)},
      {O().label_smoothing(0.1), TO().label_smoothing(0.1)},
      {O().loss_type(DPOLossType::kExoPair), TO().loss_type(DPOLossType::kExoPair)},
      {O().beta(0), TO().beta(0)},
      {O().beta(-1), TO().beta(-1)},
      {O().loss_type(std::vector<DPOLossType>{}), TO().loss_type(std::vector<DPOLossType>{})},
      {O().loss_weights({1, 2}), TO().loss_weights({1, 2})},
      {O().cdpo(true).loss_type(DPOLossType::kHinge),
       TO().cdpo(true).loss_type(DPOLossType::kHinge)},
      {O().discopop_tau(0), TO().discopop_tau(0)},
      {O().rpo_alpha(NAN), TO().rpo_alpha(NAN)},
      {O().f_alpha_divergence_coef(INFINITY), TO().f_alpha_divergence_coef(INFINITY)},
      {O().loss_type(static_cast<DPOLossType>(99)), TO().loss_type(static_cast<DPOLossType>(99))},
      {O().f_divergence_type(static_cast<prefopt::FDivergence>(7)),
       TO().f_divergence_type(static_cast<prefopt::FDivergence>(7))},
  };
  for (const auto& c : option_cases) {
    const O& eo = c.first;  // not a structured binding: C++17 lambdas cannot capture those
    const TO& to = c.second;
    const auto em = eigen_message([&] { return pe::dpo_loss(in, eo); }, dpo);
    const auto tm = torch_message([&] { return F::dpo_loss(t.in, to); }, "prefopt::dpo_loss");
    EXPECT_EQ(em, tm);
    EXPECT_EQ(em.rfind(": ", 0), 0u) << em;
  }
  // Inputs.
  auto short_pr = in;
  short_pr.policy_rejected_logps(pe::Vector<double>::Zero(2));
  EXPECT_EIGEN_THROWS(
      pe::dpo_loss(short_pr), dpo,
      "expected policy_rejected_logps of shape [3] like policy_chosen_logps, got [2]");
  auto no_ref = in;
  no_ref.reference_chosen_logps(std::nullopt);
  EXPECT_EIGEN_THROWS(pe::dpo_loss(no_ref), dpo, "expected reference_chosen_logps, got none");
  auto bad_len = in;
  bad_len.chosen_lengths(Eigen::VectorXd::Ones(4));
  EXPECT_EIGEN_THROWS(pe::dpo_loss(bad_len), dpo, "expected chosen_lengths of shape [3]");
  auto means = in;
  means.logps_form(LogpsForm::kMean).chosen_lengths(std::nullopt);
  auto tmeans = t.in;
  tmeans.logps_form(LogpsForm::kMean).chosen_lengths(at::Tensor());
  EXPECT_EIGEN_THROWS(pe::dpo_loss(means), dpo,
                      "dpo_loss consumes sums of the log-probs; got per-token means without "
                      "chosen_lengths");
  EXPECT_EQ(eigen_message([&] { return pe::dpo_loss(means); }, dpo),
            torch_message([&] { return F::dpo_loss(tmeans); }, "prefopt::dpo_loss"));
  auto no_len = in;
  no_len.chosen_lengths(std::nullopt);
  EXPECT_EIGEN_THROWS(pe::dpo_loss(no_len, O().loss_type(DPOLossType::kIPO)), dpo,
                      "ipo normalises by completion length and needs chosen_lengths and "
                      "rejected_lengths, got no chosen_lengths");
  EXPECT_EIGEN_THROWS(pe::dpo_loss(no_len, O().loss_type(DPOLossType::kSFT)), dpo,
                      "the token-mean NLL needs chosen_lengths");
  EXPECT_EIGEN_THROWS(
      pe::dpo_loss(no_len, O().rpo_alpha(1).nll_normalization(NLLNormalization::kSequenceMean)),
      dpo, "the sequence-mean NLL of summed log-probs needs chosen_lengths");
  auto weighted = in;
  weighted.weights(pe::Vector<double>::Ones(3));
  EXPECT_EIGEN_THROWS(pe::dpo_loss(weighted, O().loss_type(DPOLossType::kAOT)), dpo,
                      "aot and aot_unpaired sort the batch");
  // NaN or negative WPO weights, refused with the libtorch layer's message.
  for (const double w : {std::numeric_limits<double>::quiet_NaN(), -2.0}) {
    auto bad = in;
    bad.weights((pe::Vector<double>(3) << 1.0, w, 0.5).finished());
    auto tbad = t.in;
    tbad.weights(at::tensor({1.0, w, 0.5}, at::kDouble));
    const auto em = eigen_message([&] { return pe::dpo_loss(bad); }, dpo);
    EXPECT_NE(em.find("expected weights to be finite and >= 0, got"), std::string::npos) << em;
    EXPECT_EQ(em, torch_message([&] { return F::dpo_loss(tbad); }, "prefopt::dpo_loss"));
  }
  EXPECT_EIGEN_THROWS(pe::dpo_loss(in, std::numeric_limits<double>::quiet_NaN(),
                                   O().loss_type(DPOLossType::kBCOPair)),
                      dpo, "expected a finite bco_delta, got nan");
  // Options and inputs nothing would read (as in the libtorch layer).
  EXPECT_EIGEN_THROWS(pe::dpo_loss(in, 0.5, O()), dpo,
                      "bco_delta is read by bco_pair only, and bco_pair is not among the loss "
                      "types");
  EXPECT_EIGEN_THROWS(pe::dpo_loss(in, O().loss_type(DPOLossType::kBCOPair).bco_running_mean(true)),
                      dpo,
                      "bco_running_mean(true) needs the running baseline that the DPOLoss "
                      "functor keeps");
  EXPECT_EIGEN_THROWS(
      pe::cu_seqlens_from_lengths(
          (pe::IndexVector(2) << std::numeric_limits<int64_t>::max(), 1).finished()),
      "prefopt::eigen::cu_seqlens_from_lengths",
      "expected lengths whose total fits in int64, got 1 at index 1");
  EXPECT_EIGEN_THROWS(pe::DPOLoss(O().bco_running_mean(true)), "prefopt::eigen::DPOLoss",
                      "bco_pair is not among the loss types");
  EXPECT_EIGEN_THROWS(pe::DPOLoss().bco_baseline(), "prefopt::eigen::DPOLoss::bco_baseline",
                      "keeps no baseline");
  EXPECT_EIGEN_THROWS(pe::BCOBaseline().load(0, -1, 1), "prefopt::eigen::BCOBaseline::load",
                      "expected a finite mean, a finite var >= 0");
  // CPO, SimPO, TPO.
  EXPECT_EIGEN_THROWS(
      pe::cpo_loss(
          in, pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kHinge).label_smoothing(0.1)),
      "prefopt::eigen::cpo_loss", "label_smoothing = 0.1 is not used by hinge; expected 0");
  EXPECT_EIGEN_THROWS(pe::cpo_loss(weighted), "prefopt::eigen::cpo_loss",
                      "per-pair weights are a DPO-family input; got weights");
  EXPECT_EIGEN_THROWS(pe::simpo_loss(in, pe::SimPOLossOptions().simpo_gamma(INFINITY)),
                      "prefopt::eigen::simpo_loss", "expected a finite simpo_gamma, got inf");
  EXPECT_EIGEN_THROWS(pe::cpo_loss(no_len), "prefopt::eigen::cpo_loss",
                      "the token-mean NLL needs chosen_lengths");
  EXPECT_EIGEN_THROWS(pe::tpo_loss(in), "prefopt::eigen::tpo_loss",
                      "tpo_alpha = 1 weights the gold response's NLL");
  pe::SequenceLogprobs<double> gold;
  gold.sum = pe::Vector<double>::Ones(2);
  gold.count = pe::IndexVector::Ones(3);
  EXPECT_EIGEN_THROWS(pe::tpo_loss(in, gold), "prefopt::eigen::tpo_loss",
                      "expected gold.sum and gold.count of the same shape [S], got [2] and [3]");
  gold.count = pe::IndexVector::Ones(2);
  auto with_nll = in;
  with_nll.nll_loss(1.0);
  EXPECT_EIGEN_THROWS(pe::tpo_loss(with_nll, gold), "prefopt::eigen::tpo_loss",
                      "got both the gold SequenceLogprobs and nll_loss");
  // Two gold responses for three pairs, refused as by the libtorch layer.
  {
    prefopt::SequenceLogprobs tgold;
    tgold.sum = at::ones({2}, at::kDouble);
    tgold.count = at::ones({2}, at::kLong);
    const auto em =
        eigen_message([&] { return pe::tpo_loss(in, gold); }, "prefopt::eigen::tpo_loss");
    EXPECT_EQ(em,
              ": expected one gold response per pair, gold.sum of shape [3] like "
              "policy_chosen_logps, got [2]");
    EXPECT_EQ(em, torch_message([&] { return F::tpo_loss(t.in, tgold); }, "prefopt::tpo_loss"));
  }
  // TPO's margin is tpo_l_gamma (the message named CPO's simpo_gamma), in both layers.
  {
    const auto em = eigen_message(
        [&] {
          return pe::tpo_loss(
              with_nll,
              pe::TPOLossOptions().loss_type(prefopt::TPOLossType::kTPOL).tpo_l_gamma(NAN));
        },
        "prefopt::eigen::tpo_loss");
    EXPECT_EQ(em, ": expected a finite tpo_l_gamma, got nan");
    EXPECT_EQ(em, torch_message(
                      [&] {
                        return F::tpo_loss(
                            prefopt::PairInputs(t.in).nll_loss(at::scalar_tensor(1.0, at::kDouble)),
                            prefopt::TPOLossOptions()
                                .loss_type(prefopt::TPOLossType::kTPOL)
                                .tpo_l_gamma(NAN));
                      },
                      "prefopt::tpo_loss"));
  }
  // ORPO, KTO.
  EXPECT_EIGEN_THROWS(pe::orpo_loss(in, pe::ORPOLossOptions().beta(0)), "prefopt::eigen::orpo_loss",
                      "expected beta > 0, got 0");
  const auto v3 = pe::Vector<double>::Zero(3), v2 = pe::Vector<double>::Zero(2);
  const auto kin = pe::KTOInputs<double>()
                       .policy_chosen_logps(v3)
                       .policy_rejected_logps(v2)
                       .reference_chosen_logps(v3)
                       .reference_rejected_logps(v3);
  EXPECT_EIGEN_THROWS(pe::kto_loss(kin), "prefopt::eigen::kto_loss",
                      "expected reference_rejected_logps of shape [2] like policy_rejected_logps, "
                      "got [3]");
  auto kin2 = kin;
  kin2.reference_rejected_logps(v2).policy_KL_logps(v3);
  EXPECT_EIGEN_THROWS(pe::kto_loss(kin2), "prefopt::eigen::kto_loss",
                      "expected both policy_KL_logps and reference_KL_logps for the KL "
                      "estimate, got only policy_KL_logps");
  EXPECT_EIGEN_THROWS(pe::kto_loss(kin2.reference_KL_logps(v2)), "prefopt::eigen::kto_kl",
                      "expected reference_KL_logps of shape [3] like policy_KL_logps, got [2]");
  EXPECT_EIGEN_THROWS(pe::kto_loss(kin2, pe::KTOLossOptions().undesirable_weight(-1)),
                      "prefopt::eigen::kto_loss", "expected undesirable_weight >= 0, got -1");
  // A NaN kl made every loss NaN (std::max(NaN, 0) is NaN).
  auto kin3 = kin;
  kin3.reference_rejected_logps(v2).kl(std::numeric_limits<double>::quiet_NaN());
  EXPECT_EIGEN_THROWS(pe::kto_loss(kin3), "prefopt::eigen::kto_loss",
                      "expected a finite kl, got nan");
  // Gathering.
  const char* g = "prefopt::eigen::gather_packed_logprobs";
  pe::RowMatrix<double> logits = pe::RowMatrix<double>::Zero(4, 3);
  pe::IndexVector labels(4), cu(3);
  labels << 0, 1, 2, -100;
  cu << 0, 2, 4;
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels.head(3), cu), g,
                      "expected labels of shape [4] to match the logits [4, 3], got [3]");
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(pe::RowMatrix<double>(4, 0), labels, cu), g,
                      "expected a vocabulary of at least 1 entry, got V = 0");
  pe::IndexVector bad_cu(3);
  bad_cu << 1, 2, 4;
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels, bad_cu), g,
                      "expected cu_seqlens to start at 0, got 1");
  bad_cu << 0, 3, 2;
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels, bad_cu), g,
                      "expected non-decreasing cu_seqlens, got 3 then 2 at index 2");
  bad_cu << 0, 2, 5;
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels, bad_cu), g,
                      "expected cu_seqlens to end at the token count N = 4, got 5");
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels, pe::IndexVector(0)), g,
                      "expected cu_seqlens of shape [S + 1], got [0]");
  labels(1) = 3;
  // Row 0 scores label 1 (= 3, out of range) with the shift.
  const auto tmsg = torch_message(
      [&] {
        return F::gather_packed_logprobs(at::zeros({4, 3}, at::kDouble),
                                         at::tensor({0, 3, 2, -100}), at::tensor({0, 2, 4}));
      },
      "prefopt::gather_packed_logprobs");
  EXPECT_EQ(eigen_message([&] { return pe::gather_packed_logprobs(logits, labels, cu); }, g), tmsg);
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs(logits, labels, cu), g,
                      "expected labels in [0, 3) or equal to ignore_index = -100, got 3 at "
                      "labels[1]");
  labels(1) = 1;
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs_backward<double>(
                          logits, labels, cu, pe::Vector<double>::Ones(3), pe::Vector<double>()),
                      "prefopt::eigen::gather_packed_logprobs_backward",
                      "expected grad_sum of shape [2] (one per sequence) or empty, got [3]");
  EXPECT_EIGEN_THROWS(pe::value_of<DPOLossType>("dpo"), "prefopt::eigen::value_of",
                      "unknown DPO loss type 'dpo'; expected one of sigmoid, hinge");
  EXPECT_EQ(pe::value_of<prefopt::TPOLossType>("tpo-l"), prefopt::TPOLossType::kTPOL);
  EXPECT_STREQ(pe::name_of(prefopt::KTOLossType::kAPOZeroUnpaired), "apo_zero_unpaired");
}

// The gradient may replace the logits in place (the same buffer: each row is read before it
// is written), as hosts short of memory do; a partly overlapping buffer is refused, and a call
// that throws writes nothing.
TEST_F(eigen, GatheringBackwardInPlaceAndOverlap) {
  const Packed pk({5, 0, 1, 13, 2}, 37);
  const auto S = pk.cu.size() - 1;
  const pe::Vector<double> gs = to_eigen<double>(at::randn({S}, at::kDouble));
  const pe::Vector<double> gm = to_eigen<double>(at::randn({S}, at::kDouble));
  for (bool shift : {true, false}) {
    SCOPED_TRACE(shift ? "shift" : "no shift");
    const auto eo = pe::GatherLogprobsOptions().shift(shift);
    // The libtorch layer's autograd is the reference.
    const auto logits = pk.torch_logits(at::kDouble).requires_grad_();
    const auto tl = F::gather_packed_logprobs(logits, pk.torch_labels(), pk.torch_cu(),
                                              prefopt::GatherLogprobsOptions().shift(shift));
    const auto g = torch::autograd::grad(
        {(tl.sum * to_torch(gs)).sum() + (tl.mean * to_torch(gm)).sum()}, {logits})[0];
    pe::RowMatrix<double> buf = pk.logits;  // the logits, overwritten by their gradient
    pe::gather_packed_logprobs_backward<double>(buf, pk.labels, pk.cu, gs, gm, buf, eo);
    EXPECT_TRUE(
        AllClose(at::from_blob(buf.data(), {buf.rows(), buf.cols()}, at::kDouble), g, kRtol, kAtol))
        << "in place, double";
    pe::RowMatrix<float> fbuf = pk.logits.cast<float>();
    const pe::RowMatrix<float> fref = pe::gather_packed_logprobs_backward<float>(
        fbuf, pk.labels, pk.cu, gs.cast<float>(), gm.cast<float>(), eo);
    pe::gather_packed_logprobs_backward<float>(fbuf, pk.labels, pk.cu, gs.cast<float>(),
                                               gm.cast<float>(), fbuf, eo);
    EXPECT_EQ((fbuf - fref).cwiseAbs().maxCoeff(), 0.f) << "in place, float";
  }
  // Rows 1.. of the logits as the gradient of rows 0..: refused, the buffer left as it was.
  const char* fn = "prefopt::eigen::gather_packed_logprobs_backward";
  pe::IndexVector labels(4), cu(2);
  labels << -100, 1, 2, 0;
  cu << 0, 4;
  std::vector<double> mem(5 * 3);
  for (size_t i = 0; i < mem.size(); ++i) mem[i] = 0.25 * static_cast<double>(i % 7);
  const std::vector<double> before = mem;
  const Eigen::Map<const pe::RowMatrix<double>> rows0(mem.data(), 4, 3);
  Eigen::Map<pe::RowMatrix<double>> rows1(mem.data() + 3, 4, 3);
  const pe::Vector<double> one = pe::Vector<double>::Ones(1);
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs_backward<double>(rows0, labels, cu, one,
                                                                  pe::Vector<double>(), rows1),
                      fn,
                      "expected grad_logits to be the logits' own buffer (in place) or not to "
                      "overlap it, got buffers that partly overlap");
  EXPECT_EQ(mem, before);
  // An out-of-range label: the error comes before anything is written.
  labels(3) = 3;
  pe::RowMatrix<double> out = pe::RowMatrix<double>::Constant(4, 3, 7.0);
  EXPECT_EIGEN_THROWS(pe::gather_packed_logprobs_backward<double>(rows0, labels, cu, one,
                                                                  pe::Vector<double>(), out),
                      fn, "expected labels in [0, 3) or equal to ignore_index = -100, got 3");
  EXPECT_TRUE((out.array() == 7.0).all());
}

// A window that is not a MetricWindow value (an integer cast to the enum) is refused, with the
// libtorch layer's message; it was silently taken as kCountWeighted.
TEST_F(eigen, MetricAccumulatorRefusesAnUnknownWindow) {
  const auto em = eigen_message(
      [] {
        return pe::MetricAccumulator(pe::MetricsOptions().window(static_cast<pe::MetricWindow>(9)));
      },
      "prefopt::eigen::MetricAccumulator");
  const auto tm = torch_message(
      [] {
        return prefopt::MetricAccumulator(
            prefopt::MetricsOptions().window(static_cast<prefopt::MetricWindow>(9)));
      },
      "prefopt::MetricAccumulator");
  EXPECT_EQ(em, ": window is not a MetricWindow value (got 9)");
  EXPECT_EQ(em, tm);
}

// Issue #20: negative token counts are refused, with the libtorch layer's message.
TEST_F(eigen, NegativeLengthsAreRefused) {
  Pairs p(3);
  p.nc = at::tensor({10, 10, -19}, at::kLong);
  const auto in = eigen_pairs<double>(p, {});
  const auto t = torch_pairs(p, {});
  const auto sft = pe::DPOLossOptions().loss_type(DPOLossType::kSFT);
  EXPECT_EIGEN_THROWS(pe::dpo_loss(in, sft), "prefopt::eigen::dpo_loss",
                      "expected chosen_lengths to be token counts >= 0, got -19 at index 2");
  EXPECT_EQ(
      eigen_message([&] { return pe::dpo_loss(in, sft); }, "prefopt::eigen::dpo_loss"),
      torch_message(
          [&] { return F::dpo_loss(t.in, prefopt::DPOLossOptions().loss_type(DPOLossType::kSFT)); },
          "prefopt::dpo_loss"));
  auto rejected = in;
  rejected.chosen_lengths(Eigen::VectorXd::Ones(3))
      .rejected_lengths(Eigen::VectorXd::Constant(3, NAN));
  EXPECT_EIGEN_THROWS(pe::dpo_loss(rejected), "prefopt::eigen::dpo_loss",
                      "expected rejected_lengths to be token counts >= 0, got nan at index 0");
  EXPECT_EIGEN_THROWS(pe::orpo_loss(in), "prefopt::eigen::orpo_loss",
                      "expected chosen_lengths to be token counts >= 0");
  pe::SequenceLogprobs<double> gold;
  gold.sum = pe::Vector<double>::Constant(2, -3.0);
  gold.count = pe::IndexVector::Ones(2);
  gold.count(1) = -1;
  auto no_len = in;
  no_len.chosen_lengths(std::nullopt);
  EXPECT_EIGEN_THROWS(pe::tpo_loss(no_len, gold), "prefopt::eigen::tpo_loss",
                      "expected gold.count to be token counts >= 0, got -1 at index 1");
}

// A PairInputs that does not say its form is taken as the loss's native form, with one warning
// per process through the handler.
TEST_F(eigen, UnspecifiedFormWarnsOnce) {
  std::vector<std::string> seen;
  auto saved = pe::warning_handler();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  const Pairs p(3);
  auto in = eigen_pairs<double>(p, {});
  in.logps_form(LogpsForm::kUnspecified);
  const auto a = pe::dpo_loss(in);
  const auto b = pe::dpo_loss(in);
  in.logps_form(LogpsForm::kSum);
  EXPECT_EQ(a.loss(0), pe::dpo_loss(in).loss(0));
  pe::warning_handler() = saved;
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_NE(seen[0].find("prefopt::eigen::dpo_loss: PairInputs does not say"), std::string::npos);
}

// A host's nll_loss that no term reads (DPO without sft and rpo_alpha, CPO with cpo_alpha 0):
// a warning, as in the libtorch layer (once per process: forgotten first).
TEST_F(eigen, UnreadNllLossWarns) {
  const Pairs p(3);
  Feed f;
  f.nll = 5.0;
  pe::detail::forget_warning("prefopt::eigen::dpo_loss/unread_nll");
  pe::detail::forget_warning("prefopt::eigen::cpo_loss/unread_nll/cpo_alpha = 0");
  pe::detail::forget_warning("prefopt::eigen::cpo_loss/unread_nll/alphapo has no NLL term");
  std::vector<std::string> seen;
  auto saved = pe::warning_handler();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  const auto d = pe::dpo_loss(eigen_pairs<double>(p, f));
  // CPO is reference-free: no reference (it would warn of that too).
  Feed no_ref = f;
  no_ref.reference = false;
  const auto c = pe::cpo_loss(eigen_pairs<double>(p, no_ref), pe::CPOLossOptions().cpo_alpha(0.0));
  // Another reason of the same function: its own warning, as the libtorch layer's own site (it
  // was swallowed by the first one's once-per-process key).
  const auto a =
      pe::cpo_loss(eigen_pairs<double>(p, no_ref),
                   pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kAlphaPO).alpha(0.5));
  pe::warning_handler() = saved;
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_NE(seen[0].find("prefopt::eigen::dpo_loss: nll_loss is given but no term reads it"),
            std::string::npos);
  EXPECT_NE(
      seen[1].find("prefopt::eigen::cpo_loss: nll_loss is given but no term reads it (cpo_alpha "
                   "= 0)"),
      std::string::npos);
  EXPECT_NE(
      seen[2].find("prefopt::eigen::cpo_loss: nll_loss is given but no term reads it (alphapo "
                   "has no NLL term)"),
      std::string::npos);
  EXPECT_FALSE(d.nll_loss.has_value());
  EXPECT_FALSE(c.nll_loss.has_value());
  EXPECT_FALSE(a.nll_loss.has_value());
}

// An option that no selected loss type reads, set to another value than its default, warns as
// in the libtorch layer (one key per function and option, forgotten first); the same value where
// it is read, and the default, do not. So does a reference given to a reference-free loss.
TEST_F(eigen, UnreadOptionsWarn) {
  const Pairs p(3);
  Feed f, no_ref, host;
  no_ref.reference = false;
  host.nll = 5.0;
  const auto in = eigen_pairs<double>(p, f);
  const auto policy = eigen_pairs<double>(p, no_ref);
  const auto with_nll = eigen_pairs<double>(p, host);
  // The warnings `run` sends with `key` forgotten first.
  const auto warnings = [](const std::string& key, const std::function<void()>& run) {
    pe::detail::forget_warning(key);
    std::vector<std::string> seen;
    auto saved = pe::warning_handler();
    pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
    run();
    pe::warning_handler() = saved;
    return seen;
  };
  const auto has = [](const std::vector<std::string>& seen, const std::string& text) {
    return std::any_of(seen.begin(), seen.end(),
                       [&](const std::string& m) { return m.find(text) != std::string::npos; });
  };
  // Each case: the key, the warning's text, the unread call, and calls that read the option
  // (or keep its default), which must not warn.
  struct Case {
    std::string key, text;
    std::function<void()> unread;
    std::vector<std::function<void()>> quiet;
  };
  using DO = pe::DPOLossOptions;
  const std::string dpo = "prefopt::eigen::dpo_loss", cpo = "prefopt::eigen::cpo_loss";
  const std::string simpo = "prefopt::eigen::simpo_loss", tpo = "prefopt::eigen::tpo_loss";
  const std::string orpo = "prefopt::eigen::orpo_loss";
  const auto seq = NLLNormalization::kSequenceMean;
  const auto alphapo = pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kAlphaPO).alpha(0.5);
  const std::vector<Case> cases = {
      {dpo + "/unread_discopop_tau",
       dpo + ": discopop_tau = 0.1 is read by the discopop loss type only",
       [&] { pe::dpo_loss(in, DO().discopop_tau(0.1)); },
       {[&] { pe::dpo_loss(in, DO().loss_type(DPOLossType::kDiscoPOP).discopop_tau(0.1)); },
        [&] { pe::dpo_loss(in); }}},
      {dpo + "/unread_f_alpha_divergence_coef",
       dpo + ": f_alpha_divergence_coef = 0.3 is read by f_divergence_type alpha_divergence "
             "only, got js_divergence",
       [&] {
         pe::dpo_loss(in, DO().f_divergence_type(prefopt::FDivergence::kJSDivergence)
                              .f_alpha_divergence_coef(0.3));
       },
       {[&] {
          pe::dpo_loss(in, DO().f_divergence_type(prefopt::FDivergence::kAlphaDivergence)
                               .f_alpha_divergence_coef(0.3));
        },
        [&] { pe::dpo_loss(in); }}},
      {dpo + "/unread_ipo_normalization",
       dpo + ": ipo_normalization = IPONormalization::kNone is read by the ipo loss type only",
       [&] { pe::dpo_loss(in, DO().ipo_normalization(prefopt::IPONormalization::kNone)); },
       {[&] {
          pe::dpo_loss(in, DO().loss_type(DPOLossType::kIPO)
                               .ipo_normalization(prefopt::IPONormalization::kNone));
        },
        [&] { pe::dpo_loss(in); }}},
      {dpo + "/unread_f_divergence_type",
       dpo + ": f_divergence_type = forward_kl maps the log-ratios of sigmoid",
       [&] {
         pe::dpo_loss(
             in,
             DO().loss_type(DPOLossType::kSFT).f_divergence_type(prefopt::FDivergence::kForwardKL));
       },
       {[&] {
          pe::dpo_loss(in, DO().loss_type({DPOLossType::kSFT, DPOLossType::kSigmoid})
                               .f_divergence_type(prefopt::FDivergence::kForwardKL));
        },
        [&] { pe::dpo_loss(in, DO().loss_type(DPOLossType::kSFT)); }}},
      {dpo + "/unread_nll_normalization",
       dpo + ": nll_normalization = NLLNormalization::kSequenceMean averages the NLL of sft and "
             "rpo_alpha, and there is none",
       [&] { pe::dpo_loss(in, DO().nll_normalization(seq)); },
       {[&] { pe::dpo_loss(in, DO().rpo_alpha(0.5).nll_normalization(seq)); },
        [&] { pe::dpo_loss(in); }}},
      {dpo + "/unread_nll_normalization/nll_loss",
       dpo + ": nll_normalization = NLLNormalization::kSequenceMean is not read when nll_loss "
             "is given",
       [&] { pe::dpo_loss(with_nll, DO().rpo_alpha(0.5).nll_normalization(seq)); },
       {[&] { pe::dpo_loss(in, DO().rpo_alpha(0.5).nll_normalization(seq)); },
        [&] { pe::dpo_loss(with_nll, DO().rpo_alpha(0.5)); }}},
      {cpo + "/unread_simpo_gamma",
       cpo + ": simpo_gamma = 1 is read by the simpo and alphapo loss types only, got hinge",
       [&] {
         pe::cpo_loss(policy,
                      pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kHinge).simpo_gamma(1));
       },
       {[&] {
          pe::cpo_loss(policy,
                       pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO).simpo_gamma(1));
        },
        [&] { pe::cpo_loss(policy, pe::CPOLossOptions(alphapo).simpo_gamma(1)); },
        [&] { pe::cpo_loss(policy); }}},
      {cpo + "/unread_cpo_alpha",
       cpo + ": cpo_alpha = 0.5 is not read by alphapo",
       [&] { pe::cpo_loss(policy, pe::CPOLossOptions(alphapo).cpo_alpha(0.5)); },
       {[&] { pe::cpo_loss(policy, pe::CPOLossOptions().cpo_alpha(0.5)); },
        // TRL's CPOConfig sets cpo_alpha = 0 for alphapo.
        [&] { pe::cpo_loss(policy, pe::CPOLossOptions(alphapo).cpo_alpha(0)); },
        [&] { pe::cpo_loss(policy, alphapo); }}},
      {cpo + "/unread_nll_normalization/alphapo",
       cpo + ": nll_normalization = NLLNormalization::kSequenceMean is not read by alphapo",
       [&] { pe::cpo_loss(policy, pe::CPOLossOptions(alphapo).nll_normalization(seq)); },
       {[&] { pe::cpo_loss(policy, pe::CPOLossOptions().nll_normalization(seq)); },
        [&] { pe::cpo_loss(policy, alphapo); }}},
      {cpo + "/unread_reference",
       cpo + ": the reference log-probs are given but no term reads them (sigmoid is "
             "reference-free): they are ignored",
       [&] { pe::cpo_loss(in); },
       {[&] { pe::cpo_loss(policy); }}},
      {simpo + "/unread_nll_normalization/no_nll",
       simpo + ": nll_normalization = NLLNormalization::kSequenceMean is not read without an NLL "
               "term (cpo_alpha = 0)",
       [&] { pe::simpo_loss(policy, pe::SimPOLossOptions().nll_normalization(seq)); },
       {[&] { pe::simpo_loss(policy, pe::SimPOLossOptions().cpo_alpha(1).nll_normalization(seq)); },
        [&] { pe::simpo_loss(policy); }}},
      {simpo + "/unread_reference",
       simpo + ": the reference log-probs are given but no term reads them (simpo is "
               "reference-free)",
       [&] { pe::simpo_loss(in); },
       {[&] { pe::simpo_loss(policy); }}},
      {tpo + "/unread_tpo_l_gamma",
       tpo + ": tpo_l_gamma = 1 is read by the tpo-l loss type only, got ipo",
       [&] {
         pe::tpo_loss(policy, pe::TPOLossOptions()
                                  .loss_type(prefopt::TPOLossType::kIPO)
                                  .tpo_alpha(0)
                                  .tpo_l_gamma(1));
       },
       {[&] {
          pe::tpo_loss(policy, pe::TPOLossOptions()
                                   .loss_type(prefopt::TPOLossType::kTPOL)
                                   .tpo_alpha(0)
                                   .tpo_l_gamma(1));
        },
        [&] { pe::tpo_loss(policy, pe::TPOLossOptions().tpo_alpha(0)); }}},
      {tpo + "/unread_reference",
       tpo + ": the reference log-probs are given but no term reads them (TPO is "
             "reference-free)",
       [&] { pe::tpo_loss(in, pe::TPOLossOptions().tpo_alpha(0)); },
       {[&] { pe::tpo_loss(policy, pe::TPOLossOptions().tpo_alpha(0)); }}},
      {orpo + "/unread_nll_normalization",
       orpo + ": nll_normalization = NLLNormalization::kSequenceMean is not read when nll_loss "
              "is given",
       [&] {
         pe::orpo_loss(eigen_pairs<double>(p,
                                           [&] {
                                             Feed h = host;
                                             h.reference = false;
                                             return h;
                                           }()),
                       pe::ORPOLossOptions().nll_normalization(seq));
       },
       {[&] { pe::orpo_loss(policy, pe::ORPOLossOptions().nll_normalization(seq)); },
        [&] { pe::orpo_loss(policy); }}},
      {orpo + "/unread_reference",
       orpo + ": the reference log-probs are given but no term reads them (ORPO is "
              "reference-free)",
       [&] { pe::orpo_loss(in); },
       {[&] { pe::orpo_loss(policy); }}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.key);
    EXPECT_TRUE(has(warnings(c.key, c.unread), c.text));
    for (const auto& q : c.quiet) EXPECT_FALSE(has(warnings(c.key, q), c.text));
  }
}

// A NaN log-prob gives a NaN hinge loss, as in the libtorch layer (relu(NaN) was 0 here: the
// pair's loss and its gradient vanished silently), and the gradient ATen's relu passes on.
TEST_F(eigen, HingeOfANaNMarginIsNaNAsLibtorch) {
  Pairs p(3);
  p.pc[1].fill_(NAN);
  const Feed f;
  const auto same = [](const pe::Vector<double>& e, const at::Tensor& t, const std::string& what) {
    const auto v = to_eigen<double>(t);
    ASSERT_EQ(e.size(), v.size()) << what;
    for (Eigen::Index i = 0; i < e.size(); ++i) {
      if (std::isnan(v(i))) {
        EXPECT_TRUE(std::isnan(e(i))) << what << "[" << i << "] = " << e(i) << ", expected nan";
      } else {
        EXPECT_NEAR(e(i), v(i), 1e-12 * (1 + std::abs(v(i)))) << what << "[" << i << "]";
      }
    }
  };
  for (auto red : {pe::Reduction::kMean, pe::Reduction::kNone}) {
    SCOPED_TRACE(static_cast<int>(red));
    const auto o =
        prefopt::DPOLossOptions().loss_type(DPOLossType::kHinge).reduction(torch_reduction(red));
    const auto t = torch_pairs(p, f);
    const auto tr = F::dpo_loss(t.in, o);
    const auto er = pe::dpo_loss(eigen_pairs<double>(p, f), eigen_of(o));
    EXPECT_TRUE(std::isnan(er.losses(1)));
    same(er.loss, as_vector(tr.loss), "dpo loss");
    same(er.losses, tr.losses, "dpo losses");
    const auto g = grads_of(tr.loss, t.leaves());
    same(er.grad_policy_chosen, g[0], "dpo grad_policy_chosen");
    same(er.grad_policy_rejected, g[1], "dpo grad_policy_rejected");

    const auto tc = torch_pairs(p, f);
    const auto tcr = F::cpo_loss(tc.in, prefopt::CPOLossOptions()
                                            .loss_type(prefopt::CPOLossType::kHinge)
                                            .cpo_alpha(0)
                                            .reduction(torch_reduction(red)));
    const auto ecr = pe::cpo_loss(
        eigen_pairs<double>(p, f),
        pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kHinge).cpo_alpha(0).reduction(red));
    EXPECT_TRUE(std::isnan(ecr.losses(1)));
    same(ecr.loss, as_vector(tcr.loss), "cpo loss");
    same(ecr.losses, tcr.losses, "cpo losses");
    const auto gc = grads_of(tcr.loss, tc.leaves());
    same(ecr.grad_policy_chosen, gc[0], "cpo grad_policy_chosen");
    same(ecr.grad_policy_rejected, gc[1], "cpo grad_policy_rejected");
  }
}

// Gold log-probs with tpo_alpha = 0: nothing reads them, a warning in both layers (once per
// process: forgotten first); the loss is the preference term alone.
TEST_F(eigen, TpoGoldUnreadWarns) {
  const Pairs p(3);
  Feed no_ref;  // TPO is reference-free (a reference would warn of that too)
  no_ref.reference = false;
  const auto ein = eigen_pairs<double>(p, no_ref);
  const auto t = torch_pairs(p, no_ref);
  pe::SequenceLogprobs<double> gold;
  gold.sum = pe::Vector<double>::Constant(3, -4.0);
  gold.count = pe::IndexVector::Constant(3, 2);
  prefopt::SequenceLogprobs tgold;
  tgold.sum = at::full({3}, -4.0, at::kDouble);
  tgold.count = at::full({3}, 2, at::kLong);
  const auto o = pe::TPOLossOptions().tpo_alpha(0);
  pe::detail::forget_warning("prefopt::eigen::tpo_loss/unread_gold");
  std::vector<std::string> seen;
  auto saved = pe::warning_handler();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  const auto r = pe::tpo_loss(ein, gold, o);
  pe::warning_handler() = saved;
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0],
            "prefopt::eigen::tpo_loss: the gold SequenceLogprobs are given but no term reads them "
            "(tpo_alpha = 0): they are ignored");
  EXPECT_EQ(r.loss(0), pe::tpo_loss(ein, o).loss(0));
  EXPECT_EQ(r.grad_gold_sum.size(), 0);
  prefopt::detail::WarningCapture warnings;
  const auto tr = F::tpo_loss(t.in, tgold, prefopt::TPOLossOptions().tpo_alpha(0));
  EXPECT_TRUE(
      warnings.contains("prefopt::tpo_loss: the gold SequenceLogprobs are given but no "
                        "term reads them (tpo_alpha = 0): they are ignored"));
  EXPECT_NEAR(r.loss(0), tr.loss.item<double>(), 1e-12);
  // An empty gold (no gold responses) is no input: no warning.
  pe::detail::forget_warning("prefopt::eigen::tpo_loss/unread_gold");
  seen.clear();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  (void)pe::tpo_loss(ein, pe::SequenceLogprobs<double>(), o);
  pe::warning_handler() = saved;
  EXPECT_TRUE(seen.empty());
}

// Negative loss weights and NLL weights are legal but maximise their term: a warning each, as
// in the libtorch layer (once per process: forgotten first); none for AlphaPO's unread one.
TEST_F(eigen, NegativeWeightsWarn) {
  const Pairs p(3);
  Feed f;
  f.nll = 5.0;
  for (const char* key :
       {"prefopt::eigen::dpo_loss/negative_weight", "prefopt::eigen::dpo_loss/negative_rpo",
        "prefopt::eigen::cpo_loss/negative_nll_weight"})
    pe::detail::forget_warning(key);
  std::vector<std::string> seen;
  auto saved = pe::warning_handler();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  (void)pe::dpo_loss(eigen_pairs<double>(p, f),
                     pe::DPOLossOptions()
                         .loss_type({DPOLossType::kSigmoid, DPOLossType::kHinge})
                         .loss_weights({1.0, -0.5})
                         .rpo_alpha(-0.25));
  (void)pe::cpo_loss(eigen_pairs<double>(p, f), pe::CPOLossOptions().cpo_alpha(-1.0));
  // AlphaPO has no NLL term: its cpo_alpha is not read, and a negative one is no slip.
  pe::detail::forget_warning("prefopt::eigen::cpo_loss/negative_nll_weight");
  (void)pe::cpo_loss(
      eigen_pairs<double>(p, f),
      pe::CPOLossOptions().loss_type(prefopt::CPOLossType::kAlphaPO).alpha(0.5).cpo_alpha(-1.0));
  pe::warning_handler() = saved;
  // Only these (AlphaPO's host NLL, unread, warns of that).
  seen.erase(
      std::remove_if(seen.begin(), seen.end(),
                     [](const std::string& m) { return m.find("maximises") == std::string::npos; }),
      seen.end());
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_NE(seen[0].find("prefopt::eigen::dpo_loss: loss_weight -0.5 < 0 maximises"),
            std::string::npos);
  EXPECT_NE(
      seen[1].find("prefopt::eigen::dpo_loss: rpo_alpha = -0.25 < 0 maximises the chosen NLL"),
      std::string::npos);
  EXPECT_NE(seen[2].find("prefopt::eigen::cpo_loss: cpo_alpha = -1 < 0 maximises the NLL"),
            std::string::npos);
}

// The kto type without any KL input: z = 0, with a warning (once per process: forgotten first,
// since an earlier test of the process may have drawn it).
TEST_F(eigen, KtoWithoutAnyKlInputWarns) {
  const auto d = pe::Vector<double>::Constant(1, -3.0), u = pe::Vector<double>::Constant(1, -2.0);
  const auto in = pe::KTOInputs<double>()
                      .policy_chosen_logps(d)
                      .policy_rejected_logps(u)
                      .reference_chosen_logps(d.array() - 1.0)
                      .reference_rejected_logps(u.array() + 1.0);
  pe::detail::forget_warning("prefopt::eigen::kto_loss/no_kl");
  std::vector<std::string> seen;
  auto saved = pe::warning_handler();
  pe::warning_handler() = [&](const std::string& m) { seen.push_back(m); };
  const auto r = pe::kto_loss(in);
  pe::warning_handler() = saved;
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_NE(seen[0].find("prefopt::eigen::kto_loss: the kto loss got neither kl nor KL log-probs"),
            std::string::npos);
  EXPECT_EQ(r.kl, 0.0);
  // z = 0: (1 − σ(β·1) + 1 − σ(β·1)) / 2 with β = 0.1.
  const double s = 1 / (1 + std::exp(-0.1));
  EXPECT_NEAR(r.loss(0), 1 - s, 1e-15);
}

// A host's own `loss` from add_scalar and an add's loss in one micro-step: refused by both
// layers (they were averaged into one value).
TEST_F(eigen, AddScalarOfABuiltinDoesNotMixWithAdd) {
  const Pairs p(3);
  const auto ein = eigen_pairs<double>(p, {});
  const auto r = pe::dpo_loss(ein);
  pe::MetricAccumulator acc;
  acc.add(r, ein);
  EXPECT_EIGEN_THROWS(acc.add_scalar("loss", 100.0),
                      "prefopt::eigen::MetricAccumulator::add_scalar",
                      "'loss' is logged by this micro-step's add already");
  acc.add_scalar("kl", 0.5);  // a DPO add logs no kl
  acc.add_scalar("kl", 1.5);  // another sample of it, not the add's
  const auto m = acc.compute();
  EXPECT_DOUBLE_EQ(m.at("loss"), r.loss(0));
  EXPECT_DOUBLE_EQ(m.at("kl"), 1.0);
  acc.add_scalar("loss", 100.0);
  EXPECT_EIGEN_THROWS(acc.add(r, ein), "prefopt::eigen::MetricAccumulator::add",
                      "'loss' came from add_scalar in this micro-step, and this add logs its own");
  acc.add_scalar("loss", 2.0);  // without add: the window's samples
  EXPECT_DOUBLE_EQ(acc.compute().at("loss"), 51.0);
}
