// SPDX-License-Identifier: Apache-2.0
// prefopt/losses/dpo.h against the fp64 reference, torchtune's literal expectations, hand
// derivations, every §7 convention option, the numeric extremes and every TORCH_CHECK.
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>

#include <cmath>
#include <string>
#include <vector>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
using prefopt::DPOLossOptions;
using prefopt::DPOLossType;
using prefopt::FDivergence;
using prefopt::PairInputs;
using prefopt_test::AllClose;

namespace {

const std::vector<std::string> kAllTypes = {
    "sigmoid",   "hinge", "ipo",          "robust",   "exo_pair", "nca_pair", "bco_pair",
    "sppo_hard", "aot",   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"};

/// Random pairs: summed log-probs around −20, the reference near the policy so β·Δ is O(1).
struct Batch {
  at::Tensor pc, pr, rc, rr, nc, nr;
  explicit Batch(int64_t B, at::ScalarType dt = at::kDouble, double spread = 8.0) {
    const auto o = at::TensorOptions().dtype(at::kDouble);
    pc = (-20 + spread * at::randn({B}, o)).to(dt).requires_grad_();
    pr = (-24 + spread * at::randn({B}, o)).to(dt).requires_grad_();
    rc = (pc.detach().to(at::kDouble) + 2 * at::randn({B}, o)).to(dt);
    rr = (pr.detach().to(at::kDouble) + 2 * at::randn({B}, o)).to(dt);
    nc = at::randint(0, 40, {B}, at::kLong);  // zero-length completions included
    nr = at::randint(1, 40, {B}, at::kLong);
  }
  PairInputs inputs() const {
    return PairInputs()
        .policy_chosen_logps(pc)
        .policy_rejected_logps(pr)
        .reference_chosen_logps(rc)
        .reference_rejected_logps(rr)
        .chosen_lengths(nc)
        .rejected_lengths(nr)
        .logps_form(prefopt::LogpsForm::kSum);
  }
  std::vector<at::Tensor> grads(const at::Tensor& loss) const {
    auto g = torch::autograd::grad({loss}, {pc, pr}, {}, /*retain_graph=*/true);
    return {g[0], g[1]};
  }
};

prefopt_ref::DPORef ref_of(const DPOLossOptions& o) {
  prefopt_ref::DPORef r;
  r.type = prefopt::dpo_loss_type_name(o.loss_type().front());
  r.f = prefopt::f_divergence_name(o.f_divergence_type());
  r.alpha = o.f_alpha_divergence_coef();
  r.beta = o.beta();
  // sigmoid and sigmoid_norm read ε only under cdpo (TRL ≥ 0.29).
  const bool sigmoid_form = r.type == "sigmoid" || r.type == "sigmoid_norm";
  r.eps = sigmoid_form && !o.cdpo() ? 0.0 : o.label_smoothing();
  r.tau = o.discopop_tau();
  r.ipo_per_token = o.ipo_normalization() == prefopt::IPONormalization::kPerToken;
  return r;
}

void expect_matches_reference(const Batch& b, const DPOLossOptions& o, const char* what) {
  SCOPED_TRACE(what);
  const auto r = F::dpo_loss(b.inputs(), o);
  const auto nc = b.nc.to(at::kDouble), nr = b.nr.to(at::kDouble);
  const auto ref = prefopt_ref::dpo_losses(ref_of(o), b.pc, b.pr, b.rc, b.rr, nc, nr);
  EXPECT_TRUE(AllClose(r.losses, ref, 1e-10, 1e-12));
  EXPECT_TRUE(AllClose(r.loss, ref.mean(), 1e-10, 1e-12));
  EXPECT_TRUE(AllClose(r.chosen_rewards, o.beta() * (b.pc - b.rc), 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.rejected_rewards, o.beta() * (b.pr - b.rr), 1e-12, 1e-14));
  const auto g = b.grads(r.loss);
  const auto gref = b.grads(ref.mean());
  EXPECT_TRUE(AllClose(g[0], gref[0], 1e-9, 1e-12));
  EXPECT_TRUE(AllClose(g[1], gref[1], 1e-9, 1e-12));
}

}  // namespace

struct DPOLossTest : prefopt_test::SeededTest {};

TEST_F(DPOLossTest, EveryLossTypeMatchesReference) {
  for (int64_t B : {1, 3, 17}) {
    Batch b(B);
    for (const auto& name : kAllTypes) {
      auto o = DPOLossOptions().loss_type(prefopt::dpo_loss_type_from_name(name)).beta(0.2);
      if (name == "exo_pair" || name == "robust") o.label_smoothing(0.1);
      expect_matches_reference(b, o, (name + " B=" + std::to_string(B)).c_str());
    }
  }
}

TEST_F(DPOLossTest, FDivergencesMatchReference) {
  Batch b(9, at::kDouble, 1.0);  // |ρ| ~ 2: e^{±ρ} stays tame for the naive reference
  for (auto f :
       {FDivergence::kForwardKL, FDivergence::kJSDivergence, FDivergence::kAlphaDivergence})
    for (double a : {0.5, 0.0, 1.0, 1.7})
      for (const char* t :
           {"sigmoid", "hinge", "ipo", "discopop", "sigmoid_norm", "robust", "exo_pair"}) {
        auto o = DPOLossOptions()
                     .loss_type(prefopt::dpo_loss_type_from_name(t))
                     .f_divergence_type(f)
                     .f_alpha_divergence_coef(a);
        if (std::string(t) == "robust" || std::string(t) == "exo_pair") o.label_smoothing(0.2);
        expect_matches_reference(
            b, o,
            (std::string(prefopt::f_divergence_name(f)) + " " + t + " a=" + std::to_string(a))
                .c_str());
      }
}

// TRL 1.16's scores keep f′'s constants (forward_kl 1 − e^{−ρ}, js_divergence log 2 + ℓ(ρ),
// alpha_divergence (e^{(α−1)ρ} − 1)/(α−1), trl#6559): they cancel in Δ but not in ipo's and
// sigmoid_norm's per-token scores when the lengths differ. Expected values: TRL 1.16's
// `_compute_loss` formulas restated in Python (torch, fp64), β = 0.1.
TEST_F(DPOLossTest, FDivergenceScoresKeepTrlConstants) {
  const auto in = PairInputs()
                      .policy_chosen_logps(at::tensor({-4.0, -10.0}, at::kDouble))
                      .policy_rejected_logps(at::tensor({-14.0, -6.0}, at::kDouble))
                      .reference_chosen_logps(at::tensor({-5.0, -9.0}, at::kDouble))
                      .reference_rejected_logps(at::tensor({-10.0, -7.0}, at::kDouble))
                      .chosen_lengths(at::tensor({3, 7}))
                      .rejected_lengths(at::tensor({2, 5}))
                      .logps_form(prefopt::LogpsForm::kSum);
  struct Case {
    FDivergence f;
    double alpha;
    DPOLossType t;
    std::vector<double> losses;
  };
  const std::vector<Case> cases = {
      {FDivergence::kForwardKL, 0.5, DPOLossType::kIPO, {484.4304979436299, 28.8572338061237}},
      {FDivergence::kForwardKL,
       0.5,
       DPOLossType::kSigmoidNorm,
       {0.06498199028411578, 0.71191469827107}},
      {FDivergence::kForwardKL,
       0.5,
       DPOLossType::kSigmoid,
       {0.004404053579307288, 0.8175569521882899}},
      {FDivergence::kJSDivergence, 0.5, DPOLossType::kIPO, {10.30968698299582, 26.67273045464599}},
      {FDivergence::kJSDivergence,
       0.5,
       DPOLossType::kSigmoidNorm,
       {0.6076865938539149, 0.7014092764456489}},
      {FDivergence::kAlphaDivergence,
       0.5,
       DPOLossType::kIPO,
       {2.727019549243695, 28.544835131381422}},
      {FDivergence::kAlphaDivergence,
       0.5,
       DPOLossType::kSigmoidNorm,
       {0.4148893130351941, 0.7104308424353699}},
      {FDivergence::kAlphaDivergence,
       1.7,
       DPOLossType::kIPO,
       {14.794874967073653, 29.077776341371052}},
      {FDivergence::kAlphaDivergence,
       1.7,
       DPOLossType::kSigmoidNorm,
       {0.6371302524777155, 0.7129586882846226}},
  };
  for (const auto& c : cases) {
    const auto r = F::dpo_loss(
        in,
        DPOLossOptions().loss_type(c.t).f_divergence_type(c.f).f_alpha_divergence_coef(c.alpha));
    EXPECT_TRUE(AllClose(r.losses, at::tensor(c.losses, at::kDouble), 1e-12, 1e-14))
        << prefopt::f_divergence_name(c.f) << " " << prefopt::dpo_loss_type_name(c.t) << " "
        << r.losses;
  }
}

// TRL 1.16 (trl#6559) rejects an f-divergence for the types that read each side's log-ratio
// alone; they used to take the scores silently here.
TEST_F(DPOLossTest, FDivergenceIsRefusedWhereUndefined) {
  Batch b(3);
  for (auto t :
       {DPOLossType::kNCAPair, DPOLossType::kBCOPair, DPOLossType::kSPPOHard, DPOLossType::kAPOZero,
        DPOLossType::kAPODown, DPOLossType::kAOT, DPOLossType::kAOTUnpaired}) {
    for (auto f :
         {FDivergence::kForwardKL, FDivergence::kJSDivergence, FDivergence::kAlphaDivergence}) {
      PREFOPT_EXPECT_THROWS_WITH(
          F::dpo_loss(b.inputs(),
                      DPOLossOptions().loss_type({DPOLossType::kSigmoid, t}).f_divergence_type(f)),
          std::string("prefopt::dpo_loss: f_divergence_type = ") + prefopt::f_divergence_name(f) +
              " is only defined for the loss types built on the chosen - rejected difference "
              "(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft), got " +
              prefopt::dpo_loss_type_name(t));
    }
    EXPECT_NO_THROW(F::dpo_loss(b.inputs(), DPOLossOptions().loss_type(t)));
  }
  EXPECT_NO_THROW(F::dpo_loss(b.inputs(), DPOLossOptions()
                                              .loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                                              .f_divergence_type(FDivergence::kForwardKL)));
}

// torchtune's published expectations (tests/torchtune/rlhf/loss/test_dpo_loss.py) on its
// inputs: Δ = [0, 10, 20].
TEST_F(DPOLossTest, TorchtuneLiterals) {
  const auto pc = at::tensor({-0.5, -10.0, -1.0}), pr = at::tensor({-0.1, -30.0, -21.0});
  const auto rc = at::tensor({-0.5, -10.1, -0.1}), rr = at::tensor({-0.1, -20.1, -0.1});
  // DPOLoss(beta=0.1, label_smoothing=0): −log(1/(1 + e^{−[0, 1, 2]})).
  const auto dpo = F::dpo_loss(pc, pr, rc, rr, torch::kNone);
  EXPECT_TRUE(
      AllClose(dpo.losses, -(1 / (1 + at::exp(at::tensor({0.0, -1.0, -2.0})))).log(), 1e-5, 1e-4));
  // RSOLoss(gamma=0.1): [1, 0, 0].
  const auto rso = F::dpo_loss(pc, pr, rc, rr, DPOLossOptions().loss_type(DPOLossType::kHinge));
  EXPECT_TRUE(AllClose(rso.losses, at::tensor({1.0, 0.0, 0.0}), 1e-5, 1e-4));
  // The removed IPOLoss(tau=0.1), on summed log-probs: (Δ − 5)² = [25, 25, 225].
  const auto ipo = F::dpo_loss(pc, pr, rc, rr,
                               DPOLossOptions()
                                   .loss_type(DPOLossType::kIPO)
                                   .ipo_normalization(prefopt::IPONormalization::kNone));
  EXPECT_TRUE(AllClose(ipo.losses, at::tensor({25.0, 25.0, 225.0}), 1e-5, 1e-4));
  EXPECT_TRUE(AllClose(dpo.chosen_rewards, at::tensor({0.0, 0.01, -0.09}), 1e-5, 1e-6));
}

TEST_F(DPOLossTest, HandDerivedValues) {
  const auto z = at::zeros({2}, at::kDouble);
  // Δ = 0: sigmoid ln 2; hinge 1; discopop ½ln2 + ½; apo_zero ½ + ½; exo_pair(ε) at q = ½.
  auto at0 = [&](DPOLossType t, double eps = 0) {
    return F::dpo_loss(z, z, z, z, DPOLossOptions().loss_type(t).label_smoothing(eps))
        .loss.item<double>();
  };
  EXPECT_NEAR(at0(DPOLossType::kSigmoid), std::log(2.0), 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kHinge), 1.0, 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kDiscoPOP), 0.5 * std::log(2.0) + 0.5, 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kAPOZero), 1.0, 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kAPODown), 1.0, 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kExoPair, 0.2),
              0.5 * (std::log(0.5) - std::log(0.8)) + 0.5 * (std::log(0.5) - std::log(0.2)), 1e-15);
  // NCA at 0: −ℓ(0) − ½ℓ(0) − ½ℓ(0) = 2 ln 2. SPPO at 0: 2·(1/(2β))² = 2·25.
  EXPECT_NEAR(at0(DPOLossType::kNCAPair), 2 * std::log(2.0), 1e-15);
  EXPECT_NEAR(at0(DPOLossType::kSPPOHard), 50.0, 1e-12);
  // IPO per token: ρ_c = 6 over 3 tokens, ρ_r = −4 over 2 tokens → Δ̄ = 4; β = 0.25 → (4 − 2)².
  const auto r = F::dpo_loss(PairInputs()
                                 .policy_chosen_logps(at::tensor({-4.0}))
                                 .policy_rejected_logps(at::tensor({-14.0}))
                                 .reference_chosen_logps(at::tensor({-10.0}))
                                 .reference_rejected_logps(at::tensor({-10.0}))
                                 .chosen_lengths(at::tensor({3}))
                                 .rejected_lengths(at::tensor({2})),
                             DPOLossOptions().loss_type(DPOLossType::kIPO).beta(0.25));
  EXPECT_NEAR(r.loss.item<double>(), 4.0, 1e-15);
  // cDPO with ε = 0.25 at βΔ = ln 3: −¾ ln ¾ − ¼ ln ¼.
  const double d = std::log(3.0) / 0.1;
  const auto c = F::dpo_loss(at::tensor({d}), at::tensor({0.0}), at::tensor({0.0}),
                             at::tensor({0.0}), DPOLossOptions().label_smoothing(0.25).cdpo(true));
  EXPECT_NEAR(c.loss.item<double>(), -0.75 * std::log(0.75) - 0.25 * std::log(0.25), 1e-14);
}

TEST_F(DPOLossTest, Reductions) {
  Batch b(5);
  const auto mean = F::dpo_loss(b.pc, b.pr, b.rc, b.rr);
  const auto sum = F::dpo_loss(b.pc, b.pr, b.rc, b.rr, torch::kSum);
  const auto none = F::dpo_loss(b.pc, b.pr, b.rc, b.rr, torch::kNone);
  EXPECT_EQ(mean.loss.dim(), 0);
  EXPECT_EQ(none.loss.sizes(), at::IntArrayRef({5}));
  EXPECT_TRUE(AllClose(sum.loss, none.loss.sum(), 1e-14, 0));
  EXPECT_TRUE(AllClose(mean.loss, none.loss.mean(), 1e-14, 0));
  EXPECT_FALSE(mean.chosen_rewards.requires_grad());
  EXPECT_FALSE(mean.rejected_rewards.requires_grad());
}

// reference/losses.md §7, row by row: each anchor's convention is an option.
TEST_F(DPOLossTest, AnchorConventions) {
  Batch b(7);
  const auto in = b.inputs();
  const auto nc = b.nc.to(at::kDouble), nr = b.nr.to(at::kDouble);
  // sigmoid + label smoothing under cdpo: cDPO (TRL ≤ 0.28, torchtune, OpenRLHF).
  {
    prefopt_ref::DPORef ref;
    ref.eps = 0.3;
    const auto r = F::dpo_loss(in, DPOLossOptions().label_smoothing(0.3).cdpo(true));
    EXPECT_TRUE(AllClose(r.losses, prefopt_ref::dpo_losses(ref, b.pc, b.pr, b.rc, b.rr, nc, nr),
                         1e-12, 1e-14));
  }
  // IPO: per-token (TRL, LLaMA-Factory) vs summed (torchtune's IPOLoss, OpenRLHF).
  {
    const auto per_token = F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kIPO));
    const auto summed = F::dpo_loss(in, DPOLossOptions()
                                            .loss_type(DPOLossType::kIPO)
                                            .ipo_normalization(prefopt::IPONormalization::kNone));
    const auto delta = (b.pc - b.rc) - (b.pr - b.rr);
    EXPECT_TRUE(AllClose(summed.losses, (delta - 5.0).square(), 1e-12, 1e-12));
    const auto avg = (b.pc - b.rc) / nc.clamp_min(1) - (b.pr - b.rr) / nr.clamp_min(1);
    EXPECT_TRUE(AllClose(per_token.losses, (avg - 5.0).square(), 1e-12, 1e-12));
    // TRL ≤ 0.28 / LLaMA-Factory: averaged log-probs in, so rewards are β·(averaged ρ).
    const auto classic = F::dpo_loss(PairInputs()
                                         .policy_chosen_logps(b.pc / nc.clamp_min(1))
                                         .policy_rejected_logps(b.pr / nr.clamp_min(1))
                                         .reference_chosen_logps(b.rc / nc.clamp_min(1))
                                         .reference_rejected_logps(b.rr / nr.clamp_min(1)),
                                     DPOLossOptions()
                                         .loss_type(DPOLossType::kIPO)
                                         .ipo_normalization(prefopt::IPONormalization::kNone));
    EXPECT_TRUE(AllClose(classic.losses, per_token.losses, 1e-12, 1e-12));
    EXPECT_TRUE(AllClose(classic.chosen_rewards, 0.1 * (b.pc - b.rc) / nc.clamp_min(1), 1e-12, 0));
  }
  // f-divergence α: TRL ≤ 0.28's coefficient a, Δ = (e^{−aρ_r} − e^{−aρ_c})/a, is α = 1 − a.
  for (double a : {1.0, 0.3}) {
    const auto r = F::dpo_loss(in, DPOLossOptions()
                                       .f_divergence_type(FDivergence::kAlphaDivergence)
                                       .f_alpha_divergence_coef(1 - a));
    const auto delta = (at::exp(-a * (b.pr - b.rr)) - at::exp(-a * (b.pc - b.rc))) / a;
    EXPECT_TRUE(AllClose(r.losses, -prefopt_ref::logsig(0.1 * delta), 1e-10, 1e-12));
  }
  // js_divergence: TRL ≤ 0.28's Δ − (softplus(ρ_c) − softplus(ρ_r)).
  {
    const auto r = F::dpo_loss(in, DPOLossOptions().f_divergence_type(FDivergence::kJSDivergence));
    const auto rc_ = b.pc - b.rc, rr_ = b.pr - b.rr;
    const auto delta = (rc_ - rr_) - (at::softplus(rc_) - at::softplus(rr_));
    EXPECT_TRUE(AllClose(r.losses, -prefopt_ref::logsig(0.1 * delta), 1e-10, 1e-12));
  }
  // Multi-loss rewards: β·ρ (TRL ≥ 0.29) vs Σ_k w_k·β·ρ over every type, sft's weight
  // included (TRL ≤ 0.28).
  {
    auto o = DPOLossOptions()
                 .loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair, DPOLossType::kSFT})
                 .loss_weights({0.8, 0.2, 1.0});
    const auto plain = F::dpo_loss(in, o);
    const auto weighted = F::dpo_loss(in, o.weighted_rewards(true));
    EXPECT_TRUE(AllClose(plain.chosen_rewards, 0.1 * (b.pc - b.rc), 1e-12, 0));
    EXPECT_TRUE(
        AllClose(weighted.chosen_rewards, (0.8 + 0.2 + 1.0) * 0.1 * (b.pc - b.rc), 1e-12, 0));
  }
  // NLL term: token mean (TRL sft) vs per-sequence mean (LLaMA-Factory pref_ftx, OpenRLHF).
  {
    const auto tok = F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kSFT));
    const auto seq =
        F::dpo_loss(in, DPOLossOptions()
                            .loss_type(DPOLossType::kSFT)
                            .nll_normalization(prefopt::NLLNormalization::kSequenceMean));
    EXPECT_TRUE(AllClose(tok.loss, -b.pc.sum() / nc.sum(), 1e-12, 0));
    EXPECT_TRUE(AllClose(seq.loss, (-b.pc / nc.clamp_min(1)).mean(), 1e-12, 0));
    // RPO (TRL ≤ 0.28): rpo_alpha·NLL added, the same as sft with that weight.
    const auto rpo = F::dpo_loss(in, DPOLossOptions().rpo_alpha(0.5));
    const auto mpo = F::dpo_loss(in, DPOLossOptions()
                                         .loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                                         .loss_weights({1.0, 0.5}));
    EXPECT_TRUE(AllClose(rpo.losses, mpo.losses, 1e-14, 0));
    EXPECT_TRUE(AllClose(rpo.nll_loss, tok.loss, 1e-14, 0));
    // An explicit NLL (e.g. plain CE when the log-probs are LD-weighted) wins.
    const auto given = F::dpo_loss(PairInputs(in).nll_loss(at::tensor(3.25, at::kDouble)),
                                   DPOLossOptions().loss_type(DPOLossType::kSFT));
    EXPECT_DOUBLE_EQ(given.loss.item<double>(), 3.25);
  }
  // WPO: per-pair weights multiply the combined loss; TRL ≤ 0.28 clamps them at 1 (done by
  // wpo_pair_weights(clamp_max_one)).
  {
    const auto w = at::rand({7}, at::kDouble) * 2;
    const auto r = F::dpo_loss(PairInputs(in).weights(w), torch::kNone);
    const auto plain = F::dpo_loss(in, torch::kNone);
    EXPECT_TRUE(AllClose(r.losses, plain.losses * w, 1e-14, 0));
  }
  // Reference-free (TRL ≤ 0.28's reference_free, CPO-like): ref = 0.
  {
    const auto r = F::dpo_loss(PairInputs().policy_chosen_logps(b.pc).policy_rejected_logps(b.pr),
                               DPOLossOptions().reference_free(true));
    EXPECT_TRUE(AllClose(r.losses, -prefopt_ref::logsig(0.1 * (b.pc - b.pr)), 1e-12, 1e-14));
    EXPECT_TRUE(AllClose(r.chosen_rewards, 0.1 * b.pc, 1e-14, 0));
    // With a reference given, TRL still logs β·(π − ref) and only the loss drops it.
    const auto with_ref = F::dpo_loss(in, DPOLossOptions().reference_free(true));
    EXPECT_TRUE(AllClose(with_ref.losses, r.losses, 1e-14, 0));
    EXPECT_TRUE(AllClose(with_ref.chosen_rewards, 0.1 * (b.pc - b.rc), 1e-14, 0));
    EXPECT_TRUE(AllClose(with_ref.rejected_rewards, 0.1 * (b.pr - b.rr), 1e-14, 0));
  }
}

// bco_pair's running-mean baseline (TRL ≤ 0.28, LLaMA-Factory): δ is the running mean of the
// per-step means of all β·ρ; the first step's δ is that step's mean.
TEST_F(DPOLossTest, BCORunningMeanBaseline) {
  const prefopt::DPOLoss bco(
      DPOLossOptions().loss_type(DPOLossType::kBCOPair).bco_running_mean(true));
  Batch s1(6), s2(4);
  prefopt_ref::DPORef ref;
  ref.type = "bco_pair";
  const auto none = at::Tensor();
  const double m1 = at::cat({0.1 * (s1.pc - s1.rc), 0.1 * (s1.pr - s1.rr)}).mean().item<double>();
  const auto r1 = bco(s1.inputs());
  EXPECT_TRUE(AllClose(r1.losses,
                       prefopt_ref::dpo_losses(ref, s1.pc, s1.pr, s1.rc, s1.rr, none, none, m1),
                       1e-10, 1e-12));
  const double m2 = at::cat({0.1 * (s2.pc - s2.rc), 0.1 * (s2.pr - s2.rr)}).mean().item<double>();
  const auto r2 = bco(s2.inputs());
  const double delta2 = (m1 + m2) / 2;  // count 1e-24 + 1 + 1
  EXPECT_NEAR(bco.bco_baseline().mean(), delta2, 1e-12);
  EXPECT_TRUE(AllClose(r2.losses,
                       prefopt_ref::dpo_losses(ref, s2.pc, s2.pr, s2.rc, s2.rr, none, none, delta2),
                       1e-10, 1e-12));
  // Without the option: TRL ≥ 0.29 and Liger, no baseline.
  const auto plain = F::dpo_loss(s2.inputs(), DPOLossOptions().loss_type(DPOLossType::kBCOPair));
  EXPECT_TRUE(AllClose(plain.losses,
                       prefopt_ref::dpo_losses(ref, s2.pc, s2.pr, s2.rc, s2.rr, none, none, 0.0),
                       1e-10, 1e-12));
  // Cross-rank statistics fold in like TRL's get_global_statistics.
  prefopt::BCOBaseline b;
  b.update(1.0, 0.25, 2.0);
  EXPECT_NEAR(b.mean(), 1.0, 1e-12);
  b.update(3.0, 0.0, 2.0);
  EXPECT_NEAR(b.mean(), 2.0, 1e-12);
  // Pooled variance: (2·(0.25 + (1 − 2)²) + 2·(0 + (3 − 2)²)) / 4.
  EXPECT_NEAR(b.var(), (2 * (0.25 + 1.0) + 2 * (0.0 + 1.0)) / 4, 1e-12);
}

TEST_F(DPOLossTest, MultiLossWeights) {
  Batch b(6);
  const auto in = b.inputs();
  const auto o = DPOLossOptions()
                     .loss_type({DPOLossType::kSigmoid, DPOLossType::kBCOPair, DPOLossType::kSFT})
                     .loss_weights({0.8, 0.2, 1.0});
  const auto r = F::dpo_loss(in, o);
  const auto s = F::dpo_loss(in, DPOLossOptions()).loss;
  const auto c = F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kBCOPair)).loss;
  const auto nll = -b.pc.sum() / b.nc.to(at::kDouble).sum();
  EXPECT_TRUE(AllClose(r.loss, 0.8 * s + 0.2 * c + nll, 1e-12, 0));
  EXPECT_TRUE(AllClose(r.nll_loss, nll, 1e-12, 0));
}

// |β·Δ| up to 1e4 (and log-ratios of ±1e5): every loss and gradient finite.
TEST_F(DPOLossTest, ExtremeMarginsStayFinite) {
  for (double scale : {-1e5, -1e4, 1e4, 1e5}) {
    for (auto dt : {at::kDouble, at::kFloat}) {
      const auto pc = at::tensor({scale / 2, 0.0, scale}, dt).requires_grad_();
      const auto pr = at::tensor({-scale / 2, -scale, 0.0}, dt).requires_grad_();
      const auto zr = at::zeros({3}, dt);
      const auto n = at::tensor({3, 0, 5});
      for (const auto& name : kAllTypes) {
        auto o = DPOLossOptions().loss_type(prefopt::dpo_loss_type_from_name(name));
        if (name == "exo_pair" || name == "robust") o.label_smoothing(0.1);
        const auto r = F::dpo_loss(PairInputs()
                                       .policy_chosen_logps(pc)
                                       .policy_rejected_logps(pr)
                                       .reference_chosen_logps(zr)
                                       .reference_rejected_logps(zr)
                                       .chosen_lengths(n)
                                       .rejected_lengths(n),
                                   o);
        const auto g = torch::autograd::grad({r.loss}, {pc, pr});
        EXPECT_TRUE(at::isfinite(r.losses).all().item<bool>()) << name << " scale " << scale;
        EXPECT_TRUE(at::isfinite(g[0]).all().item<bool>() && at::isfinite(g[1]).all().item<bool>())
            << name << " scale " << scale << " " << dt;
      }
    }
  }
  // discopop's guarded form against the exact value where the naive one is still finite.
  prefopt_ref::DPORef ref;
  ref.type = "discopop";
  const auto pc = at::tensor({-500.0, -80.0, 3.0, 400.0}, at::kDouble),
             z = at::zeros({4}, at::kDouble);
  const auto r = F::dpo_loss(pc, z, z, z, DPOLossOptions().loss_type(DPOLossType::kDiscoPOP));
  EXPECT_TRUE(AllClose(r.losses, prefopt_ref::dpo_losses(ref, pc, z, z, z, z, z), 1e-12, 1e-300));
}

TEST_F(DPOLossTest, LowPrecisionInputsComputeInFloat32) {
  Batch b64(33);
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const auto pc = b64.pc.detach().to(dt), pr = b64.pr.detach().to(dt);
    const auto rc = b64.rc.to(dt), rr = b64.rr.to(dt);
    for (const char* t : {"sigmoid", "ipo", "discopop", "exo_pair"}) {
      auto o = DPOLossOptions().loss_type(prefopt::dpo_loss_type_from_name(t));
      if (std::string(t) == "exo_pair") o.label_smoothing(0.1);
      const auto in = PairInputs()
                          .policy_chosen_logps(pc)
                          .policy_rejected_logps(pr)
                          .reference_chosen_logps(rc)
                          .reference_rejected_logps(rr)
                          .chosen_lengths(b64.nc)
                          .rejected_lengths(b64.nr);
      const auto r = F::dpo_loss(in, o);
      EXPECT_EQ(r.losses.scalar_type(), at::kFloat) << t;
      EXPECT_EQ(r.chosen_rewards.scalar_type(), at::kFloat);
      // Same rounded inputs in fp64: only the fp32 arithmetic differs.
      const auto ref = prefopt_ref::dpo_losses(ref_of(o), pc.to(at::kDouble), pr.to(at::kDouble),
                                               rc.to(at::kDouble), rr.to(at::kDouble),
                                               b64.nc.to(at::kDouble), b64.nr.to(at::kDouble));
      EXPECT_TRUE(AllClose(r.losses, ref, 1e-5, 1e-5)) << t << " " << dt;
    }
  }
}

TEST_F(DPOLossTest, ZeroLengthCompletionsNeverNaN) {
  const auto z = at::zeros({2}, at::kDouble);
  const auto n0 = at::zeros({2}, at::kLong);
  const auto in = PairInputs()
                      .policy_chosen_logps(z)
                      .policy_rejected_logps(z)
                      .reference_chosen_logps(z)
                      .reference_rejected_logps(z)
                      .chosen_lengths(n0)
                      .rejected_lengths(n0);
  for (auto t : {DPOLossType::kIPO, DPOLossType::kSigmoidNorm, DPOLossType::kSFT}) {
    const auto r = F::dpo_loss(in, DPOLossOptions().loss_type(t));
    EXPECT_TRUE(at::isfinite(r.losses).all().item<bool>()) << prefopt::dpo_loss_type_name(t);
  }
  EXPECT_DOUBLE_EQ(
      F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kSFT)).loss.item<double>(), 0.0);
}

// The token-mean NLL sums the counts in the loss's dtype: fp16 counts overflowed past 65504
// tokens (an NLL of 0) and fp64 counts turned an fp32 loss into fp64.
TEST_F(DPOLossTest, TokenMeanNllSumsCountsInTheLossDtype) {
  const auto pc = at::tensor({-40000.0f, -80000.0f});
  const auto z = at::zeros({2});
  const auto in = PairInputs()
                      .policy_chosen_logps(pc)
                      .policy_rejected_logps(z)
                      .reference_chosen_logps(z)
                      .reference_rejected_logps(z)
                      .logps_form(prefopt::LogpsForm::kSum);
  const auto sft = DPOLossOptions().loss_type(DPOLossType::kSFT);
  for (auto ct : {at::kHalf, at::kBFloat16, at::kDouble, at::kLong}) {
    const auto n = at::tensor({40000.0, 40000.0}, at::kDouble).to(ct);
    const double nll = 120000.0 / n.to(at::kDouble).sum().item<double>();  // bf16 rounds n
    const auto r = F::dpo_loss(PairInputs(in).chosen_lengths(n), sft);
    EXPECT_EQ(r.loss.scalar_type(), at::kFloat) << ct;
    EXPECT_NEAR(r.loss.item<double>(), nll, 1e-6) << ct;
    const auto cpo = F::cpo_loss(PairInputs(in).chosen_lengths(n));
    EXPECT_EQ(cpo.loss.scalar_type(), at::kFloat) << ct;
    EXPECT_NEAR(cpo.nll_loss.item<double>(), nll, 1e-6) << ct;
  }
}

TEST_F(DPOLossTest, NamesRoundTrip) {
  for (const auto& name : kAllTypes)
    EXPECT_EQ(prefopt::dpo_loss_type_name(prefopt::dpo_loss_type_from_name(name)), name);
  EXPECT_STREQ(prefopt::dpo_loss_type_name(prefopt::dpo_loss_type_from_name("sft")), "sft");
  for (const char* f : {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"})
    EXPECT_STREQ(prefopt::f_divergence_name(prefopt::f_divergence_from_name(f)), f);
}

TEST_F(DPOLossTest, Errors) {
  Batch b(4);
  const auto in = b.inputs();
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, DPOLossOptions().beta(0)),
                             "prefopt::dpo_loss: expected beta > 0, got 0");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, DPOLossOptions().beta(-1)), "expected beta > 0");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, DPOLossOptions().label_smoothing(0.5)),
                             "prefopt::dpo_loss: expected label_smoothing in [0, 0.5), got 0.5");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, DPOLossOptions().label_smoothing(-0.1)),
                             "expected label_smoothing in [0, 0.5)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kHinge).label_smoothing(0.1)),
      "label_smoothing = 0.1 is not used by any of the loss types");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kExoPair)),
                             "exo_pair needs label_smoothing in (0, 0.5), got 0");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kDiscoPOP).discopop_tau(0)),
      "expected discopop_tau > 0, got 0");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions()
                          .loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                          .loss_weights({1.0})),
      "expected one loss_weight per loss_type (2), got 1");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().loss_type(std::vector<DPOLossType>{})),
      "expected at least one loss_type, got none");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::dpo_loss_type_from_name("kto_pair"),
                             "unknown DPO loss type 'kto_pair'; expected one of sigmoid, hinge");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::f_divergence_from_name("kl"),
                             "unknown f_divergence_type 'kl'");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.pc, b.pr.narrow(0, 0, 3), b.rc, b.rr),
                             "prefopt::dpo_loss: expected policy_rejected_logps of shape [4] like "
                             "policy_chosen_logps, got [3]");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.pc, b.pr, b.rc.reshape({2, 2}), b.rr),
                             "expected reference_chosen_logps of shape [B] (1-D), got [2, 2]");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(b.pc, b.pr, at::Tensor(), b.rr),
      "expected reference_chosen_logps to be a defined tensor, got undefined");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.pc, b.pr, b.rc.to(at::kLong), b.rr),
                             "expected reference_chosen_logps to be floating point");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.pc, b.pr, b.rc.to(at::kMeta), b.rr),
                             "expected reference_chosen_logps on cpu like policy_chosen_logps, "
                             "got meta");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in).chosen_lengths(at::Tensor()),
                  DPOLossOptions().loss_type(DPOLossType::kIPO)),
      "prefopt::dpo_loss: ipo normalises by completion length and needs chosen_lengths");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).chosen_lengths(at::Tensor()),
                                         DPOLossOptions().loss_type(DPOLossType::kSFT)),
                             "the token-mean NLL needs chosen_lengths");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).weights(at::ones({4}, at::kDouble)),
                                         DPOLossOptions().loss_type(DPOLossType::kAOT)),
                             "aot and aot_unpaired sort the batch");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).nll_loss(at::ones({2})), DPOLossOptions()),
                             "expected nll_loss to be a scalar, got shape [2]");
  // #20 item 16: complex (or bool, or integer) weights, counts and NLL were cast silently.
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).weights(at::ones({4}, at::kComplexDouble))),
                             "prefopt::dpo_loss: expected weights to be floating point "
                             "(fp64/fp32/bf16/fp16), got ComplexDouble");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).weights(at::ones({4}, at::kLong))),
                             "prefopt::dpo_loss: expected weights to be floating point");
  // NaN or negative WPO weights gave a NaN or sign-flipped loss without a word.
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in).weights(at::tensor({1.0, NAN, 0.5, 1.0}, at::kDouble))),
      "prefopt::dpo_loss: expected weights to be finite and >= 0, got nan at index 1");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in).weights(at::tensor({1.0, 0.5, 0.5, -2.0}, at::kDouble))),
      "prefopt::dpo_loss: expected weights to be finite and >= 0, got -2 at index 3");
  EXPECT_NO_THROW(F::dpo_loss(PairInputs(in).weights(at::zeros({4}, at::kDouble))));
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in).chosen_lengths(at::ones({4}, at::kComplexFloat)),
                  DPOLossOptions().loss_type(DPOLossType::kIPO)),
      "prefopt::dpo_loss: expected chosen_lengths to be token counts (an integer or floating "
      "dtype), got ComplexFloat");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in).rejected_lengths(at::ones({4}, at::kBool)),
                  DPOLossOptions().loss_type(DPOLossType::kIPO)),
      "prefopt::dpo_loss: expected rejected_lengths to be token counts (an integer or floating "
      "dtype), got Bool");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(in).nll_loss(at::ones({}, at::kComplexDouble)),
                                         DPOLossOptions().rpo_alpha(1.0)),
                             "prefopt::dpo_loss: expected nll_loss to be floating point");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(in, at::ones({2}), DPOLossOptions()),
                             "expected bco_delta to be a scalar");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::BCOBaseline().update(1.0, -1.0, 1.0),
                             "prefopt::BCOBaseline::update: expected a finite mean, a finite var "
                             ">= 0 and a finite count > 0, got mean 1, var -1, count 1");
  // An infinite count made the mean NaN; load() took any state.
  PREFOPT_EXPECT_THROWS_WITH(prefopt::BCOBaseline().update(1.0, 0.0, INFINITY),
                             "prefopt::BCOBaseline::update: expected a finite mean");
  prefopt::BCOBaseline loaded;
  PREFOPT_EXPECT_THROWS_WITH(loaded.load(NAN, -1.0, -5.0),
                             "prefopt::BCOBaseline::load: expected a finite mean, a finite var >= "
                             "0 and a finite count > 0, got mean nan, var -1, count -5");
  EXPECT_EQ(loaded.count(), 1e-24);  // unchanged
  loaded.load(0.5, 0.25, 3.0);
  EXPECT_EQ(loaded.mean(), 0.5);
}

// ------------------------------------------------------------------ TRL 1.x (issue #16)

// The four repros of issue #16 and its conventions, each against values computed by hand in
// double from the formulas (ℓ = log σ).
namespace {
double logsig(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
at::Tensor t1(double x) { return at::tensor({x}, at::kDouble); }
}  // namespace

TEST_F(DPOLossTest, ReferenceLogpsGetNoGradient) {
  // A reference computed with autograd on (no NoGradGuard): a graph hangs off it.
  const auto leaf_c = at::tensor({-3.0, -1.0}, at::kDouble).requires_grad_();
  const auto leaf_r = at::tensor({-2.0, -4.0}, at::kDouble).requires_grad_();
  const auto rc = leaf_c * 1.0, rr = leaf_r * 1.0;
  ASSERT_TRUE(rc.requires_grad());
  for (const auto& name : kAllTypes) {
    auto o = DPOLossOptions().loss_type(prefopt::dpo_loss_type_from_name(name));
    if (name == "exo_pair" || name == "robust") o.label_smoothing(0.1);
    const auto pc = at::tensor({-1.0, -2.0}, at::kDouble).requires_grad_();
    const auto pr = at::tensor({-2.5, -1.5}, at::kDouble).requires_grad_();
    const auto r = F::dpo_loss(PairInputs()
                                   .policy_chosen_logps(pc)
                                   .policy_rejected_logps(pr)
                                   .reference_chosen_logps(rc)
                                   .reference_rejected_logps(rr)
                                   .chosen_lengths(at::tensor({2, 3}))
                                   .rejected_lengths(at::tensor({4, 1}))
                                   .logps_form(prefopt::LogpsForm::kSum),
                               o);
    // The loss's graph does not reach the reference's leaves at all.
    const auto g = torch::autograd::grad({r.loss}, {pc, leaf_c, leaf_r}, {}, false, false,
                                         /*allow_unused=*/true);
    EXPECT_TRUE(g[0].defined()) << name;
    EXPECT_FALSE(g[1].defined()) << name;
    EXPECT_FALSE(g[2].defined()) << name;
  }
}

// Repro 3: weighted_rewards counts sft's weight: (1 + 0.5)·β·ρ = 1.5·0.5 = 0.75.
TEST_F(DPOLossTest, WeightedRewardsCountSftWeight) {
  const auto in = PairInputs()
                      .policy_chosen_logps(t1(-1.0))
                      .policy_rejected_logps(t1(-2.0))
                      .reference_chosen_logps(t1(-1.5))
                      .reference_rejected_logps(t1(-1.5))
                      .nll_loss(at::scalar_tensor(1.0, at::kDouble))
                      .logps_form(prefopt::LogpsForm::kSum);
  const auto r = F::dpo_loss(in, DPOLossOptions()
                                     .beta(1.0)
                                     .loss_type({DPOLossType::kSigmoid, DPOLossType::kSFT})
                                     .loss_weights({1.0, 0.5})
                                     .weighted_rewards(true));
  EXPECT_NEAR(r.chosen_rewards.item<double>(), 0.75, 1e-15);
  EXPECT_NEAR(r.rejected_rewards.item<double>(), -0.75, 1e-15);
  // loss = −ℓ(1·(0.5 − (−0.5))) + 0.5·1.
  EXPECT_NEAR(r.loss.item<double>(), -logsig(1.0) + 0.5, 1e-15);
}

// Repro 4: reference_free logs β·(π − ref) when a reference is given: 2.0 and −1.0.
TEST_F(DPOLossTest, ReferenceFreeLogsRewardsWithTheReference) {
  prefopt::detail::WarningCapture warnings;
  const auto r = F::dpo_loss(t1(-1.0), t1(-2.0), t1(-3.0), t1(-1.0),
                             DPOLossOptions().beta(1.0).reference_free(true));
  EXPECT_NEAR(r.chosen_rewards.item<double>(), 2.0, 1e-15);
  EXPECT_NEAR(r.rejected_rewards.item<double>(), -1.0, 1e-15);
  EXPECT_NEAR(r.loss.item<double>(), -logsig(-1.0 - (-2.0)), 1e-15);  // reference left out
  EXPECT_TRUE(warnings.contains("reference_free(true) leaves the reference log-probs out"));
}

// Item 7: one ε serves a mixed list as in TRL ≥ 0.29: sigmoid ignores it, robust takes it.
TEST_F(DPOLossTest, LabelSmoothingInAMixedListFollowsTrl) {
  const double beta = 0.1, eps = 0.1;
  const double pc = -3.0, pr = -9.0, rc = -4.0, rr = -5.0;  // Δ = 1 − (−4) = 5, z = 0.5
  const double z = beta * ((pc - rc) - (pr - rr));
  const double sigmoid = -logsig(z);
  const double robust = (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps);
  const double cdpo = -(1 - eps) * logsig(z) - eps * logsig(-z);
  const auto mixed = DPOLossOptions().beta(beta).label_smoothing(eps).loss_type(
      {DPOLossType::kSigmoid, DPOLossType::kRobust});
  EXPECT_NEAR(F::dpo_loss(t1(pc), t1(pr), t1(rc), t1(rr), mixed).loss.item<double>(),
              sigmoid + robust, 1e-14);
  // Conservative DPO is its own choice: cdpo(true) smooths sigmoid too (TRL ≤ 0.28).
  auto with_cdpo = mixed;
  with_cdpo.cdpo(true);
  EXPECT_NEAR(F::dpo_loss(t1(pc), t1(pr), t1(rc), t1(rr), with_cdpo).loss.item<double>(),
              cdpo + robust, 1e-14);
  // A single sigmoid with ε and no cdpo would silently ignore ε in TRL: here it is an error
  // that names the migration.
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(t1(pc), t1(pr), t1(rc), t1(rr), DPOLossOptions().label_smoothing(eps)),
      "sigmoid and sigmoid_norm only with cdpo(true)");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(t1(pc), t1(pr), t1(rc), t1(rr),
                  DPOLossOptions().loss_type(DPOLossType::kRobust).label_smoothing(eps).cdpo(true)),
      "cdpo(true) smooths sigmoid and sigmoid_norm, and neither is among the loss types");
  // sigmoid_norm under cdpo: −(1−ε)ℓ(β(ρ_c/n_c − ρ_r/n_r)) − εℓ(−…).
  const auto in = PairInputs()
                      .policy_chosen_logps(t1(pc))
                      .policy_rejected_logps(t1(pr))
                      .reference_chosen_logps(t1(rc))
                      .reference_rejected_logps(t1(rr))
                      .chosen_lengths(at::tensor({2}))
                      .rejected_lengths(at::tensor({4}))
                      .logps_form(prefopt::LogpsForm::kSum);
  const double zn = beta * ((pc - rc) / 2 - (pr - rr) / 4);
  EXPECT_NEAR(F::dpo_loss(in, DPOLossOptions()
                                  .loss_type(DPOLossType::kSigmoidNorm)
                                  .beta(beta)
                                  .label_smoothing(eps)
                                  .cdpo(true))
                  .loss.item<double>(),
              -(1 - eps) * logsig(zn) - eps * logsig(-zn), 1e-14);
  EXPECT_NEAR(F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kSigmoidNorm).beta(beta))
                  .loss.item<double>(),
              -logsig(zn), 1e-14);
}

// The inputs say what they hold: DPO converts per-token means with the lengths, refuses them
// without, and warns when the form is not said.
TEST_F(DPOLossTest, SumsAndMeansAreConvertedOrRefused) {
  Batch b(6);
  const auto nc = b.nc.to(at::kDouble).clamp_min(1), nr = b.nr.to(at::kDouble);
  // Means of a zero-length completion are 0, like SequenceLogprobs::mean; its sum is 0 too.
  const auto zero = b.nc.eq(0);
  const auto pc = b.pc.detach().masked_fill(zero, 0), rc = b.rc.masked_fill(zero, 0);
  const auto sums = PairInputs()
                        .policy_chosen_logps(pc)
                        .policy_rejected_logps(b.pr)
                        .reference_chosen_logps(rc)
                        .reference_rejected_logps(b.rr)
                        .chosen_lengths(b.nc)
                        .rejected_lengths(b.nr)
                        .logps_form(prefopt::LogpsForm::kSum);
  const auto means = PairInputs(sums)
                         .policy_chosen_logps(pc / nc)
                         .policy_rejected_logps(b.pr / nr)
                         .reference_chosen_logps(rc / nc)
                         .reference_rejected_logps(b.rr / nr)
                         .logps_form(prefopt::LogpsForm::kMean);
  const auto a = F::dpo_loss(sums), m = F::dpo_loss(means);
  EXPECT_TRUE(AllClose(m.losses, a.losses, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(m.chosen_rewards, a.chosen_rewards, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(m.chosen_logps, pc, 1e-12, 1e-14));  // logps/*: the sums consumed
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(PairInputs(means).chosen_lengths(at::Tensor())),
                             "prefopt::dpo_loss: dpo_loss consumes sums of the log-probs; got "
                             "per-token means without chosen_lengths to convert them");
  prefopt::detail::WarningCapture warnings;
  F::dpo_loss(PairInputs(sums).logps_form(prefopt::LogpsForm::kUnspecified));
  EXPECT_TRUE(
      warnings.contains("PairInputs does not say whether its log-probs are sums or "
                        "per-token means; taking them as sums"));
}

// The functor is const-callable; a call that throws leaves the bco baseline as it was.
TEST_F(DPOLossTest, FunctorIsConstAndItsBaselineSurvivesErrors) {
  const prefopt::DPOLoss plain;
  Batch b(3);
  EXPECT_TRUE(AllClose(plain(b.inputs()).loss, F::dpo_loss(b.inputs()).loss, 0, 0));
  PREFOPT_EXPECT_THROWS_WITH(plain.bco_baseline(), "this loss keeps no baseline");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::DPOLoss(DPOLossOptions().bco_running_mean(true)),
                             "bco_running_mean(true) keeps bco_pair's baseline, and bco_pair is "
                             "not among the loss types");
  // The functional forms: what nothing would read is an error, as is a NaN baseline.
  const auto bco_only = DPOLossOptions().loss_type(DPOLossType::kBCOPair);
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(b.inputs(), DPOLossOptions(bco_only).bco_running_mean(true)),
      "prefopt::dpo_loss: bco_running_mean(true) needs the running "
      "baseline that the DPOLoss functor keeps");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.inputs(), at::scalar_tensor(0.5), DPOLossOptions()),
                             "prefopt::dpo_loss: bco_delta is read by bco_pair only, and bco_pair "
                             "is not among the loss types");
  PREFOPT_EXPECT_THROWS_WITH(F::dpo_loss(b.inputs(), at::scalar_tensor(NAN), bco_only),
                             "prefopt::dpo_loss: expected a finite bco_delta, got nan");
  EXPECT_TRUE(AllClose(F::dpo_loss(b.inputs(), at::Tensor(), DPOLossOptions()).loss,
                       F::dpo_loss(b.inputs()).loss, 0, 0));  // no δ: any type
  const prefopt::DPOLoss bco(
      DPOLossOptions().loss_type(DPOLossType::kBCOPair).bco_running_mean(true));
  bco(b.inputs());
  const double mean = bco.bco_baseline().mean(), count = bco.bco_baseline().count();
  // Invalid options and inputs: the step throws before it touches the baseline.
  const prefopt::DPOLoss bad(
      DPOLossOptions().loss_type(DPOLossType::kBCOPair).bco_running_mean(true).beta(0));
  PREFOPT_EXPECT_THROWS_WITH(bad(b.inputs()), "expected beta > 0, got 0");
  EXPECT_EQ(bad.bco_baseline().count(), 1e-24);
  const prefopt::DPOLoss& same = bco;
  PREFOPT_EXPECT_THROWS_WITH(same(PairInputs(b.inputs()).chosen_lengths(at::ones({2}))),
                             "expected chosen_lengths of shape [3]");
  const prefopt::DPOLoss list(DPOLossOptions()
                                  .loss_type({DPOLossType::kBCOPair, DPOLossType::kIPO})
                                  .bco_running_mean(true));
  PREFOPT_EXPECT_THROWS_WITH(list(PairInputs(b.inputs()).chosen_lengths(at::Tensor())),
                             "ipo normalises by completion length");
  EXPECT_EQ(list.bco_baseline().count(), 1e-24);
  EXPECT_EQ(bco.bco_baseline().mean(), mean);
  EXPECT_EQ(bco.bco_baseline().count(), count);
}

// Issue #20: negative token counts were taken as given (sft with lengths [10, 10, -19] gave an
// NLL of 30); every loss that reads lengths refuses them, naming itself.
TEST_F(DPOLossTest, NegativeLengthsAreRefused) {
  const auto d = at::TensorOptions().dtype(at::kDouble);
  const auto pc = at::full({3}, -10.0, d), pr = at::full({3}, -12.0, d);
  const auto in = PairInputs()
                      .policy_chosen_logps(pc)
                      .policy_rejected_logps(pr)
                      .reference_chosen_logps(pc)
                      .reference_rejected_logps(pr)
                      .chosen_lengths(at::tensor({10, 10, -19}, at::kLong))
                      .rejected_lengths(at::tensor({10, 10, 1}, at::kLong))
                      .logps_form(prefopt::LogpsForm::kSum);
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(in, DPOLossOptions().loss_type(DPOLossType::kSFT)),
      "prefopt::dpo_loss: expected chosen_lengths to be token counts >= 0, got -19 at index 2");
  PREFOPT_EXPECT_THROWS_WITH(
      F::dpo_loss(PairInputs(in)
                      .chosen_lengths(at::tensor({1, 2, 3}, at::kLong))
                      .rejected_lengths(at::tensor({1.0, NAN, 3.0}, d))),
      "prefopt::dpo_loss: expected rejected_lengths to be token counts >= 0, got nan at index 1");
  PREFOPT_EXPECT_THROWS_WITH(F::cpo_loss(in), "prefopt::cpo_loss: expected chosen_lengths");
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(in), "prefopt::orpo_loss: expected chosen_lengths");
  prefopt::SequenceLogprobs gold;
  gold.sum = at::full({2}, -3.0, d);
  gold.count = at::tensor({4, -1}, at::kLong);
  PREFOPT_EXPECT_THROWS_WITH(
      F::tpo_loss(PairInputs(in).chosen_lengths(at::Tensor()), gold),
      "prefopt::tpo_loss: expected gold.count to be token counts >= 0, got -1 at index 1");
  // Zero is a count (an empty completion).
  EXPECT_NO_THROW(F::dpo_loss(PairInputs(in).chosen_lengths(at::zeros({3}, at::kLong)),
                              DPOLossOptions().loss_type(DPOLossType::kSFT)));
}

struct DPOLossCuda : prefopt_test::CudaTest {};

TEST_F(DPOLossCuda, MatchesCpu) {
  Batch b(64, at::kFloat);
  for (const auto& name : kAllTypes) {
    auto o = DPOLossOptions().loss_type(prefopt::dpo_loss_type_from_name(name));
    if (name == "exo_pair" || name == "robust") o.label_smoothing(0.1);
    const auto cpu = F::dpo_loss(b.inputs(), o);
    const auto pc = b.pc.detach().cuda().requires_grad_();
    const auto cuda = F::dpo_loss(PairInputs()
                                      .policy_chosen_logps(pc)
                                      .policy_rejected_logps(b.pr.detach().cuda())
                                      .reference_chosen_logps(b.rc.cuda())
                                      .reference_rejected_logps(b.rr.cuda())
                                      .chosen_lengths(b.nc.cuda())
                                      .rejected_lengths(b.nr.cuda()),
                                  o);
    EXPECT_TRUE(cuda.loss.is_cuda());
    EXPECT_TRUE(AllClose(cuda.losses.cpu(), cpu.losses, 1e-5, 1e-6)) << name;
    const auto g = torch::autograd::grad({cuda.loss}, {pc})[0];
    const auto gc = torch::autograd::grad({cpu.loss}, {b.pc})[0];
    EXPECT_TRUE(AllClose(g.cpu(), gc, 1e-4, 1e-7)) << name;
  }
}

// WPO weights are constants, as TRL computes them (no_grad) and fused_dpo_loss detaches them:
// no gradient reaches weights that require grad, and the policy's gradient is that of the
// hand-written composite with constant weights.
TEST_F(DPOLossTest, WeightsGetNoGradient) {
  const auto pc = at::tensor({-1.0, -2.0}, at::kDouble).requires_grad_();
  const auto pr = at::tensor({-2.5, -1.5}, at::kDouble).requires_grad_();
  const auto zero = at::zeros({2}, at::kDouble);
  const auto leaf = at::tensor({0.5, 2.0}, at::kDouble).requires_grad_();
  const auto w = leaf * 1.0;  // weights with a graph behind them
  const auto r = F::dpo_loss(PairInputs()
                                 .policy_chosen_logps(pc)
                                 .policy_rejected_logps(pr)
                                 .reference_chosen_logps(zero)
                                 .reference_rejected_logps(zero)
                                 .weights(w)
                                 .logps_form(prefopt::LogpsForm::kSum),
                             DPOLossOptions().beta(1.0));
  const auto g = torch::autograd::grad({r.loss}, {pc, pr, leaf}, {}, false, false,
                                       /*allow_unused=*/true);
  EXPECT_FALSE(g[2].defined());
  // mean_b(w_b·−ℓ(c_b − r_b)) with w constant: ∂/∂c_b = −w_b·σ(r_b − c_b)/2 = −∂/∂r_b.
  const double d0 = -0.5 * 0.5 / (1 + std::exp(1.5)), d1 = -0.5 * 2.0 / (1 + std::exp(-0.5));
  EXPECT_NEAR(g[0][0].item<double>(), d0, 1e-15);
  EXPECT_NEAR(g[0][1].item<double>(), d1, 1e-15);
  EXPECT_NEAR(g[1][0].item<double>(), -d0, 1e-15);
  EXPECT_NEAR(g[1][1].item<double>(), -d1, 1e-15);
}

// One pair of summed log-probs with ρ_c − ρ_r = (−1 + 3) − (−2 + 1) = 3 at β = 1.
static PairInputs one_pair() {
  return PairInputs()
      .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
      .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
      .reference_chosen_logps(at::tensor({-3.0}, at::kDouble))
      .reference_rejected_logps(at::tensor({-1.0}, at::kDouble))
      .logps_form(prefopt::LogpsForm::kSum);
}

// A host's nll_loss that no term reads (no sft type, rpo_alpha 0) is neither in the loss nor in
// the result: a warning says so, and the loss is the plain one.
TEST_F(DPOLossTest, UnreadNllLossWarns) {
  const auto logsig = [](double x) { return -std::log1p(std::exp(-x)); };
  const auto in = one_pair().nll_loss(at::scalar_tensor(5.0, at::kDouble));
  prefopt::detail::WarningCapture warnings;
  const auto r = F::dpo_loss(in, DPOLossOptions().beta(1.0));
  EXPECT_TRUE(warnings.contains("prefopt::dpo_loss: nll_loss is given but no term reads it"));
  EXPECT_FALSE(r.nll_loss.defined());
  EXPECT_NEAR(r.loss.item<double>(), -logsig(3.0), 1e-15);  // ρ_c − ρ_r = 2 + 1
  prefopt::detail::WarningCapture quiet;
  const auto rpo = F::dpo_loss(in, DPOLossOptions().beta(1.0).rpo_alpha(0.5));
  EXPECT_FALSE(quiet.contains("no term reads it"));
  EXPECT_NEAR(rpo.loss.item<double>(), -logsig(3.0) + 0.5 * 5.0, 1e-15);
}

// An option that only some loss types read, set to another value than its default while no
// selected type reads it, warns (the loss is the one without it); the same value with a type
// that reads it, and the default, do not.
TEST_F(DPOLossTest, UnreadOptionsWarn) {
  const auto logsig = [](double x) { return -std::log1p(std::exp(-x)); };
  const auto in = one_pair()
                      .chosen_lengths(at::tensor({1}, at::kLong))
                      .rejected_lengths(at::tensor({1}, at::kLong));
  const double plain = -logsig(3.0);  // sigmoid, β = 1, ρ_c − ρ_r = 2 + 1
  const auto base = DPOLossOptions().beta(1.0);
  // Runs the loss; returns the warnings and the loss.
  const auto run = [](const PairInputs& i, const DPOLossOptions& o, double* loss = nullptr) {
    prefopt::detail::WarningCapture w;
    const auto r = F::dpo_loss(i, o);
    if (loss != nullptr) *loss = r.loss.item<double>();
    return w.messages;
  };
  const auto has = [](const std::vector<std::string>& ms, const std::string& text) {
    for (const auto& m : ms)
      if (m.find(text) != std::string::npos) return true;
    return false;
  };
  const auto sigmoid = DPOLossType::kSigmoid;
  double loss = 0;
  // The defaults: none of these warnings.
  EXPECT_FALSE(has(run(in, base, &loss), "it is ignored"));
  EXPECT_NEAR(loss, plain, 1e-15);

  const std::string tau = "prefopt::dpo_loss: discopop_tau = 0.1 is read by the discopop loss type";
  EXPECT_TRUE(has(run(in, DPOLossOptions(base).discopop_tau(0.1), &loss), tau));
  EXPECT_NEAR(loss, plain, 1e-15);
  EXPECT_FALSE(
      has(run(in, DPOLossOptions(base).loss_type(DPOLossType::kDiscoPOP).discopop_tau(0.1)),
          "discopop_tau"));

  const std::string coef =
      "prefopt::dpo_loss: f_alpha_divergence_coef = 0.3 is read by f_divergence_type "
      "alpha_divergence only, got reverse_kl";
  EXPECT_TRUE(has(run(in, DPOLossOptions(base).f_alpha_divergence_coef(0.3), &loss), coef));
  EXPECT_NEAR(loss, plain, 1e-15);
  EXPECT_FALSE(has(run(in, DPOLossOptions(base)
                               .f_divergence_type(FDivergence::kAlphaDivergence)
                               .f_alpha_divergence_coef(0.3)),
                   "f_alpha_divergence_coef"));

  const std::string ipo =
      "prefopt::dpo_loss: ipo_normalization = IPONormalization::kNone is read by the ipo loss "
      "type only";
  const auto none = prefopt::IPONormalization::kNone;
  EXPECT_TRUE(has(run(in, DPOLossOptions(base).ipo_normalization(none), &loss), ipo));
  EXPECT_NEAR(loss, plain, 1e-15);
  EXPECT_FALSE(has(
      run(in, DPOLossOptions(base).loss_type({sigmoid, DPOLossType::kIPO}).ipo_normalization(none)),
      "ipo_normalization"));

  // sft takes an f-divergence in a list of types but reads no log-ratio.
  const std::string fdiv =
      "prefopt::dpo_loss: f_divergence_type = forward_kl maps the log-ratios of sigmoid";
  const auto sft = DPOLossOptions(base).loss_type(DPOLossType::kSFT);
  EXPECT_TRUE(
      has(run(in, DPOLossOptions(sft).f_divergence_type(FDivergence::kForwardKL), &loss), fdiv));
  EXPECT_NEAR(loss, 1.0, 1e-15);  // the chosen NLL: −(−1) / 1 token
  EXPECT_FALSE(has(run(in, DPOLossOptions(base).f_divergence_type(FDivergence::kForwardKL)),
                   "f_divergence_type"));
  EXPECT_FALSE(has(run(in, sft), "f_divergence_type"));

  const auto seq = prefopt::NLLNormalization::kSequenceMean;
  const std::string norm =
      "prefopt::dpo_loss: nll_normalization = NLLNormalization::kSequenceMean averages the NLL of "
      "sft and rpo_alpha, and there is none";
  EXPECT_TRUE(has(run(in, DPOLossOptions(base).nll_normalization(seq), &loss), norm));
  EXPECT_NEAR(loss, plain, 1e-15);
  EXPECT_FALSE(has(run(in, DPOLossOptions(base).rpo_alpha(0.5).nll_normalization(seq), &loss),
                   "nll_normalization"));
  EXPECT_NEAR(loss, plain + 0.5 * 1.0, 1e-15);
  // A host's nll_loss is the NLL term: the normalisation is not read.
  const std::string given =
      "prefopt::dpo_loss: nll_normalization = NLLNormalization::kSequenceMean is not read when "
      "nll_loss is given";
  const auto with_nll = PairInputs(in).nll_loss(at::scalar_tensor(5.0, at::kDouble));
  EXPECT_TRUE(
      has(run(with_nll, DPOLossOptions(base).rpo_alpha(0.5).nll_normalization(seq), &loss), given));
  EXPECT_NEAR(loss, plain + 0.5 * 5.0, 1e-15);
  EXPECT_FALSE(has(run(with_nll, DPOLossOptions(base).rpo_alpha(0.5)), "nll_normalization"));
}

// Negative weights are legal (TRL takes them) but maximise their term: a warning each.
TEST_F(DPOLossTest, NegativeWeightsWarn) {
  const auto t = [](double v) { return at::tensor({v}, at::kDouble); };
  prefopt::detail::WarningCapture warnings;
  const auto r = F::dpo_loss(PairInputs()
                                 .policy_chosen_logps(t(-1.0))
                                 .policy_rejected_logps(t(-2.0))
                                 .reference_chosen_logps(t(-3.0))
                                 .reference_rejected_logps(t(-1.0))
                                 .nll_loss(at::scalar_tensor(5.0, at::kDouble))
                                 .logps_form(prefopt::LogpsForm::kSum),
                             DPOLossOptions()
                                 .beta(1.0)
                                 .loss_type({DPOLossType::kSigmoid, DPOLossType::kHinge})
                                 .loss_weights({1.0, -0.5})
                                 .rpo_alpha(-0.25));
  EXPECT_TRUE(warnings.contains("prefopt::dpo_loss: loss_weight -0.5 < 0 maximises its loss term"));
  EXPECT_TRUE(
      warnings.contains("prefopt::dpo_loss: rpo_alpha = -0.25 < 0 maximises the chosen NLL"));
  // Still the loss asked for: −log σ(3) − 0.5·max(0, 1 − 3) − 0.25·5.
  EXPECT_NEAR(r.loss.item<double>(), std::log1p(std::exp(-3.0)) - 1.25, 1e-15);
}
