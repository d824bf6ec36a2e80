// SPDX-License-Identifier: Apache-2.0
// prefopt/metrics.h and prefopt/fmt.h: every metric name in both windows against values
// worked out by hand, empty sides, prefixes, the formatters and the JSON Lines writer.
#include <prefopt/fmt.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/metrics.h>

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "support.h"

namespace F = prefopt::functional;
using prefopt::MetricAccumulator;
using prefopt::Metrics;
using prefopt::MetricsOptions;
using prefopt::MetricWindow;

namespace {

at::Tensor d(std::initializer_list<double> v) {
  return at::tensor(std::vector<double>(v), at::TensorOptions().dtype(at::kDouble));
}
at::Tensor l(std::initializer_list<int64_t> v) { return at::tensor(std::vector<int64_t>(v)); }

// A DPO micro-step as the loss would return it, with chosen rewards rc, rejected rr.
struct Step {
  prefopt::DPOLossResult result;
  prefopt::PairInputs inputs;
  prefopt::PairLogprobs policy;
};

Step dpo_step(double loss, at::Tensor rc, at::Tensor rr, at::Tensor pc, at::Tensor pr) {
  Step s;
  s.result.loss = at::scalar_tensor(loss, at::kDouble);
  s.result.chosen_rewards = rc;
  s.result.rejected_rewards = rr;
  s.inputs = prefopt::PairInputs().policy_chosen_logps(pc).policy_rejected_logps(pr);
  return s;
}

// The two micro-steps of the hand-worked window below.
std::vector<Step> two_steps() {
  std::vector<Step> steps;
  // Step 1: 2 pairs, the second a tie. Step 2: 3 pairs.
  steps.push_back(dpo_step(0.7, d({1.0, -0.5}), d({0.5, -0.5}), d({-10, -12}), d({-11, -13})));
  steps.push_back(
      dpo_step(0.4, d({2.0, 0.0, 1.0}), d({1.0, 1.0, -1.0}), d({-5, -6, -7}), d({-8, -9, -10})));
  // Token statistics: logits sums over (2, 3) and (4, 1) scored tokens per side and step.
  steps[0].policy.chosen.count = l({2, 3});
  steps[0].policy.chosen.logits_sum = d({1.0, 2.0});
  steps[0].policy.chosen.entropy_sum = d({4.0, 6.0});
  steps[0].policy.chosen.correct = l({1, 3});
  steps[0].policy.rejected.count = l({1, 1});
  steps[0].policy.rejected.logits_sum = d({-1.0, 0.0});
  steps[0].policy.rejected.entropy_sum = d({1.0, 1.0});
  steps[0].policy.rejected.correct = l({0, 1});
  steps[1].policy.chosen.count = l({4, 0, 2});
  steps[1].policy.chosen.logits_sum = d({8.0, 0.0, 3.0});
  steps[1].policy.chosen.entropy_sum = d({2.0, 0.0, 2.0});
  steps[1].policy.chosen.correct = l({4, 0, 1});
  steps[1].policy.rejected.count = l({1, 2, 3});
  steps[1].policy.rejected.logits_sum = d({0.5, 0.5, 2.0});
  steps[1].policy.rejected.entropy_sum = d({1.0, 1.0, 3.0});
  steps[1].policy.rejected.correct = l({1, 1, 1});
  return steps;
}

Metrics run(const std::vector<Step>& steps, MetricWindow window, bool tokens) {
  MetricAccumulator acc(MetricsOptions().window(window));
  for (const auto& s : steps) {
    if (tokens) {
      acc.add(s.result, s.inputs, s.policy);
    } else {
      acc.add(s.result, s.inputs);
    }
  }
  EXPECT_EQ(acc.steps(), static_cast<int64_t>(steps.size()));
  return acc.compute();
}

std::vector<std::string> names(const Metrics& m) {
  std::vector<std::string> out;
  for (const auto& item : m) out.push_back(item.first);
  return out;
}

}  // namespace

TEST(Metrics, DpoMeanOfStepsByHand) {
  const auto m = run(two_steps(), MetricWindow::kMeanOfSteps, true);
  EXPECT_EQ(names(m), (std::vector<std::string>{
                          "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                          "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                          "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens"}));
  EXPECT_DOUBLE_EQ(m.at("loss"), (0.7 + 0.4) / 2);
  // Per step: chosen (0.5/2, 3/3), rejected (0/2, 1/3), accuracies (1/2, 2/3): the tie is
  // not accurate.
  EXPECT_DOUBLE_EQ(m.at("rewards/chosen"), (0.25 + 1.0) / 2);
  EXPECT_DOUBLE_EQ(m.at("rewards/rejected"), (0.0 + 1.0 / 3) / 2);
  EXPECT_DOUBLE_EQ(m.at("rewards/accuracies"), (0.5 + 2.0 / 3) / 2);
  EXPECT_DOUBLE_EQ(m.at("rewards/margins"), (0.25 + (1.0 - 1.0 / 3)) / 2);
  EXPECT_DOUBLE_EQ(m.at("logps/chosen"), (-11.0 + -6.0) / 2);
  EXPECT_DOUBLE_EQ(m.at("logps/rejected"), (-12.0 + -9.0) / 2);
  // Token metrics per micro-step (tokens pooled within it), then the mean of the steps, as
  // TRL's log() does: chosen 3 / 5 and 11 / 6, rejected -1 / 2 and 3 / 6.
  EXPECT_DOUBLE_EQ(m.at("logits/chosen"), (3.0 / 5 + 11.0 / 6) / 2);
  EXPECT_DOUBLE_EQ(m.at("logits/rejected"), (-1.0 / 2 + 3.0 / 6) / 2);
  // entropy over both sides: (10 + 2) / 7 and (4 + 5) / 12.
  EXPECT_DOUBLE_EQ(m.at("entropy"), ((10.0 + 2.0) / (5 + 2) + (4.0 + 5.0) / (6 + 6)) / 2);
  // mean_token_accuracy over the chosen side only (TRL ≥ 0.29): 4 / 5 and 5 / 6.
  EXPECT_DOUBLE_EQ(m.at("mean_token_accuracy"), (4.0 / 5 + 5.0 / 6) / 2);
  EXPECT_DOUBLE_EQ(m.at("num_tokens"), 5 + 2 + 6 + 6);
}

TEST(Metrics, DpoCountWeightedByHand) {
  const auto m = run(two_steps(), MetricWindow::kCountWeighted, true);
  EXPECT_DOUBLE_EQ(m.at("loss"), (0.7 + 0.4) / 2);
  EXPECT_DOUBLE_EQ(m.at("rewards/chosen"), (0.5 + 3.0) / 5);
  EXPECT_DOUBLE_EQ(m.at("rewards/rejected"), (0.0 + 1.0) / 5);
  EXPECT_DOUBLE_EQ(m.at("rewards/accuracies"), 3.0 / 5);
  EXPECT_DOUBLE_EQ(m.at("rewards/margins"), (0.5 + 3.0) / 5 - 1.0 / 5);
  EXPECT_DOUBLE_EQ(m.at("logps/chosen"), (-22.0 - 18.0) / 5);
  EXPECT_DOUBLE_EQ(m.at("logps/rejected"), (-24.0 - 27.0) / 5);
  // Tokens pooled over the whole window.
  EXPECT_DOUBLE_EQ(m.at("logits/chosen"), 14.0 / 11);
  EXPECT_DOUBLE_EQ(m.at("entropy"), (10.0 + 2.0 + 4.0 + 5.0) / (5 + 2 + 6 + 6));
  EXPECT_DOUBLE_EQ(m.at("mean_token_accuracy"), (4.0 + 5.0) / (5 + 6));
  EXPECT_DOUBLE_EQ(m.at("num_tokens"), 19);
}

// TRL's TPOTrainer logs no nll_loss; its entropy is each rank's mean over the tokens of all
// three branches, gold included, then the mean of the ranks' means. TRL's CPOTrainer logs
// nll_loss = 0 when cpo_alpha = 0.
TEST(Metrics, TpoAndCpoLogWhatTrlLogs) {
  const auto pair_step = [](double entropy_c, double entropy_r, int64_t n) {
    Step s = two_steps()[0];
    s.policy.chosen.count = l({n});
    s.policy.chosen.entropy_sum = d({entropy_c * static_cast<double>(n)});
    s.policy.chosen.logits_sum = d({0.0});
    s.policy.chosen.correct = l({0});
    s.policy.rejected.count = l({n});
    s.policy.rejected.entropy_sum = d({entropy_r * static_cast<double>(n)});
    s.policy.rejected.logits_sum = d({0.0});
    s.policy.rejected.correct = l({0});
    s.inputs =
        prefopt::PairInputs().policy_chosen_logps(d({-1.0})).policy_rejected_logps(d({-2.0}));
    s.result.chosen_rewards = d({0.1});
    s.result.rejected_rewards = d({0.2});
    return s;
  };
  const auto gold_of = [](double entropy, int64_t n) {
    prefopt::SequenceLogprobs g;
    g.count = l({n});
    g.entropy_sum = d({entropy * static_cast<double>(n)});
    return g;
  };
  const auto tpo_of = [](const Step& s) {
    prefopt::TPOLossResult r;
    r.loss = s.result.loss;
    r.chosen_rewards = s.result.chosen_rewards;
    r.rejected_rewards = s.result.rejected_rewards;
    r.nll_loss = at::scalar_tensor(0.3, at::kDouble);  // the gold NLL: in the loss, not logged
    return r;
  };
  // One rank, 2 tokens per branch with entropies 1, 1 and 4: TRL logs 2, not the pair's 1.
  {
    const Step s = pair_step(1.0, 1.0, 2);
    MetricAccumulator acc;
    acc.add(tpo_of(s), s.inputs, s.policy, gold_of(4.0, 2));
    const auto m = acc.compute();
    EXPECT_FALSE(m.contains("nll_loss"));
    EXPECT_DOUBLE_EQ(m.at("entropy"), 2.0);
    EXPECT_DOUBLE_EQ(m.at("num_tokens"), 6);  // the gold tokens are scored too
    acc.add(tpo_of(s), s.inputs);
    EXPECT_FALSE(acc.compute().contains("nll_loss"));
  }
  // Two ranks, 1 and 3 tokens per branch: the mean of the ranks' means, (2 + 0) / 2, where
  // pooling the tokens would give (2·3 + 0·9) / 12 = 0.5.
  {
    const Step s0 = pair_step(1.0, 1.0, 1), s1 = pair_step(0.0, 0.0, 3);
    MetricAccumulator r0, r1;
    r0.add(tpo_of(s0), s0.inputs, s0.policy, gold_of(4.0, 1));
    r1.add(tpo_of(s1), s1.inputs, s1.policy, gold_of(0.0, 3));
    EXPECT_DOUBLE_EQ(MetricAccumulator::compute_ranks({&r0, &r1}).at("entropy"), 1.0);
  }
  // Without the gold responses, the pair's branches alone, still per rank: 1 token at 1 and
  // 3 tokens at 0 per branch give (1 + 0) / 2, where pooling would give 2 / 8.
  {
    const Step s0 = pair_step(1.0, 1.0, 1), s1 = pair_step(0.0, 0.0, 3);
    MetricAccumulator r0, r1;
    r0.add(tpo_of(s0), s0.inputs, s0.policy);
    r1.add(tpo_of(s1), s1.inputs, s1.policy);
    EXPECT_DOUBLE_EQ(MetricAccumulator::compute_ranks({&r0, &r1}).at("entropy"), 0.5);
  }
  // kCountWeighted (TRL has no such TPO window) pools the tokens, as for the other losses:
  // steps of 2 tokens per branch at 3 and 200 at 0 give 18 / 606, not the steps' mean 1.5.
  {
    const Step s0 = pair_step(3.0, 3.0, 2), s1 = pair_step(0.0, 0.0, 200);
    MetricAccumulator acc(MetricsOptions().window(MetricWindow::kCountWeighted));
    acc.add(tpo_of(s0), s0.inputs, s0.policy, gold_of(3.0, 2));
    acc.add(tpo_of(s1), s1.inputs, s1.policy, gold_of(0.0, 200));
    EXPECT_DOUBLE_EQ(acc.compute().at("entropy"), 18.0 / 606);
  }
  // CPO without an NLL term (cpo_alpha = 0: SimPO, AlphaPO): nll_loss = 0, as TRL logs it.
  {
    const Step s = pair_step(1.0, 1.0, 2);
    prefopt::CPOLossResult cpo;
    cpo.loss = s.result.loss;
    cpo.chosen_rewards = s.result.chosen_rewards;
    cpo.rejected_rewards = s.result.rejected_rewards;
    MetricAccumulator acc;
    acc.add(cpo, s.inputs);
    const auto m = acc.compute();
    ASSERT_TRUE(m.contains("nll_loss"));
    EXPECT_DOUBLE_EQ(m.at("nll_loss"), 0.0);
  }
}

TEST(Metrics, LogitsOverAllPositions) {
  // LLaMA-Factory / torchtune: every position's vocabulary mean, prompt and padding included.
  auto steps = two_steps();
  steps[0].policy.chosen.logits_sum_all = d({5.0, 1.0});
  steps[0].policy.chosen.positions = l({8, 8});
  steps[0].policy.rejected.logits_sum_all = d({-2.0, -2.0});
  steps[0].policy.rejected.positions = l({8, 8});
  steps[1].policy.chosen.logits_sum_all = d({1.0, 1.0, 1.0});
  steps[1].policy.chosen.positions = l({4, 4, 4});
  steps[1].policy.rejected.logits_sum_all = d({0.0, 3.0, 0.0});
  steps[1].policy.rejected.positions = l({4, 4, 4});
  for (auto window : {MetricWindow::kMeanOfSteps, MetricWindow::kCountWeighted}) {
    MetricAccumulator acc(
        MetricsOptions().window(window).logits(prefopt::LogitsMetric::kAllPositions));
    for (const auto& s : steps) acc.add(s.result, s.inputs, s.policy);
    const auto m = acc.compute();
    if (window == MetricWindow::kMeanOfSteps) {
      EXPECT_DOUBLE_EQ(m.at("logits/chosen"), (6.0 / 16 + 3.0 / 12) / 2);
      EXPECT_DOUBLE_EQ(m.at("logits/rejected"), (-4.0 / 16 + 3.0 / 12) / 2);
    } else {
      EXPECT_DOUBLE_EQ(m.at("logits/chosen"), (6.0 + 3.0) / (16 + 12));
      EXPECT_DOUBLE_EQ(m.at("logits/rejected"), (-4.0 + 3.0) / (16 + 12));
    }
  }
}

TEST(Metrics, WithoutTokenStatisticsOnlyPairMetrics) {
  const auto m = run(two_steps(), MetricWindow::kMeanOfSteps, false);
  EXPECT_FALSE(m.contains("logits/chosen"));
  EXPECT_FALSE(m.contains("entropy"));
  EXPECT_FALSE(m.contains("num_tokens"));  // no lengths in the inputs
  EXPECT_TRUE(m.contains("rewards/margins"));
  // With lengths, num_tokens counts them.
  auto steps = two_steps();
  MetricAccumulator acc;
  acc.add(steps[0].result, steps[0].inputs.chosen_lengths(l({2, 3})).rejected_lengths(l({1, 1})));
  EXPECT_DOUBLE_EQ(acc.compute().at("num_tokens"), 7);
}

// The README's form: inputs built from the policy's log-probs (so they carry its token counts
// as lengths) and the same log-probs for the token metrics. Each token counts once; before
// 2026-12-07 the lengths and the counts were both added, doubling num_tokens.
TEST(Metrics, NumTokensCountsEachTokenOnce) {
  auto steps = two_steps();
  MetricAccumulator acc;
  for (auto& s : steps) {
    s.inputs.chosen_lengths(s.policy.chosen.count).rejected_lengths(s.policy.rejected.count);
    acc.add(s.result, s.inputs, s.policy);
  }
  EXPECT_DOUBLE_EQ(acc.compute().at("num_tokens"), 5 + 2 + 6 + 6);
  // The same through each pairwise loss's overload, and PairInputs(policy) itself.
  const prefopt::PairInputs from_policy(steps[1].policy);
  ASSERT_TRUE(from_policy.chosen_lengths().defined());
  prefopt::CPOLossResult cpo;
  cpo.loss = steps[1].result.loss;
  cpo.chosen_rewards = steps[1].result.chosen_rewards;
  cpo.rejected_rewards = steps[1].result.rejected_rewards;
  acc.add(cpo, from_policy, steps[1].policy);
  EXPECT_DOUBLE_EQ(acc.compute().at("num_tokens"), 19 + 12);
  prefopt::ORPOLossResult orpo;
  orpo.loss = steps[1].result.loss;
  orpo.chosen_rewards = steps[1].result.chosen_rewards;
  orpo.rejected_rewards = steps[1].result.rejected_rewards;
  acc.add(orpo, from_policy, steps[1].policy);
  EXPECT_DOUBLE_EQ(acc.compute().at("num_tokens"), 19 + 12 + 12);
}

TEST(Metrics, AccuraciesNeverExceedOne) {
  MetricAccumulator mos, cw(MetricsOptions().window(MetricWindow::kCountWeighted));
  for (int i = 0; i < 8; ++i) {
    auto s =
        dpo_step(0.1, d({1.0, 2.0, 3.0}), d({0.0, 1.0, 2.0}), d({-1, -1, -1}), d({-2, -2, -2}));
    mos.add(s.result, s.inputs);
    cw.add(s.result, s.inputs);
  }
  EXPECT_EQ(mos.compute().at("rewards/accuracies"), 1.0);
  EXPECT_EQ(cw.compute().at("rewards/accuracies"), 1.0);
}

TEST(Metrics, KtoWindowsDisagreeByHand) {
  // Step 1: 3 desirable, 1 undesirable; step 2: 1 desirable, 2 undesirable.
  const auto kto = [](at::Tensor rc, at::Tensor rr, double kl) {
    prefopt::KTOLossResult r;
    r.loss = at::scalar_tensor(0.5, at::kDouble);
    r.chosen_rewards = rc;
    r.rejected_rewards = rr;
    r.kl = at::scalar_tensor(kl, at::kDouble);
    return r;
  };
  const auto in = [](at::Tensor pc, at::Tensor pr) {
    return prefopt::KTOInputs().policy_chosen_logps(pc).policy_rejected_logps(pr);
  };
  const auto fill = [&](MetricAccumulator& acc) {
    acc.add(kto(d({1, 2, 3}), d({-1}), 0.2), in(d({-3, -4, -5}), d({-9})));
    acc.add(kto(d({5}), d({-2, -4}), 0.4), in(d({-1}), d({-7, -8})));
  };
  MetricAccumulator mos, cw(MetricsOptions().window(MetricWindow::kCountWeighted));
  fill(mos);
  fill(cw);
  const auto a = mos.compute(), b = cw.compute();
  EXPECT_DOUBLE_EQ(a.at("rewards/chosen"), (2.0 + 5.0) / 2);
  EXPECT_DOUBLE_EQ(b.at("rewards/chosen"), 11.0 / 4);
  EXPECT_DOUBLE_EQ(a.at("rewards/rejected"), (-1.0 + -3.0) / 2);
  EXPECT_DOUBLE_EQ(b.at("rewards/rejected"), -7.0 / 3);
  EXPECT_DOUBLE_EQ(a.at("rewards/margins"), ((2.0 + 1.0) + (5.0 + 3.0)) / 2);
  EXPECT_DOUBLE_EQ(b.at("rewards/margins"), 11.0 / 4 + 7.0 / 3);
  EXPECT_DOUBLE_EQ(a.at("logps/chosen"), (-4.0 + -1.0) / 2);
  EXPECT_DOUBLE_EQ(b.at("logps/chosen"), -13.0 / 4);
  EXPECT_DOUBLE_EQ(a.at("kl"), 0.3);
  EXPECT_DOUBLE_EQ(b.at("kl"), 0.3);
  EXPECT_FALSE(a.contains("rewards/accuracies"));  // unpaired: TRL logs none
}

TEST(Metrics, KtoEmptySidesContributeNothing) {
  const auto o = at::TensorOptions().dtype(at::kDouble);
  const auto step = [&](at::Tensor pc, at::Tensor pr) {
    const auto in = prefopt::KTOInputs()
                        .policy_chosen_logps(pc)
                        .policy_rejected_logps(pr)
                        .reference_chosen_logps(at::zeros_like(pc))
                        .reference_rejected_logps(at::zeros_like(pr));
    return std::make_pair(F::kto_loss(in), in);
  };
  MetricAccumulator acc;
  // Step 1 has no undesirable example, step 2 no desirable one.
  auto [r1, i1] = step(d({-1.0, -3.0}), at::empty({0}, o));
  auto [r2, i2] = step(at::empty({0}, o), d({-2.0}));
  acc.add(r1, i1);
  acc.add(r2, i2);
  const auto m = acc.compute();
  EXPECT_DOUBLE_EQ(m.at("rewards/chosen"), 0.1 * -2.0);
  EXPECT_DOUBLE_EQ(m.at("rewards/rejected"), 0.1 * -2.0);
  EXPECT_FALSE(m.contains("rewards/margins"));  // no micro-step had both sides
  for (const auto& [name, value] : m) EXPECT_TRUE(std::isfinite(value)) << name;
  // A window with no undesirable examples at all: no rejected metrics, no NaN.
  MetricAccumulator only_chosen(MetricsOptions().window(MetricWindow::kCountWeighted));
  only_chosen.add(r1, i1);
  const auto c = only_chosen.compute();
  EXPECT_TRUE(c.contains("rewards/chosen"));
  EXPECT_FALSE(c.contains("rewards/rejected"));
  EXPECT_FALSE(c.contains("logps/rejected"));
  EXPECT_FALSE(c.contains("rewards/margins"));
}

TEST(Metrics, OrpoAndCpoExtras) {
  prefopt::ORPOLossResult r;
  r.loss = at::scalar_tensor(1.5, at::kDouble);
  r.chosen_rewards = d({-0.1, -0.2});
  r.rejected_rewards = d({-0.3, -0.1});
  r.log_odds_ratio = d({-0.5, -0.7});
  r.log_odds_chosen = d({0.4, 0.2});
  r.nll_loss = at::scalar_tensor(1.2, at::kDouble);
  const auto in =
      prefopt::PairInputs().policy_chosen_logps(d({-1, -2})).policy_rejected_logps(d({-3, -1}));
  MetricAccumulator acc(MetricsOptions().prefix("eval_"));
  acc.add(r, in);
  const auto m = acc.compute();
  EXPECT_DOUBLE_EQ(m.at("eval_log_odds_ratio"), -0.6);
  EXPECT_DOUBLE_EQ(m.at("eval_log_odds_chosen"), 0.3);
  EXPECT_DOUBLE_EQ(m.at("eval_nll_loss"), 1.2);
  EXPECT_DOUBLE_EQ(m.at("eval_rewards/accuracies"), 0.5);
  EXPECT_FALSE(m.contains("loss"));
  prefopt::CPOLossResult c{r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, r.nll_loss,
                           {},     {}};
  MetricAccumulator acc2;
  acc2.add(c, in);
  EXPECT_DOUBLE_EQ(acc2.compute().at("nll_loss"), 1.2);
}

// TRL 1.16's CPOTrainer and ORPOTrainer log `gather_for_metrics(x.mean()).mean()` for
// `logits/*` (every position) and ORPO's `log_odds_*` (`torch.mean` per rank): the mean of the
// ranks' means. These used to pool the ranks' positions and pairs.
TEST(Metrics, CpoAndOrpoAverageTheRanksMeans) {
  // Rank 0: 1 pair; rank 1: 3 pairs, so pooling and the mean of the means differ.
  const auto orpo = [](at::Tensor ratio, at::Tensor chosen) {
    prefopt::ORPOLossResult r;
    r.loss = at::scalar_tensor(1.0, at::kDouble);
    r.nll_loss = at::scalar_tensor(0.5, at::kDouble);
    r.chosen_rewards = at::zeros({ratio.numel()}, at::kDouble);
    r.rejected_rewards = at::zeros({ratio.numel()}, at::kDouble);
    r.log_odds_ratio = ratio;
    r.log_odds_chosen = chosen;
    return r;
  };
  const auto inputs = [](int64_t n) {
    return prefopt::PairInputs()
        .policy_chosen_logps(at::zeros({n}, at::kDouble))
        .policy_rejected_logps(at::zeros({n}, at::kDouble));
  };
  // Every position's vocabulary-mean logit: rank 0 chosen 2 / 4, rejected −4 / 4; rank 1
  // chosen 0 / 24, rejected 24 / 24.
  const auto policy = [](at::Tensor c_sum, at::Tensor c_pos, at::Tensor r_sum, at::Tensor r_pos) {
    prefopt::PairLogprobs p;
    p.chosen.count = c_pos.clone();
    p.chosen.logits_sum_all = c_sum;
    p.chosen.positions = c_pos;
    p.rejected.count = r_pos.clone();
    p.rejected.logits_sum_all = r_sum;
    p.rejected.positions = r_pos;
    return p;
  };
  const auto r0 = orpo(d({-0.5}), d({1.0}));
  const auto r1 = orpo(d({-1.0, -2.0, -3.0}), d({0.0, 0.5, 1.0}));
  const auto p0 = policy(d({2.0}), l({4}), d({-4.0}), l({4}));
  const auto p1 = policy(d({0.0, 0.0, 0.0}), l({8, 8, 8}), d({24.0, 0.0, 0.0}), l({8, 8, 8}));
  const auto all = MetricsOptions().logits(prefopt::LogitsMetric::kAllPositions);
  {
    MetricAccumulator a(all), b(all);
    a.add(r0, inputs(1), p0);
    b.add(r1, inputs(3), p1);
    const auto m = MetricAccumulator::compute_ranks({&a, &b});
    EXPECT_DOUBLE_EQ(m.at("log_odds_ratio"), (-0.5 + -2.0) / 2);  // pooled: −6.5 / 4
    EXPECT_DOUBLE_EQ(m.at("log_odds_chosen"), (1.0 + 0.5) / 2);   // pooled: 2.5 / 4
    EXPECT_DOUBLE_EQ(m.at("logits/chosen"), (0.5 + 0.0) / 2);     // pooled: 2 / 28
    EXPECT_DOUBLE_EQ(m.at("logits/rejected"), (-1.0 + 1.0) / 2);  // pooled: 20 / 28
    EXPECT_DOUBLE_EQ(m.at("nll_loss"), 0.5);
    EXPECT_DOUBLE_EQ(m.at("rewards/chosen"), 0.0);  // per-example metrics still pool
  }
  // CPO (SimPO with the same statistics): logits/* likewise.
  {
    const auto cpo = [](const prefopt::ORPOLossResult& r) {
      return prefopt::CPOLossResult{
          r.loss, r.losses, r.chosen_rewards, r.rejected_rewards, r.nll_loss, {}, {}};
    };
    MetricAccumulator a(all), b(all);
    a.add(cpo(r0), inputs(1), p0);
    b.add(cpo(r1), inputs(3), p1);
    const auto m = MetricAccumulator::compute_ranks({&a, &b});
    EXPECT_DOUBLE_EQ(m.at("logits/chosen"), 0.25);
    EXPECT_DOUBLE_EQ(m.at("logits/rejected"), 0.0);
  }
  // Two micro-steps: each step's mean of the ranks' means, then the steps' mean. In the second
  // step rank 1 has no pair: left out (TRL: NaN), so the step's value is rank 0's −1.
  {
    MetricAccumulator a(all), b(all);
    a.add(r0, inputs(1));
    b.add(r1, inputs(3));
    a.add(orpo(d({-1.0, -1.0}), d({2.0, 4.0})), inputs(2));
    b.add(orpo(d({}), d({})), inputs(0));
    const auto m = MetricAccumulator::compute_ranks({&a, &b});
    EXPECT_DOUBLE_EQ(m.at("log_odds_ratio"), (-1.25 + -1.0) / 2);
    EXPECT_DOUBLE_EQ(m.at("log_odds_chosen"), (0.75 + 3.0) / 2);
  }
  // kCountWeighted (TRL has no such window for CPO/ORPO) pools over the ranks, as documented,
  // and so does the scored-token form under either window (it has no TRL counterpart).
  {
    const auto pooled = MetricsOptions()
                            .logits(prefopt::LogitsMetric::kAllPositions)
                            .window(MetricWindow::kCountWeighted);
    MetricAccumulator a(pooled), b(pooled);
    a.add(r0, inputs(1), p0);
    b.add(r1, inputs(3), p1);
    const auto m = MetricAccumulator::compute_ranks({&a, &b});
    EXPECT_DOUBLE_EQ(m.at("log_odds_ratio"), -6.5 / 4);
    EXPECT_DOUBLE_EQ(m.at("log_odds_chosen"), 2.5 / 4);
    EXPECT_DOUBLE_EQ(m.at("logits/chosen"), 2.0 / 28);
    EXPECT_DOUBLE_EQ(m.at("logits/rejected"), 20.0 / 28);
  }
  {
    auto q0 = p0, q1 = p1;
    q0.chosen.logits_sum = q0.chosen.logits_sum_all;
    q0.rejected.logits_sum = q0.rejected.logits_sum_all;
    q1.chosen.logits_sum = q1.chosen.logits_sum_all;
    q1.rejected.logits_sum = q1.rejected.logits_sum_all;
    MetricAccumulator a, b;
    a.add(r0, inputs(1), q0);
    b.add(r1, inputs(3), q1);
    const auto m = MetricAccumulator::compute_ranks({&a, &b});
    EXPECT_DOUBLE_EQ(m.at("logits/chosen"), 2.0 / 28);
    EXPECT_DOUBLE_EQ(m.at("logits/rejected"), 20.0 / 28);
  }
}

TEST(Metrics, MatchesTheLossOutputs) {
  const auto o = at::TensorOptions().dtype(at::kDouble);
  at::manual_seed(3);
  const auto pc = -20 + at::randn({16}, o), pr = -22 + at::randn({16}, o);
  const auto rc = -21 + at::randn({16}, o), rr = -21 + at::randn({16}, o);
  const auto r = F::dpo_loss(pc, pr, rc, rr);
  MetricAccumulator acc;
  acc.add(r, prefopt::PairInputs().policy_chosen_logps(pc).policy_rejected_logps(pr));
  const auto m = acc.compute();
  EXPECT_NEAR(m.at("loss"), r.loss.item<double>(), 1e-15);
  EXPECT_NEAR(m.at("rewards/chosen"), (0.1 * (pc - rc)).mean().item<double>(), 1e-14);
  EXPECT_NEAR(m.at("rewards/margins"), (0.1 * ((pc - rc) - (pr - rr))).mean().item<double>(),
              1e-14);
  EXPECT_NEAR(m.at("rewards/accuracies"),
              (pc - rc).gt(pr - rr).to(at::kDouble).mean().item<double>(), 0);
  EXPECT_NEAR(m.at("logps/rejected"), pr.mean().item<double>(), 1e-12);
  // compute() starts a new window.
  EXPECT_EQ(acc.steps(), 0);
  EXPECT_TRUE(acc.compute().empty());
}

TEST(Metrics, ScalarsAndNumTokensAcrossWindows) {
  MetricAccumulator acc;
  acc.add_scalar("grad_norm", 2.0);  // before the step's add: joins it
  auto s = two_steps();
  acc.add(s[0].result, s[0].inputs, s[0].policy);
  acc.add_scalar("aux_loss", at::scalar_tensor(0.25));
  acc.add(s[1].result, s[1].inputs, s[1].policy);
  acc.add_scalar("grad_norm", 4.0);
  auto m = acc.compute();
  EXPECT_EQ(acc.steps(), 0);
  EXPECT_DOUBLE_EQ(m.at("grad_norm"), 3.0);
  EXPECT_DOUBLE_EQ(m.at("aux_loss"), 0.25);
  EXPECT_DOUBLE_EQ(m.at("num_tokens"), 7 + 12);
  EXPECT_EQ(names(m).back(), "aux_loss");  // custom metrics follow the built-in ones
  acc.add(s[1].result, s[1].inputs, s[1].policy);
  EXPECT_DOUBLE_EQ(acc.compute().at("num_tokens"), 7 + 12 + 12);  // a running total
  PREFOPT_EXPECT_THROWS_WITH(acc.add_scalar("rewards/chosen", 1.0), "built-in per-example");
  PREFOPT_EXPECT_THROWS_WITH(acc.add_scalar("x", at::ones({2})), "one-element tensor");
  PREFOPT_EXPECT_THROWS_WITH(m.at("nope"), "no metric named 'nope'");
}

// A host's own `loss` through add_scalar, in a micro-step whose add logs its loss too, was
// averaged with it (100 and 0.644 logged as 50.3).
TEST(Metrics, BuiltinScalarsFromAddScalarDoNotMixWithAdd) {
  auto s = two_steps();
  MetricAccumulator acc;
  acc.add(s[0].result, s[0].inputs, s[0].policy);
  PREFOPT_EXPECT_THROWS_WITH(acc.add_scalar("loss", 100.0),
                             "prefopt::MetricAccumulator::add_scalar: 'loss' is logged by this "
                             "micro-step's add already");
  acc.add_scalar("kl", 0.5);  // a DPO add logs no kl: the host's own
  acc.add_scalar("kl", 1.5);  // another sample of it, not the add's
  const auto m = acc.compute();
  EXPECT_NEAR(m.at("loss"), s[0].result.loss.item<double>(), 1e-15);
  EXPECT_DOUBLE_EQ(m.at("kl"), 1.0);
  acc.add_scalar("loss", 100.0);  // opens the micro-step the next add fills
  PREFOPT_EXPECT_THROWS_WITH(acc.add(s[0].result, s[0].inputs, s[0].policy),
                             "prefopt::MetricAccumulator::add: 'loss' came from add_scalar in "
                             "this micro-step, and this add logs its own");
  // Without add, repeated add_scalar("loss") calls are the window's samples (a host's loss).
  acc.add_scalar("loss", 2.0);
  EXPECT_DOUBLE_EQ(acc.compute().at("loss"), 51.0);
}

TEST(Metrics, SftStepsByHand) {
  // Two SFT micro-steps: loss per step, token metrics token-weighted, no pair metrics, and no
  // logits/* even when the log-probs carry them (SFTTrainer does not log them).
  prefopt::SequenceLogprobs a, b;
  a.count = l({3, 1});
  a.correct = l({2, 1});
  a.entropy_sum = d({3.0, 1.0});
  a.logits_sum = d({1.0, 1.0});
  b.count = l({2});
  b.correct = l({1});
  b.entropy_sum = d({0.4});
  MetricAccumulator acc;
  acc.add(at::scalar_tensor(2.0), a);
  acc.add_scalar("grad_norm", 1.0);
  acc.add(at::scalar_tensor(1.0, at::kDouble).view({1}), b);
  const auto m = acc.compute();
  EXPECT_EQ(names(m), (std::vector<std::string>{"loss", "entropy", "mean_token_accuracy",
                                                "num_tokens", "grad_norm"}));
  EXPECT_DOUBLE_EQ(m.at("loss"), 1.5);
  // Each step's tokens pooled, then the mean of the steps (TRL's SFTTrainer and log()): 3 / 4
  // and 1 / 2, where pooling the window would give 4 / 6.
  EXPECT_DOUBLE_EQ(m.at("mean_token_accuracy"), (3.0 / 4 + 1.0 / 2) / 2);
  EXPECT_DOUBLE_EQ(m.at("entropy"), (4.0 / 4 + 0.4 / 2) / 2);
  EXPECT_DOUBLE_EQ(m.at("num_tokens"), 6.0);
  PREFOPT_EXPECT_THROWS_WITH(acc.add(at::ones({2}), a), "one-element SFT loss");
  PREFOPT_EXPECT_THROWS_WITH(acc.add(at::ones({}), prefopt::SequenceLogprobs{}), "no token counts");
}

TEST(Metrics, BadPairsAreRejected) {
  auto s = dpo_step(0.1, d({1.0, 2.0}), d({0.0}), d({-1, -1}), d({-2}));
  MetricAccumulator acc;
  PREFOPT_EXPECT_THROWS_WITH(acc.add(s.result, s.inputs), "as many chosen as rejected");
  // The refused micro-step left nothing behind (it used to leave a step holding its rewards).
  EXPECT_EQ(acc.steps(), 0);
  EXPECT_TRUE(acc.compute().empty());
}

// Token statistics hold one value per sequence, one sequence per reward of their side: sizes
// that disagree used to be summed regardless (mean_token_accuracy 8.3 from prefopt-eval). A
// refused add leaves the window as it was.
TEST(Metrics, TokenStatisticsOfTheWrongSizeAreRefused) {
  MetricAccumulator acc;
  const auto good = two_steps()[0];
  acc.add(good.result, good.inputs, good.policy);
  const auto refused = [&](auto&& add, const char* message) {
    PREFOPT_EXPECT_THROWS_WITH(add(), message);
    EXPECT_EQ(acc.steps(), 1) << message;
  };
  auto s = two_steps()[0];
  s.policy.chosen.correct = l({1, 3, 3});
  refused([&] { acc.add(s.result, s.inputs, s.policy); },
          "prefopt::MetricAccumulator::add: expected the chosen log-probs' correct to hold one "
          "value per sequence, as their count does (2), got 3");
  s = two_steps()[0];
  s.policy.rejected.entropy_sum = d({1.0});
  refused([&] { acc.add(s.result, s.inputs, s.policy); }, "rejected log-probs' entropy_sum");
  // Counts of one sequence for a step of two pairs.
  s = two_steps()[0];
  s.policy.chosen.count = l({5});
  s.policy.chosen.logits_sum = d({3.0});
  s.policy.chosen.entropy_sum = d({10.0});
  s.policy.chosen.correct = l({4});
  refused([&] { acc.add(s.result, s.inputs, s.policy); },
          "expected the chosen log-probs of one sequence per chosen reward (2), got 1");
  // The unmasked logits statistics, without counts.
  prefopt::SequenceLogprobs all;
  all.logits_sum_all = d({1.0, 2.0});
  all.positions = l({4});
  refused(
      [&] {
        acc.add(s.result, s.inputs, prefopt::PairLogprobs{all, all});
      },
      "logits_sum_all to hold one value per sequence, as their positions does (1), got 2");
  // KTO, SFT and TPO's gold responses alike.
  prefopt::KTOLossResult kto;
  kto.loss = at::scalar_tensor(0.5, at::kDouble);
  kto.chosen_rewards = d({0.1, 0.2});
  kto.rejected_rewards = d({-0.1});
  const auto kin =
      prefopt::KTOInputs().policy_chosen_logps(d({-1, -2})).policy_rejected_logps(d({-3}));
  prefopt::SequenceLogprobs one;
  one.count = l({2});
  refused([&] { acc.add(kto, kin, one, one); },
          "expected the chosen log-probs of one sequence per chosen reward (2), got 1");
  one.correct = l({1, 1});
  refused([&] { acc.add(at::scalar_tensor(1.0), one); }, "SFT log-probs' correct");
  prefopt::TPOLossResult tpo;
  tpo.loss = good.result.loss;
  tpo.chosen_rewards = good.result.chosen_rewards;
  tpo.rejected_rewards = good.result.rejected_rewards;
  refused([&] { acc.add(tpo, good.inputs, good.policy, one); }, "gold log-probs' correct");
  const auto m = acc.compute();
  EXPECT_DOUBLE_EQ(m.at("rewards/chosen"), 0.25);
  EXPECT_DOUBLE_EQ(m.at("mean_token_accuracy"), 4.0 / 5);
  EXPECT_DOUBLE_EQ(m.at("num_tokens"), 7);
}

TEST(MetricsFmt, LineAndTable) {
  Metrics m;
  m.set("loss", 0.6931471805599453);
  m.set("rewards/accuracies", 0.75);
  m.set("num_tokens", 1234);
  EXPECT_EQ(fmt::format("{}", m), "loss=0.693147 rewards/accuracies=0.75 num_tokens=1234");
  EXPECT_EQ(fmt::format("{:.3}", m), "loss=0.693 rewards/accuracies=0.75 num_tokens=1.23e+03");
  EXPECT_EQ(fmt::format("{:t}", m),
            "loss                     0.693147\n"
            "rewards/accuracies           0.75\n"
            "num_tokens                   1234");
  m.set("loss", 0.5);  // replaced in place
  EXPECT_EQ(fmt::format("{:l.2}", m), "loss=0.5 rewards/accuracies=0.75 num_tokens=1.2e+03");
}

TEST(MetricsJsonl, AppendsOneObjectPerLine) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("prefopt_jsonl_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = (dir / "metrics.jsonl").string();
  {
    std::ofstream(path) << "{\"step\":0}\n";  // an earlier run's line stays
  }
  Metrics m;
  m.set("loss", 0.1);
  m.set("eval_rewards/chosen", -0.25);
  m.set("kl", std::numeric_limits<double>::quiet_NaN());
  {
    prefopt::JsonlWriter w(path);
    w.write(10, m);
    // Flushed per line: visible before the writer closes.
    std::ifstream in(path);
    std::string a, b;
    std::getline(in, a);
    std::getline(in, b);
    EXPECT_EQ(a, "{\"step\":0}");
    const auto j = nlohmann::json::parse(b);
    EXPECT_EQ(j["step"], 10);
    EXPECT_DOUBLE_EQ(j["loss"].get<double>(), 0.1);
    EXPECT_DOUBLE_EQ(j["eval_rewards/chosen"].get<double>(), -0.25);
    EXPECT_TRUE(j["kl"].is_null());
    prefopt::JsonlWriter moved = std::move(w);
    moved.write(11, m);
  }
  std::ifstream in(path);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) ++lines;
  EXPECT_EQ(lines, 3);
  EXPECT_EQ(prefopt::to_json(1, Metrics()), "{\"step\":1}");
  // Keys keep the metrics' order.
  EXPECT_EQ(prefopt::to_json(2, m).substr(0, 20), "{\"step\":2,\"loss\":0.1");
  PREFOPT_EXPECT_THROWS_WITH(prefopt::JsonlWriter((dir / "no/such/dir/x.jsonl").string()),
                             "cannot open");
  std::filesystem::remove_all(dir);
  // With sync, a failed fsync is an error (it was ignored): /dev/null cannot be synced.
  prefopt::JsonlWriter(std::string("/dev/null")).write(1, m);
  PREFOPT_EXPECT_THROWS_WITH(prefopt::JsonlWriter("/dev/null", true).write(1, m),
                             "prefopt::JsonlWriter::write: the line was written to '/dev/null', "
                             "but fsync failed: Invalid argument");
}

// Issue #20: a name that is not UTF-8 is a named error, not nlohmann-json's type_error.
TEST(MetricsJsonl, InvalidUtf8NameIsANamedError) {
  Metrics m;
  m.set("loss", 0.5);
  m.set("bad\xff", 1.0);
  PREFOPT_EXPECT_THROWS_WITH(prefopt::to_json(1, m),
                             "prefopt::to_json: expected metric names (prefix included) in UTF-8");
  MetricAccumulator acc(MetricsOptions().prefix("eval\xfe/"));
  acc.add_scalar("loss", 1.0);
  PREFOPT_EXPECT_THROWS_WITH(prefopt::to_json(1, acc.compute()), "got \"eval\xef\xbf\xbd/loss\"");
  const auto path = (std::filesystem::temp_directory_path() /
                     ("prefopt_utf8_" + std::to_string(::getpid()) + ".jsonl"))
                        .string();
  {
    prefopt::JsonlWriter w(path);
    PREFOPT_EXPECT_THROWS_WITH(w.write(1, m), "prefopt::JsonlWriter::write: expected metric names");
  }
  EXPECT_EQ(std::filesystem::file_size(path), 0u);
  std::filesystem::remove(path);
}

// Issue #20: a write cut short by RLIMIT_FSIZE (as by a full disk) leaves no partial line for
// the next append to glue onto, and throws naming the writer.
TEST(MetricsJsonl, ShortWriteLeavesOnlyCompleteLines) {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("prefopt_fsize_" + std::to_string(::getpid()) + ".jsonl"))
                        .string();
  std::filesystem::remove(path);
  Metrics m;
  m.set("loss", 0.125);
  m.set("rewards/margins", 2.5);
  prefopt::JsonlWriter w(path);
  w.write(1, m);
  const auto size = std::filesystem::file_size(path);
  {
    // The limit lets 10 bytes of the next line through; SIGXFSZ ignored so that the write
    // returns short (and the one after fails with EFBIG) instead of killing the process.
    struct rlimit old {};
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
    struct rlimit lim = old;
    lim.rlim_cur = static_cast<rlim_t>(size + 10);
    auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
    bool threw = false;
    try {
      w.write(2, m);
    } catch (const c10::Error& e) {
      threw = true;
      EXPECT_NE(std::string(e.what_without_backtrace()).find("prefopt::JsonlWriter::write: "),
                std::string::npos)
          << e.what_without_backtrace();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    EXPECT_TRUE(threw);
  }
  EXPECT_EQ(std::filesystem::file_size(path), size);
  w.write(3, m);
  std::ifstream in(path);
  std::string line;
  std::vector<int64_t> steps;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(j.is_object()) << "not a complete line: " << line;
    steps.push_back(j["step"].get<int64_t>());
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 3}));
  std::filesystem::remove(path);
}

// Issue #16, item 5: two micro-steps of 1 and 3 chosen tokens. TRL averages the per-step
// values (−0.8 and −0.0333…: −0.4167); pooling the window gives (−0.8 − 0.1) / 4 = −0.225.
TEST(Metrics, TokenMetricsPerMicroStepUnderMeanOfSteps) {
  auto step = [](double logits, int64_t tokens) {
    Step s = dpo_step(0.5, d({0.1}), d({0.0}), d({-2}), d({-3}));
    s.policy.chosen.count = l({tokens});
    s.policy.chosen.logits_sum = d({logits});
    s.policy.chosen.entropy_sum = d({1.5 * static_cast<double>(tokens)});
    s.policy.chosen.correct = l({tokens});
    s.policy.rejected.count = l({tokens});
    s.policy.rejected.logits_sum = d({0.0});
    s.policy.rejected.entropy_sum = d({0.5 * static_cast<double>(tokens)});
    s.policy.rejected.correct = l({0});
    return s;
  };
  const std::vector<Step> steps = {step(-0.8, 1), step(-0.1, 3)};
  const auto mos = run(steps, MetricWindow::kMeanOfSteps, true);
  const auto cw = run(steps, MetricWindow::kCountWeighted, true);
  EXPECT_DOUBLE_EQ(mos.at("logits/chosen"), (-0.8 / 1 + -0.1 / 3) / 2);
  EXPECT_DOUBLE_EQ(cw.at("logits/chosen"), (-0.8 - 0.1) / 4);
  // entropy over both sides: 1.0 per token in each step; accuracy of the chosen side: 1.
  EXPECT_DOUBLE_EQ(mos.at("entropy"), 1.0);
  EXPECT_DOUBLE_EQ(mos.at("mean_token_accuracy"), 1.0);
  EXPECT_DOUBLE_EQ(cw.at("mean_token_accuracy"), 1.0);
}

// Issue #16: a metric whose statistic was not gathered is left out with a warning that names
// the gather option.
TEST(Metrics, MissingTokenStatisticsWarnNamingTheOption) {
  auto steps = two_steps();
  for (auto& s : steps) {
    s.policy.chosen.entropy_sum = s.policy.rejected.entropy_sum = at::Tensor();
    s.policy.chosen.logits_sum = s.policy.rejected.logits_sum = at::Tensor();
    s.policy.chosen.correct = s.policy.rejected.correct = at::Tensor();
  }
  prefopt::detail::WarningCapture warnings;
  const auto m = run(steps, MetricWindow::kMeanOfSteps, true);
  EXPECT_FALSE(m.contains("entropy"));
  EXPECT_FALSE(m.contains("logits/chosen"));
  EXPECT_FALSE(m.contains("mean_token_accuracy"));
  EXPECT_TRUE(warnings.contains("entropy is not logged") &&
              warnings.contains("with_entropy(true)"));
  EXPECT_TRUE(warnings.contains("logits/chosen and logits/rejected are not logged") &&
              warnings.contains("with_logits_mean(true)"));
  EXPECT_TRUE(warnings.contains("mean_token_accuracy is not logged") &&
              warnings.contains("with_token_accuracy(true)"));
}

// logps/* are the log-probs the loss consumed (the result's), not the raw inputs: a loss fed
// sums that consumes means logs the means.
TEST(Metrics, LogpsAreWhatTheLossConsumed) {
  const auto in = prefopt::PairInputs()
                      .policy_chosen_logps(d({-6.0, -3.0}))
                      .policy_rejected_logps(d({-8.0, -9.0}))
                      .chosen_lengths(l({3, 1}))
                      .rejected_lengths(l({2, 3}))
                      .logps_form(prefopt::LogpsForm::kSum);
  const auto r = F::simpo_loss(in);
  MetricAccumulator acc;
  acc.add(r, in);
  const auto m = acc.compute();
  EXPECT_DOUBLE_EQ(m.at("logps/chosen"), (-2.0 - 3.0) / 2);
  EXPECT_DOUBLE_EQ(m.at("logps/rejected"), (-4.0 - 3.0) / 2);
}

// Ranks reduced in one process equal the pooled window; a layout that differs is refused.
TEST(Metrics, ComputeRanksPoolsLikeTheAllReduce) {
  auto steps = two_steps();
  MetricAccumulator r0, r1, both;
  // Rank 0 gets the first pair of each step, rank 1 the rest; `both` sees all of it as one
  // rank with the same calls.
  const auto half = [](const Step& s, int64_t from, int64_t len) {
    Step h = dpo_step(s.result.loss.item<double>(), s.result.chosen_rewards.narrow(0, from, len),
                      s.result.rejected_rewards.narrow(0, from, len),
                      s.inputs.policy_chosen_logps().narrow(0, from, len),
                      s.inputs.policy_rejected_logps().narrow(0, from, len));
    return h;
  };
  for (const auto& s : steps) {
    const int64_t n = s.result.chosen_rewards.numel();
    const auto a = half(s, 0, 1), b = half(s, 1, n - 1);
    r0.add(a.result, a.inputs);
    r1.add(b.result, b.inputs);
    both.add(s.result, s.inputs);
    r0.add_scalar("grad_norm", 1.0);
    r1.add_scalar("grad_norm", 3.0);
    both.add_scalar("grad_norm", 2.0);
  }
  const auto m = MetricAccumulator::compute_ranks({&r0, &r1});
  const auto ref = both.compute();
  for (const char* name : {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                           "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"})
    EXPECT_DOUBLE_EQ(m.at(name), ref.at(name)) << name;
  EXPECT_EQ(r0.steps(), 0);
  EXPECT_EQ(r1.steps(), 0);
  MetricAccumulator a, b;
  a.add(steps[0].result, steps[0].inputs);
  a.add_scalar("grad_norm", 1.0);
  b.add(steps[0].result, steps[0].inputs);
  b.add_scalar("aux_loss", 1.0);
  PREFOPT_EXPECT_THROWS_WITH(MetricAccumulator::compute_ranks({&a, &b}),
                             "rank 1 logs 'aux_loss' where rank 0 logs 'grad_norm'");
  // One accumulator passed twice used to return no metrics at all (it was cleared as rank 1
  // before it answered as rank 0).
  MetricAccumulator twice;
  twice.add(steps[0].result, steps[0].inputs);
  PREFOPT_EXPECT_THROWS_WITH(MetricAccumulator::compute_ranks({&twice, &twice}),
                             "accumulators 0 and 1 are the same object");
}

// TRL's entropy covers every completion token of the micro-step, both sides. A pairwise add
// given the chosen side's statistics alone used to log the chosen side's entropy (10 / 5 here,
// where TRL logs (10 + 2) / (5 + 2)) and no logits/rejected, without a word; a side with
// examples but no statistics is now refused, and the window is left as it was.
TEST(Metrics, EverySideWithExamplesNeedsItsTokenStatistics) {
  const auto full = two_steps()[0];
  MetricAccumulator acc;
  acc.add(full.result, full.inputs, full.policy);
  auto s = two_steps()[0];
  s.policy.rejected = prefopt::SequenceLogprobs{};
  PREFOPT_EXPECT_THROWS_WITH(acc.add(s.result, s.inputs, s.policy),
                             "prefopt::MetricAccumulator::add: expected the rejected log-probs' "
                             "token statistics (count, or positions), one sequence per rejected "
                             "reward (2), got none");
  s = two_steps()[0];
  s.policy.chosen = prefopt::SequenceLogprobs{};
  PREFOPT_EXPECT_THROWS_WITH(acc.add(s.result, s.inputs, s.policy),
                             "expected the chosen log-probs' token statistics");
  EXPECT_EQ(acc.steps(), 1);
  // Both sides: (4 + 6 + 1 + 1) / (2 + 3 + 1 + 1) by hand.
  EXPECT_DOUBLE_EQ(acc.compute().at("entropy"), 12.0 / 7);

  // KTO: a side without examples needs none; a side with examples does.
  prefopt::KTOLossResult kto;
  kto.loss = at::scalar_tensor(0.5, at::kDouble);
  kto.kl = at::scalar_tensor(0.0, at::kDouble);
  kto.chosen_rewards = d({0.1, 0.2});
  kto.rejected_rewards = d({-0.1});
  const auto kin =
      prefopt::KTOInputs().policy_chosen_logps(d({-1, -2})).policy_rejected_logps(d({-3}));
  prefopt::SequenceLogprobs chosen;
  chosen.count = l({2, 3});
  chosen.entropy_sum = d({1.0, 4.0});
  PREFOPT_EXPECT_THROWS_WITH(acc.add(kto, kin, chosen, prefopt::SequenceLogprobs{}),
                             "expected the rejected log-probs' token statistics");
  EXPECT_EQ(acc.steps(), 0);
  kto.rejected_rewards = at::empty({0}, at::kDouble);
  auto only_chosen = kin;
  only_chosen.policy_rejected_logps(at::empty({0}, at::kDouble));
  acc.add(kto, only_chosen, chosen, prefopt::SequenceLogprobs{});
  EXPECT_DOUBLE_EQ(acc.compute().at("entropy"), 5.0 / 5);
}

// A JSON object's keys are unique: a metric named "step" used to replace the line's step
// number ({"step":0.5,...} for step 7), so the log lost its step without a word.
TEST(MetricsJsonl, AMetricNamedStepIsRefused) {
  Metrics m;
  m.set("loss", 0.25);
  m.set("step", 0.5);
  PREFOPT_EXPECT_THROWS_WITH(prefopt::to_json(7, m),
                             "prefopt::to_json: a metric named 'step' would replace the line's "
                             "step (7)");
  const auto path = (std::filesystem::temp_directory_path() /
                     ("prefopt_step_" + std::to_string(::getpid()) + ".jsonl"))
                        .string();
  {
    prefopt::JsonlWriter w(path);
    PREFOPT_EXPECT_THROWS_WITH(w.write(7, m), "prefopt::JsonlWriter::write: a metric named 'step'");
  }
  EXPECT_EQ(std::filesystem::file_size(path), 0u);
  std::filesystem::remove(path);
  // Under a prefix it is another key.
  MetricAccumulator acc(MetricsOptions().prefix("eval_"));
  acc.add_scalar("step", 0.5);
  EXPECT_EQ(prefopt::to_json(7, acc.compute()), R"({"step":7,"eval_step":0.5})");
}
