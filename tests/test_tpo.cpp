// SPDX-License-Identifier: Apache-2.0
// prefopt/losses/tpo.h: TRL's TPO (sigmoid, hinge, ipo, tpo-l plus the gold response's NLL),
// against values computed by hand in double from TRL's formulas.
#include <prefopt/losses/tpo.h>
#include <torch/csrc/autograd/autograd.h>  // torch::autograd::grad

#include <cmath>
#include <string>

#include "support.h"

namespace F = prefopt::functional;
using prefopt::PairInputs;
using prefopt::TPOLossOptions;
using prefopt::TPOLossType;
using prefopt_test::AllClose;

namespace {

double logsig(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

// Two triples: chosen/rejected sums and lengths, and the gold responses' sums and lengths.
const double kSc[2] = {-6.0, -10.0}, kSr[2] = {-9.0, -8.0};
const int64_t kNc[2] = {3, 5}, kNr[2] = {3, 2};
const double kGold[2] = {-4.0, -2.0};
const int64_t kNg[2] = {2, 2};
constexpr double kNll = 6.0 / 4.0;  // −Σ gold / Σ gold tokens

struct Triples {
  at::Tensor pc = at::tensor({kSc[0], kSc[1]}, at::kDouble).requires_grad_();
  at::Tensor pr = at::tensor({kSr[0], kSr[1]}, at::kDouble).requires_grad_();
  at::Tensor gold_sum = at::tensor({kGold[0], kGold[1]}, at::kDouble).requires_grad_();
  PairInputs pair() const {
    return PairInputs()
        .policy_chosen_logps(pc)
        .policy_rejected_logps(pr)
        .chosen_lengths(at::tensor({kNc[0], kNc[1]}))
        .rejected_lengths(at::tensor({kNr[0], kNr[1]}))
        .logps_form(prefopt::LogpsForm::kSum);
  }
  prefopt::SequenceLogprobs gold() const {
    prefopt::SequenceLogprobs g;
    g.sum = gold_sum;
    g.count = at::tensor({kNg[0], kNg[1]});
    return g;
  }
};

}  // namespace

struct TPOLossTest : prefopt_test::SeededTest {};

TEST_F(TPOLossTest, EveryTypeMatchesHandValues) {
  for (const char* name : {"sigmoid", "hinge", "ipo", "tpo-l"}) {
    const std::string t = name;
    const bool means = t == "ipo" || t == "tpo-l";
    const double beta = t == "ipo" ? 0.25 : 2.0, eps = (t == "sigmoid" || t == "tpo-l") ? 0.1 : 0.0;
    const double gamma = 0.5, alpha = 0.75;
    double expected = 0, reward_c[2];
    for (int b = 0; b < 2; ++b) {
      const double c = means ? kSc[b] / kNc[b] : kSc[b], r = means ? kSr[b] / kNr[b] : kSr[b];
      const double d = c - r;
      double l = 0;
      if (t == "sigmoid") l = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d);
      if (t == "hinge") l = std::max(0.0, 1 - beta * d);
      if (t == "ipo") l = (d - 1 / (2 * beta)) * (d - 1 / (2 * beta));
      if (t == "tpo-l") {
        const double x = beta * d - gamma;
        l = -(1 - eps) * logsig(x) - eps * logsig(-x);
      }
      expected += l / 2;
      reward_c[b] = beta * c;
    }
    expected += alpha * kNll;
    Triples tr;
    const auto r = F::tpo_loss(tr.pair(), tr.gold(),
                               TPOLossOptions()
                                   .loss_type(prefopt::tpo_loss_type_from_name(t))
                                   .beta(beta)
                                   .label_smoothing(eps)
                                   .tpo_alpha(alpha)
                                   .tpo_l_gamma(gamma));
    EXPECT_NEAR(r.loss.item<double>(), expected, 1e-13) << t;
    EXPECT_NEAR(r.nll_loss.item<double>(), kNll, 1e-15) << t;
    EXPECT_TRUE(
        AllClose(r.chosen_rewards, at::tensor({reward_c[0], reward_c[1]}, at::kDouble), 1e-14, 0))
        << t;
    // The gold NLL's gradient: alpha · (−1 / Σ gold tokens) for every gold sum.
    const auto g = torch::autograd::grad({r.loss}, {tr.gold_sum})[0];
    EXPECT_TRUE(AllClose(g, at::full({2}, -alpha / 4.0, at::kDouble), 1e-14, 0)) << t;
    EXPECT_STREQ(prefopt::tpo_loss_type_name(prefopt::tpo_loss_type_from_name(t)), name);
  }
}

TEST_F(TPOLossTest, DefaultsAreTrls) {
  const TPOLossOptions o;
  EXPECT_EQ(o.loss_type(), TPOLossType::kSigmoid);
  EXPECT_EQ(o.beta(), 0.01);
  EXPECT_EQ(o.label_smoothing(), 0.0);
  EXPECT_EQ(o.tpo_alpha(), 1.0);
  EXPECT_EQ(o.tpo_l_gamma(), 0.5);
  Triples tr;
  const prefopt::TPOLoss tpo;
  double expected = kNll;
  for (int b = 0; b < 2; ++b) expected -= logsig(0.01 * (kSc[b] - kSr[b])) / 2;
  EXPECT_NEAR(tpo(tr.pair(), tr.gold()).loss.item<double>(), expected, 1e-14);
  // The NLL may come as nll_loss instead; tpo_alpha(0) needs neither.
  EXPECT_NEAR(
      tpo(PairInputs(tr.pair()).nll_loss(at::scalar_tensor(kNll, at::kDouble))).loss.item<double>(),
      expected, 1e-14);
  EXPECT_NEAR(F::tpo_loss(tr.pair(), TPOLossOptions().tpo_alpha(0)).loss.item<double>(),
              expected - kNll, 1e-14);
  // No gold tokens at all: the NLL is 0, not TRL's NaN.
  auto none = tr.gold();
  none.sum = at::zeros({2}, at::kDouble);
  none.count = at::zeros({2}, at::kLong);
  EXPECT_EQ(F::tpo_loss(tr.pair(), none).nll_loss.item<double>(), 0.0);
}

TEST_F(TPOLossTest, Errors) {
  Triples tr;
  PREFOPT_EXPECT_THROWS_WITH(F::tpo_loss(tr.pair()),
                             "prefopt::tpo_loss: tpo_alpha = 1 weights the gold response's NLL");
  PREFOPT_EXPECT_THROWS_WITH(
      F::tpo_loss(tr.pair(), tr.gold(),
                  TPOLossOptions().loss_type(TPOLossType::kHinge).label_smoothing(0.1)),
      "prefopt::tpo_loss: label_smoothing = 0.1 is not used by hinge");
  PREFOPT_EXPECT_THROWS_WITH(F::tpo_loss(tr.pair(), tr.gold(), TPOLossOptions().beta(0)),
                             "prefopt::tpo_loss: expected beta > 0, got 0");
  // TPO's margin is tpo_l_gamma (the message named CPO's simpo_gamma).
  PREFOPT_EXPECT_THROWS_WITH(
      F::tpo_loss(tr.pair(), tr.gold(),
                  TPOLossOptions().loss_type(TPOLossType::kTPOL).tpo_l_gamma(NAN)),
      "prefopt::tpo_loss: expected a finite tpo_l_gamma, got nan");
  PREFOPT_EXPECT_THROWS_WITH(
      F::tpo_loss(PairInputs(tr.pair()).nll_loss(at::scalar_tensor(1.0)), tr.gold()),
      "got both the gold SequenceLogprobs and nll_loss");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::tpo_loss_type_from_name("tpo_l"),
                             "unknown TPO loss type 'tpo_l'; expected one of sigmoid, hinge, ipo, "
                             "tpo-l");
  // tpo-l consumes means: sums without their lengths cannot be converted.
  PREFOPT_EXPECT_THROWS_WITH(F::tpo_loss(PairInputs(tr.pair()).chosen_lengths(at::Tensor()),
                                         tr.gold(), TPOLossOptions().loss_type(TPOLossType::kTPOL)),
                             "got sums without chosen_lengths to convert them");
  // One gold response per pair: a gold batch of another size was averaged in silently.
  prefopt::SequenceLogprobs three;
  three.sum = at::full({3}, -2.0, at::kDouble);
  three.count = at::full({3}, 2, at::kLong);
  PREFOPT_EXPECT_THROWS_WITH(F::tpo_loss(tr.pair(), three),
                             "prefopt::tpo_loss: expected one gold response per pair, gold.sum of "
                             "shape [2] like policy_chosen_logps, got [3]");
  prefopt::SequenceLogprobs meta = tr.gold();
  meta.sum = meta.sum.detach().to(at::kMeta);
  meta.count = meta.count.to(at::kMeta);
  PREFOPT_EXPECT_THROWS_WITH(F::tpo_loss(tr.pair(), meta),
                             "prefopt::tpo_loss: expected gold.sum and gold.count on cpu like "
                             "policy_chosen_logps, got meta and meta");
}

// Gold log-probs with tpo_alpha = 0: nothing reads them, a warning; the loss is the preference
// term alone. An empty gold is no input: no warning.
TEST_F(TPOLossTest, UnreadGoldWarns) {
  Triples tr;
  const auto o = TPOLossOptions().tpo_alpha(0);
  double expected = 0;
  for (int b = 0; b < 2; ++b) expected -= logsig(0.01 * (kSc[b] - kSr[b])) / 2;
  {
    prefopt::detail::WarningCapture warnings;
    EXPECT_NEAR(F::tpo_loss(tr.pair(), tr.gold(), o).loss.item<double>(), expected, 1e-15);
    EXPECT_TRUE(
        warnings.contains("prefopt::tpo_loss: the gold SequenceLogprobs are given but no "
                          "term reads them (tpo_alpha = 0): they are ignored"));
  }
  prefopt::detail::WarningCapture quiet;
  EXPECT_NEAR(F::tpo_loss(tr.pair(), prefopt::SequenceLogprobs(), o).loss.item<double>(), expected,
              1e-15);
  EXPECT_FALSE(quiet.contains("gold SequenceLogprobs are given"));
}

// tpo_l_gamma with another type than tpo-l, and a reference (TPO is reference-free): no term
// reads them, a warning each; tpo-l reads γ, and the defaults warn of nothing.
TEST_F(TPOLossTest, UnreadOptionsWarn) {
  Triples tr;
  const auto o = TPOLossOptions().tpo_alpha(0);
  double sigmoid = 0;
  for (int b = 0; b < 2; ++b) sigmoid -= logsig(0.01 * (kSc[b] - kSr[b])) / 2;
  {
    prefopt::detail::WarningCapture quiet;
    EXPECT_NEAR(F::tpo_loss(tr.pair(), o).loss.item<double>(), sigmoid, 1e-15);
    EXPECT_FALSE(quiet.contains("ignored"));
  }
  {
    prefopt::detail::WarningCapture warnings;
    EXPECT_NEAR(F::tpo_loss(tr.pair(), TPOLossOptions(o).tpo_l_gamma(1.0)).loss.item<double>(),
                sigmoid, 1e-15);
    EXPECT_TRUE(
        warnings.contains("prefopt::tpo_loss: tpo_l_gamma = 1 is read by the tpo-l loss "
                          "type only, got sigmoid: it is ignored"));
  }
  {
    prefopt::detail::WarningCapture quiet;
    double tpol = 0;  // −ℓ(β·(ā_c − ā_r) − γ) on per-token means, β = 0.01, γ = 1
    for (int b = 0; b < 2; ++b)
      tpol -= logsig(0.01 * (kSc[b] / kNc[b] - kSr[b] / kNr[b]) - 1.0) / 2;
    const auto tl = TPOLossOptions(o).loss_type(TPOLossType::kTPOL).tpo_l_gamma(1.0);
    EXPECT_NEAR(F::tpo_loss(tr.pair(), tl).loss.item<double>(), tpol, 1e-15);
    EXPECT_FALSE(quiet.contains("tpo_l_gamma"));
  }
  prefopt::detail::WarningCapture warnings;
  const auto in = tr.pair()
                      .reference_chosen_logps(at::tensor({-1.0, -2.0}, at::kDouble))
                      .reference_rejected_logps(at::tensor({-3.0, -4.0}, at::kDouble));
  EXPECT_NEAR(F::tpo_loss(in, o).loss.item<double>(), sigmoid, 1e-15);
  EXPECT_TRUE(
      warnings.contains("prefopt::tpo_loss: the reference log-probs are given but no term "
                        "reads them (TPO is reference-free): they are ignored"));
}
