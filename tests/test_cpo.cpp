// SPDX-License-Identifier: Apache-2.0
// prefopt/losses/cpo.h: CPO, SimPO and AlphaPO against the fp64 reference and torchtune.
#include <prefopt/losses/cpo.h>

#include <cmath>
#include <string>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
using prefopt::CPOLossOptions;
using prefopt::CPOLossType;
using prefopt::PairInputs;
using prefopt_test::AllClose;

struct CPOLossTest : prefopt_test::SeededTest {};

TEST_F(CPOLossTest, EveryTypeMatchesReference) {
  const int64_t B = 11;
  const auto o64 = at::TensorOptions().dtype(at::kDouble);
  const auto n = at::randint(1, 30, {B}, at::kLong);
  for (const char* name : {"sigmoid", "hinge", "ipo", "simpo", "alphapo"}) {
    const std::string t = name;
    const bool averaged = t != "sigmoid" && t != "hinge";
    // Sums around −30, or per-token means around −1.5.
    const double scale = averaged ? 1.5 : 30.0;
    const auto pc = (-scale * (1 + 0.3 * at::rand({B}, o64))).requires_grad_();
    const auto pr = (-scale * (1 + 0.3 * at::rand({B}, o64))).requires_grad_();
    const double alpha = t == "alphapo" ? 0.25 : 0.0;
    const double eps = (t == "hinge" || t == "ipo") ? 0.0 : 0.1;
    const auto o = CPOLossOptions()
                       .loss_type(prefopt::cpo_loss_type_from_name(t))
                       .beta(0.7)
                       .label_smoothing(eps)
                       .alpha(alpha);
    const auto r = F::cpo_loss(PairInputs()
                                   .policy_chosen_logps(pc)
                                   .policy_rejected_logps(pr)
                                   .chosen_lengths(n)
                                   .rejected_lengths(n),
                               o);
    const auto ref = prefopt_ref::cpo_losses(t, 0.7, eps, 0.5, alpha, pc, pr);
    // TRL: mean(losses) + cpo_alpha·NLL, NLL the token-mean CE of the chosen completions.
    const auto sums = averaged ? pc * n.to(at::kDouble) : pc;
    const auto nll = -sums.sum() / n.sum().to(at::kDouble);
    const auto ref_loss = t == "alphapo" ? ref.mean() : ref.mean() + nll;
    EXPECT_TRUE(AllClose(r.losses, ref, 1e-10, 1e-12)) << t;
    EXPECT_TRUE(AllClose(r.loss, ref_loss, 1e-10, 1e-12)) << t;
    const auto c = alpha != 0 ? (1 - at::pow(at::exp(pc), -alpha)) / alpha : pc;
    EXPECT_TRUE(AllClose(r.chosen_rewards, 0.7 * c, 1e-10, 1e-12)) << t;
    const auto g = torch::autograd::grad({r.loss}, {pc, pr});
    const auto gr = torch::autograd::grad({ref_loss}, {pc, pr});
    EXPECT_TRUE(AllClose(g[0], gr[0], 1e-9, 1e-12)) << t;
    EXPECT_TRUE(AllClose(g[1], gr[1], 1e-9, 1e-12)) << t;
  }
}

// torchtune's SimPOLoss(beta=2.0, gamma=0.5) expectation: −log(1/(1 + e^{[1.3, −39.5, −39.5]})).
TEST_F(CPOLossTest, TorchtuneSimPOLiteral) {
  const auto pc = at::tensor({-0.5, -10.0, -1.0}), pr = at::tensor({-0.1, -30.0, -21.0});
  const auto r = F::simpo_loss(pc, pr, torch::kNone);
  const auto expected = -(1 / (1 + at::exp(at::tensor({1.3, -39.5, -39.5})))).log();
  EXPECT_TRUE(AllClose(r.losses, expected, 1e-5, 1e-4));
  EXPECT_FALSE(r.nll_loss.defined());                           // the paper's SimPO: no NLL
  EXPECT_TRUE(AllClose(r.chosen_rewards, 2.0 * pc, 1e-12, 0));  // β·ā, not β·ā − γ
}

TEST_F(CPOLossTest, SimPOEqualsTRLSimPOWithoutNLL) {
  const auto pc = -at::rand({5}, at::kDouble), pr = -at::rand({5}, at::kDouble) - 0.3;
  const auto n = at::full({5}, 4, at::kLong);
  const auto in = PairInputs().policy_chosen_logps(pc).policy_rejected_logps(pr).chosen_lengths(n);
  const auto trl = F::cpo_loss(in, CPOLossOptions().loss_type(CPOLossType::kSimPO).beta(2.0));
  const auto paper = F::simpo_loss(in, prefopt::SimPOLossOptions().cpo_alpha(1.0));
  EXPECT_TRUE(AllClose(trl.loss, paper.loss, 1e-14, 0));
  // LLaMA-Factory's NLL (pref_ftx): −mean(ā_c).
  const auto lf = F::simpo_loss(in, prefopt::SimPOLossOptions().cpo_alpha(1.0).nll_normalization(
                                        prefopt::NLLNormalization::kSequenceMean));
  EXPECT_TRUE(AllClose(lf.nll_loss, -pc.mean(), 1e-14, 0));
}

TEST_F(CPOLossTest, ExtremesAndLowPrecision) {
  for (double s : {-1e4, 1e4}) {
    const auto pc = at::tensor({s, 0.0}, at::kFloat).requires_grad_();
    const auto pr = at::tensor({0.0, s}, at::kFloat).requires_grad_();
    const auto n = at::tensor({0, 3});
    for (const char* t : {"sigmoid", "hinge", "ipo", "simpo"}) {
      const auto r = F::cpo_loss(
          PairInputs().policy_chosen_logps(pc).policy_rejected_logps(pr).chosen_lengths(n),
          CPOLossOptions().loss_type(prefopt::cpo_loss_type_from_name(t)));
      const auto g = torch::autograd::grad({r.loss}, {pc, pr});
      EXPECT_TRUE(at::isfinite(r.loss).item<bool>() && at::isfinite(g[0]).all().item<bool>() &&
                  at::isfinite(g[1]).all().item<bool>())
          << t << " " << s;
    }
  }
  const auto pc = -at::rand({8}, at::kDouble) * 2, pr = -at::rand({8}, at::kDouble) * 2;
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    const auto r = F::simpo_loss(pc.to(dt), pr.to(dt));
    EXPECT_EQ(r.losses.scalar_type(), at::kFloat);
    EXPECT_TRUE(AllClose(r.losses,
                         prefopt_ref::cpo_losses("simpo", 2.0, 0, 0.5, 0, pc.to(dt).to(at::kDouble),
                                                 pr.to(dt).to(at::kDouble)),
                         1e-5, 1e-6));
  }
}

TEST_F(CPOLossTest, Errors) {
  const auto x = at::zeros({3}, at::kDouble);
  const auto in = PairInputs().policy_chosen_logps(x).policy_rejected_logps(x);
  PREFOPT_EXPECT_THROWS_WITH(F::cpo_loss(in, CPOLossOptions().beta(0).cpo_alpha(0)),
                             "prefopt::cpo_loss: expected beta > 0, got 0");
  PREFOPT_EXPECT_THROWS_WITH(
      F::cpo_loss(in, CPOLossOptions().loss_type(CPOLossType::kHinge).label_smoothing(0.1)),
      "prefopt::cpo_loss: label_smoothing = 0.1 is not used by hinge; expected 0");
  PREFOPT_EXPECT_THROWS_WITH(F::cpo_loss(in, CPOLossOptions().label_smoothing(0.7)),
                             "expected label_smoothing in [0, 0.5), got 0.7");
  PREFOPT_EXPECT_THROWS_WITH(F::cpo_loss(in),
                             "prefopt::cpo_loss: the token-mean NLL needs "
                             "chosen_lengths");
  PREFOPT_EXPECT_THROWS_WITH(F::simpo_loss(x, x.narrow(0, 0, 2)),
                             "prefopt::simpo_loss: expected policy_rejected_logps of shape [3]");
  PREFOPT_EXPECT_THROWS_WITH(F::cpo_loss(PairInputs(in).weights(x), CPOLossOptions().cpo_alpha(0)),
                             "per-pair weights are a DPO-family input");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::cpo_loss_type_from_name("dpo"),
                             "unknown CPO loss type 'dpo'");
  PREFOPT_EXPECT_THROWS_WITH(F::simpo_loss(x, x, prefopt::SimPOLossOptions().simpo_gamma(NAN)),
                             "expected a finite simpo_gamma");
}

// A host's nll_loss that no term reads (cpo_alpha 0, or alphapo) warns; with a weight it is
// the NLL term.
TEST_F(CPOLossTest, UnreadNllLossWarns) {
  const auto logsig = [](double x) { return -std::log1p(std::exp(-x)); };
  const auto in = PairInputs()
                      .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
                      .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
                      .nll_loss(at::scalar_tensor(5.0, at::kDouble))
                      .logps_form(prefopt::LogpsForm::kSum);
  const double plain = -logsig(0.1 * 1.0);  // sigmoid of β·(π_c − π_r), β = 0.1
  {
    prefopt::detail::WarningCapture warnings;
    const auto r = F::cpo_loss(in, CPOLossOptions().cpo_alpha(0.0));
    EXPECT_TRUE(warnings.contains(
        "prefopt::cpo_loss: nll_loss is given but no term reads it (cpo_alpha = 0)"));
    EXPECT_NEAR(r.loss.item<double>(), plain, 1e-15);
  }
  {
    prefopt::detail::WarningCapture warnings;
    (void)F::cpo_loss(PairInputs(in)
                          .logps_form(prefopt::LogpsForm::kMean)
                          .chosen_lengths(at::ones({1}, at::kLong))
                          .rejected_lengths(at::ones({1}, at::kLong)),
                      CPOLossOptions().loss_type(CPOLossType::kAlphaPO).alpha(0.5));
    EXPECT_TRUE(warnings.contains("nll_loss is given but no term reads it (alphapo has no NLL"));
  }
  prefopt::detail::WarningCapture quiet;
  const auto r = F::cpo_loss(in, CPOLossOptions());
  EXPECT_FALSE(quiet.contains("no term reads it"));
  EXPECT_NEAR(r.loss.item<double>(), plain + 5.0, 1e-15);
}

// A negative cpo_alpha is legal but maximises the NLL: a warning.
TEST_F(CPOLossTest, NegativeNllWeightWarns) {
  prefopt::detail::WarningCapture warnings;
  (void)F::cpo_loss(PairInputs()
                        .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
                        .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
                        .chosen_lengths(at::ones({1}, at::kLong))
                        .logps_form(prefopt::LogpsForm::kSum),
                    CPOLossOptions().cpo_alpha(-1.0));
  EXPECT_TRUE(warnings.contains("prefopt::cpo_loss: cpo_alpha = -1 < 0 maximises the NLL"));
  // AlphaPO does not read cpo_alpha: no warning.
  prefopt::detail::WarningCapture quiet;
  (void)F::cpo_loss(PairInputs()
                        .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
                        .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
                        .chosen_lengths(at::ones({1}, at::kLong))
                        .rejected_lengths(at::ones({1}, at::kLong))
                        .logps_form(prefopt::LogpsForm::kMean),
                    CPOLossOptions().loss_type(CPOLossType::kAlphaPO).alpha(0.5).cpo_alpha(-1.0));
  EXPECT_FALSE(quiet.contains("maximises"));
}

// An option that no term of the loss type reads (simpo_gamma without simpo/alphapo, cpo_alpha
// with alphapo, nll_normalization without an NLL term or with a host's nll_loss), set to another
// value than its default, warns; so does a reference (CPO and SimPO are reference-free). The
// same values where they are read, and the defaults, do not.
TEST_F(CPOLossTest, UnreadOptionsWarn) {
  const auto logsig = [](double x) { return -std::log1p(std::exp(-x)); };
  // One token each: sums and per-token means coincide.
  const auto in = PairInputs()
                      .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
                      .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
                      .chosen_lengths(at::ones({1}, at::kLong))
                      .rejected_lengths(at::ones({1}, at::kLong))
                      .logps_form(prefopt::LogpsForm::kSum);
  const auto with_ref = PairInputs(in)
                            .reference_chosen_logps(at::tensor({-3.0}, at::kDouble))
                            .reference_rejected_logps(at::tensor({-1.0}, at::kDouble));
  const double cpo = -logsig(0.1 * 1.0) + 1.0;  // sigmoid of β·m, β = 0.1, plus the NLL 1
  struct Run {
    std::vector<std::string> messages;
    double loss;
    bool has(const std::string& text) const {
      for (const auto& m : messages)
        if (m.find(text) != std::string::npos) return true;
      return false;
    }
  };
  const auto run = [](const PairInputs& i, const CPOLossOptions& o) {
    prefopt::detail::WarningCapture w;
    const double loss = F::cpo_loss(i, o).loss.item<double>();
    return Run{w.messages, loss};
  };
  const auto run_simpo = [](const PairInputs& i, const prefopt::SimPOLossOptions& o) {
    prefopt::detail::WarningCapture w;
    const double loss = F::simpo_loss(i, o).loss.item<double>();
    return Run{w.messages, loss};
  };
  const auto simpo = CPOLossType::kSimPO, alphapo = CPOLossType::kAlphaPO;
  const auto seq = prefopt::NLLNormalization::kSequenceMean;

  auto r = run(in, CPOLossOptions());
  EXPECT_FALSE(r.has("ignored"));
  EXPECT_NEAR(r.loss, cpo, 1e-15);

  r = run(in, CPOLossOptions().simpo_gamma(1.0));
  EXPECT_TRUE(
      r.has("prefopt::cpo_loss: simpo_gamma = 1 is read by the simpo and alphapo loss "
            "types only, got sigmoid: it is ignored"));
  EXPECT_NEAR(r.loss, cpo, 1e-15);
  r = run(in, CPOLossOptions().loss_type(simpo).simpo_gamma(1.0));
  EXPECT_FALSE(r.has("simpo_gamma"));
  EXPECT_NEAR(r.loss, -logsig(0.1 * 1.0 - 1.0) + 1.0, 1e-15);  // γ read: βm − γ

  r = run(in, CPOLossOptions().loss_type(alphapo).alpha(0.5).cpo_alpha(0.5));
  EXPECT_TRUE(
      r.has("prefopt::cpo_loss: cpo_alpha = 0.5 is not read by alphapo, which has no NLL "
            "term: it is ignored"));
  EXPECT_FALSE(run(in, CPOLossOptions().loss_type(alphapo).alpha(0.5)).has("cpo_alpha"));
  // TRL's CPOConfig sets cpo_alpha = 0 for alphapo: nothing to warn of.
  EXPECT_FALSE(
      run(in, CPOLossOptions().loss_type(alphapo).alpha(0.5).cpo_alpha(0.0)).has("cpo_alpha"));
  r = run(in, CPOLossOptions().cpo_alpha(0.0));
  EXPECT_FALSE(r.has("cpo_alpha"));
  EXPECT_NEAR(r.loss, -logsig(0.1), 1e-15);

  r = run(in, CPOLossOptions().cpo_alpha(0.0).nll_normalization(seq));
  EXPECT_TRUE(
      r.has("prefopt::cpo_loss: nll_normalization = NLLNormalization::kSequenceMean is "
            "not read without an NLL term (cpo_alpha = 0): it is ignored"));
  EXPECT_NEAR(r.loss, -logsig(0.1), 1e-15);
  r = run(in, CPOLossOptions().nll_normalization(seq));
  EXPECT_FALSE(r.has("nll_normalization"));
  EXPECT_NEAR(r.loss, cpo, 1e-15);
  r = run(PairInputs(in).nll_loss(at::scalar_tensor(5.0, at::kDouble)),
          CPOLossOptions().nll_normalization(seq));
  EXPECT_TRUE(
      r.has("prefopt::cpo_loss: nll_normalization = NLLNormalization::kSequenceMean is "
            "not read when nll_loss is given"));
  EXPECT_NEAR(r.loss, -logsig(0.1) + 5.0, 1e-15);
  // SimPO's default cpo_alpha is 0: no NLL term to normalise.
  auto s = run_simpo(in, prefopt::SimPOLossOptions().nll_normalization(seq));
  EXPECT_TRUE(
      s.has("nll_normalization = NLLNormalization::kSequenceMean is not read without an "
            "NLL term (cpo_alpha = 0)"));
  EXPECT_FALSE(run_simpo(in, prefopt::SimPOLossOptions()).has("ignored"));
  EXPECT_FALSE(run_simpo(in, prefopt::SimPOLossOptions().cpo_alpha(1.0).nll_normalization(seq))
                   .has("nll_normalization"));

  r = run(with_ref, CPOLossOptions());
  EXPECT_TRUE(
      r.has("prefopt::cpo_loss: the reference log-probs are given but no term reads "
            "them (sigmoid is reference-free): they are ignored"));
  EXPECT_NEAR(r.loss, cpo, 1e-15);
  s = run_simpo(with_ref, prefopt::SimPOLossOptions());
  EXPECT_TRUE(
      s.has("prefopt::simpo_loss: the reference log-probs are given but no term reads "
            "them (simpo is reference-free)"));
  EXPECT_NEAR(s.loss, -logsig(2.0 * 1.0 - 0.5), 1e-15);  // the paper's β = 2, γ = 0.5
}
