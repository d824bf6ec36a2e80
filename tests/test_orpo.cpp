// SPDX-License-Identifier: Apache-2.0
// prefopt/losses/orpo.h against the fp64 reference, each anchor's NLL, and confident tokens.
#include <prefopt/losses/orpo.h>

#include <cmath>

#include "reference/losses_reference.h"
#include "support.h"

namespace F = prefopt::functional;
using prefopt::ORPOLossOptions;
using prefopt::PairInputs;
using prefopt_test::AllClose;

struct ORPOLossTest : prefopt_test::SeededTest {};

TEST_F(ORPOLossTest, MatchesReference) {
  const int64_t B = 13;
  const auto ac = (-2 * at::rand({B}, at::kDouble) - 0.05).requires_grad_();
  const auto ar = (-3 * at::rand({B}, at::kDouble) - 0.05).requires_grad_();
  const auto n = at::randint(1, 20, {B}, at::kLong);
  const auto r =
      F::orpo_loss(PairInputs().policy_chosen_logps(ac).policy_rejected_logps(ar).chosen_lengths(n),
                   ORPOLossOptions().beta(0.25));
  const auto log_odds = prefopt_ref::orpo_log_odds(ac, ar);
  const auto ratio = prefopt_ref::logsig(log_odds);
  const auto nll = -(ac * n.to(at::kDouble)).sum() / n.sum().to(at::kDouble);  // Liger: token mean
  const auto ref_loss = nll - 0.25 * ratio.mean();
  EXPECT_TRUE(AllClose(r.loss, ref_loss, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.log_odds_chosen, log_odds, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.log_odds_ratio, ratio, 1e-12, 1e-14));
  EXPECT_TRUE(AllClose(r.nll_loss, nll, 1e-12, 0));
  EXPECT_TRUE(AllClose(r.chosen_rewards, 0.25 * ac, 1e-14, 0));
  const auto g = torch::autograd::grad({r.loss}, {ac, ar});
  const auto gr = torch::autograd::grad({ref_loss}, {ac, ar});
  EXPECT_TRUE(AllClose(g[0], gr[0], 1e-10, 1e-12));
  EXPECT_TRUE(AllClose(g[1], gr[1], 1e-10, 1e-12));
}

TEST_F(ORPOLossTest, AnchorNLLDefinitions) {
  const auto ac = -at::rand({6}, at::kDouble) - 0.1, ar = -at::rand({6}, at::kDouble) - 0.2;
  const auto ratio = prefopt_ref::logsig(prefopt_ref::orpo_log_odds(ac, ar));
  const auto in = PairInputs().policy_chosen_logps(ac).policy_rejected_logps(ar);
  // LLaMA-Factory: per pair −ā_c − β·ratio, then the mean.
  const auto lf = F::orpo_loss(
      in, ORPOLossOptions().nll_normalization(prefopt::NLLNormalization::kSequenceMean));
  EXPECT_TRUE(AllClose(lf.losses, -ac - 0.1 * ratio, 1e-12, 1e-14));
  // TRL: the host's CE over prompt + completion, passed as nll_loss.
  const auto trl = F::orpo_loss(PairInputs(in).nll_loss(at::tensor(1.75, at::kDouble)));
  EXPECT_TRUE(AllClose(trl.loss, 1.75 - 0.1 * ratio.mean(), 1e-12, 1e-14));
}

// trl#1473 / #2564 / #3237: confident completions (ā → 0⁻) made log1p(−exp(ā)) NaN.
TEST_F(ORPOLossTest, ConfidentCompletionsStayFinite) {
  for (auto dt : {at::kFloat, at::kBFloat16, at::kDouble}) {
    const auto ac = at::tensor({-1e-7, -1e-20, 0.0, -30.0}, at::kDouble).to(dt).requires_grad_();
    const auto ar = at::tensor({-2.0, -1e-7, -1e-3, -1e-7}, at::kDouble).to(dt).requires_grad_();
    const auto r =
        F::orpo_loss(PairInputs().policy_chosen_logps(ac).policy_rejected_logps(ar),
                     ORPOLossOptions().nll_normalization(prefopt::NLLNormalization::kSequenceMean));
    const auto g = torch::autograd::grad({r.loss}, {ac, ar});
    EXPECT_TRUE(at::isfinite(r.losses).all().item<bool>()) << dt;
    EXPECT_TRUE(at::isfinite(g[0]).all().item<bool>() && at::isfinite(g[1]).all().item<bool>())
        << dt;
  }
  // At ā_c = −1e-7 the fp32 result agrees with fp64 (where the naive form is still accurate).
  const auto c64 = at::tensor({-1e-7, -0.5}, at::kDouble),
             r64 = at::tensor({-1.0, -1e-6}, at::kDouble);
  const auto exact = prefopt_ref::orpo_log_odds(c64, r64);
  const auto f32 =
      F::orpo_loss(PairInputs()
                       .policy_chosen_logps(c64.to(at::kFloat))
                       .policy_rejected_logps(r64.to(at::kFloat)),
                   ORPOLossOptions().nll_normalization(prefopt::NLLNormalization::kSequenceMean));
  EXPECT_TRUE(AllClose(f32.log_odds_chosen, exact, 1e-5, 1e-5));
}

TEST_F(ORPOLossTest, Errors) {
  const auto x = -at::ones({2}, at::kDouble);
  const auto in = PairInputs().policy_chosen_logps(x).policy_rejected_logps(x);
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(in, ORPOLossOptions().beta(0)),
                             "prefopt::orpo_loss: expected beta > 0, got 0");
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(in),
                             "prefopt::orpo_loss: the token-mean NLL needs "
                             "chosen_lengths");
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(PairInputs().policy_chosen_logps(x)),
                             "prefopt::orpo_loss: expected policy_rejected_logps to be a defined "
                             "tensor");
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(PairInputs(in).weights(x)),
                             "per-pair weights are a DPO-family input");
}

// Issue #16, repro 2: the log-odds of very unlikely completions are not clamped. TRL:
// log-odds −799.4587 and loss 879.9459 (fp64 from the formula: (a − b) + log((1 − e^b)/(1 − e^a))).
TEST_F(ORPOLossTest, VeryUnlikelyCompletionsKeepExactLogOdds) {
  const double a = -800.0, b = -1.0;
  const double log_odds = (a - b) + std::log(-std::expm1(b)) - std::log(-std::expm1(a));
  ASSERT_NEAR(log_odds, -799.4587, 1e-4);
  for (auto dt : {at::kDouble, at::kFloat}) {
    const auto ac = at::tensor({a}, at::kDouble).to(dt).requires_grad_();
    const auto ar = at::tensor({b}, at::kDouble).to(dt);
    const auto r = F::orpo_loss(PairInputs()
                                    .policy_chosen_logps(ac)
                                    .policy_rejected_logps(ar)
                                    .nll_loss(at::scalar_tensor(800.0, at::kDouble))
                                    .logps_form(prefopt::LogpsForm::kMean),
                                ORPOLossOptions().beta(0.1));
    const double tol = dt == at::kDouble ? 1e-12 : 1e-6;
    EXPECT_NEAR(r.log_odds_chosen.item<double>(), log_odds, std::abs(log_odds) * tol) << dt;
    // loss = 800 − 0.1·log σ(log_odds); log σ(x) = x − log1p(e^x) for x < 0.
    const double loss = 800.0 - 0.1 * (log_odds - std::log1p(std::exp(log_odds)));
    EXPECT_NEAR(r.loss.item<double>(), loss, loss * tol) << dt;
    // d loss / d a = −0.1·σ(−log_odds)·(1 + e^a/(1 − e^a)) ≈ −0.1: not zeroed by a clamp.
    const auto g = torch::autograd::grad({r.loss}, {ac})[0].item<double>();
    EXPECT_NEAR(g, -0.1, 1e-6) << dt;
  }
}

// ā = 0 (an empty completion's mean, or a bf16 mean that rounds to 0) and ā = −1e-8: finite
// values and gradients, in every dtype (TRL's two-branch form gives −inf / NaN there).
TEST_F(ORPOLossTest, ZeroAndTinyMeansStayFiniteWithGradients) {
  for (auto dt : {at::kDouble, at::kFloat, at::kBFloat16}) {
    for (double x : {0.0, -1e-8}) {
      const auto ac = at::tensor({x, -0.7}, at::kDouble).to(dt).requires_grad_();
      const auto ar = at::tensor({-0.5, x}, at::kDouble).to(dt).requires_grad_();
      const auto r = F::orpo_loss(PairInputs()
                                      .policy_chosen_logps(ac)
                                      .policy_rejected_logps(ar)
                                      .chosen_lengths(at::tensor({1, 3}))
                                      .logps_form(prefopt::LogpsForm::kMean));
      const auto g = torch::autograd::grad({r.loss}, {ac, ar});
      EXPECT_TRUE(at::isfinite(r.losses).all().item<bool>()) << dt << " " << x;
      EXPECT_TRUE(at::isfinite(r.log_odds_chosen).all().item<bool>()) << dt << " " << x;
      EXPECT_TRUE(at::isfinite(g[0]).all().item<bool>() && at::isfinite(g[1]).all().item<bool>())
          << dt << " " << x;
    }
  }
}

// Sums are converted to the per-token means ORPO consumes, or refused without lengths; an
// empty batch's sequence-mean NLL is 0, not NaN.
TEST_F(ORPOLossTest, SumsAreConvertedAndEmptyBatchesGiveZero) {
  const auto sc = at::tensor({-3.0, -1.2}, at::kDouble), sr = at::tensor({-8.0, -2.0}, at::kDouble);
  const auto nc = at::tensor({3, 2}), nr = at::tensor({4, 1});
  const auto sums = PairInputs()
                        .policy_chosen_logps(sc)
                        .policy_rejected_logps(sr)
                        .chosen_lengths(nc)
                        .rejected_lengths(nr)
                        .logps_form(prefopt::LogpsForm::kSum);
  const auto means = PairInputs(sums)
                         .policy_chosen_logps(at::tensor({-1.0, -0.6}, at::kDouble))
                         .policy_rejected_logps(at::tensor({-2.0, -2.0}, at::kDouble))
                         .logps_form(prefopt::LogpsForm::kMean);
  const auto a = F::orpo_loss(sums), b = F::orpo_loss(means);
  EXPECT_TRUE(AllClose(a.losses, b.losses, 1e-14, 1e-15));
  EXPECT_TRUE(AllClose(a.chosen_logps, at::tensor({-1.0, -0.6}, at::kDouble), 1e-15, 0));
  PREFOPT_EXPECT_THROWS_WITH(F::orpo_loss(PairInputs(sums).rejected_lengths(at::Tensor())),
                             "prefopt::orpo_loss: orpo consumes per-token means of the log-probs; "
                             "got sums without rejected_lengths");
  const auto empty = at::zeros({0}, at::kDouble);
  for (auto norm :
       {prefopt::NLLNormalization::kSequenceMean, prefopt::NLLNormalization::kTokenMean}) {
    const auto r = F::orpo_loss(PairInputs()
                                    .policy_chosen_logps(empty)
                                    .policy_rejected_logps(empty)
                                    .chosen_lengths(at::zeros({0}, at::kLong))
                                    .logps_form(prefopt::LogpsForm::kMean),
                                ORPOLossOptions().nll_normalization(norm));
    EXPECT_EQ(r.nll_loss.item<double>(), 0.0);
    EXPECT_EQ(r.loss.item<double>(), 0.0);
  }
}

// nll_normalization with a host's nll_loss (which is the NLL term), and a reference (ORPO is
// reference-free): no term reads them, a warning each; the normalisation without nll_loss, and
// the defaults, warn of nothing.
TEST_F(ORPOLossTest, UnreadOptionsWarn) {
  // ā_c = −1, ā_r = −2 (one token each): log-odds by hand, λ = 0.1.
  const double lo = 1.0 - (std::log(1 - std::exp(-1.0)) - std::log(1 - std::exp(-2.0)));
  const double ratio = -std::log1p(std::exp(-lo));
  const auto in = PairInputs()
                      .policy_chosen_logps(at::tensor({-1.0}, at::kDouble))
                      .policy_rejected_logps(at::tensor({-2.0}, at::kDouble))
                      .chosen_lengths(at::ones({1}, at::kLong))
                      .rejected_lengths(at::ones({1}, at::kLong))
                      .logps_form(prefopt::LogpsForm::kMean);
  const auto seq = ORPOLossOptions().nll_normalization(prefopt::NLLNormalization::kSequenceMean);
  const auto with_nll = PairInputs(in).nll_loss(at::scalar_tensor(5.0, at::kDouble));
  {
    prefopt::detail::WarningCapture quiet;
    EXPECT_NEAR(F::orpo_loss(in).loss.item<double>(), 1.0 - 0.1 * ratio, 1e-14);
    EXPECT_NEAR(F::orpo_loss(in, seq).loss.item<double>(), 1.0 - 0.1 * ratio, 1e-14);
    EXPECT_NEAR(F::orpo_loss(with_nll).loss.item<double>(), 5.0 - 0.1 * ratio, 1e-14);
    EXPECT_FALSE(quiet.contains("ignored"));
  }
  {
    prefopt::detail::WarningCapture warnings;
    EXPECT_NEAR(F::orpo_loss(with_nll, seq).loss.item<double>(), 5.0 - 0.1 * ratio, 1e-14);
    EXPECT_TRUE(warnings.contains(
        "prefopt::orpo_loss: nll_normalization = NLLNormalization::kSequenceMean is not read "
        "when nll_loss is given (the NLL term is the host's): it is ignored"));
  }
  prefopt::detail::WarningCapture warnings;
  const auto r = F::orpo_loss(PairInputs(in)
                                  .reference_chosen_logps(at::tensor({-3.0}, at::kDouble))
                                  .reference_rejected_logps(at::tensor({-1.0}, at::kDouble)));
  EXPECT_NEAR(r.loss.item<double>(), 1.0 - 0.1 * ratio, 1e-14);
  EXPECT_TRUE(
      warnings.contains("prefopt::orpo_loss: the reference log-probs are given but no "
                        "term reads them (ORPO is reference-free): they are ignored"));
}
