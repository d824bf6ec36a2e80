// SPDX-License-Identifier: Apache-2.0
#pragma once
#include <prefopt/detail/check_enum.h>
#include <prefopt/metrics.h>

#include <prefopt/distributed.h>

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <sstream>

PREFOPT_BEGIN_NAMESPACE

// ----------------------------------------------------------------------------------- Metrics

PREFOPT_INLINE void Metrics::set(const std::string& name, double value) {
  for (auto& item : items_) {
    if (item.first == name) {
      item.second = value;
      return;
    }
  }
  items_.emplace_back(name, value);
}

PREFOPT_INLINE const double* Metrics::find(const std::string& name) const {
  for (const auto& item : items_)
    if (item.first == name) return &item.second;
  return nullptr;
}

PREFOPT_INLINE double Metrics::at(const std::string& name) const {
  if (const double* v = find(name)) return *v;
  std::ostringstream names;
  for (const auto& item : items_) names << (names.tellp() > 0 ? ", " : "") << item.first;
  TORCH_CHECK_INDEX(false, "prefopt::Metrics::at: no metric named '", name, "'; present: [",
                    names.str(), "]");
}

// ------------------------------------------------------------------------- MetricAccumulator

namespace detail {
namespace metrics {

// The built-in slots, in the order TRL logs them. Margins and num_tokens are derived at
// compute time but keep their place in the order.
enum Builtin : size_t {
  kLoss,
  kRewardsChosen,
  kRewardsRejected,
  kAccuracies,
  kMargins,
  kLogpsChosen,
  kLogpsRejected,
  kLogitsChosen,
  kLogitsRejected,
  kNLL,
  kLogOddsRatio,
  kLogOddsChosen,
  kKL,
  kEntropy,
  kTokenAccuracy,
  kNumTokens,
  kNumBuiltins,
};

constexpr const char* kBuiltinNames[kNumBuiltins] = {"loss",
                                                     "rewards/chosen",
                                                     "rewards/rejected",
                                                     "rewards/accuracies",
                                                     "rewards/margins",
                                                     "logps/chosen",
                                                     "logps/rejected",
                                                     "logits/chosen",
                                                     "logits/rejected",
                                                     "nll_loss",
                                                     "log_odds_ratio",
                                                     "log_odds_chosen",
                                                     "kl",
                                                     "entropy",
                                                     "mean_token_accuracy",
                                                     "num_tokens"};

constexpr bool kBuiltinScalar[kNumBuiltins] = {true,  false, false, false, false, false,
                                               false, false, false, true,  false, false,
                                               true,  false, false, false};

PREFOPT_INLINE at::Tensor as_double(const at::Tensor& t) { return t.detach().to(at::kDouble); }

PREFOPT_INLINE at::Tensor count_tensor(double n, const at::Tensor& like) {
  return at::scalar_tensor(n, like.options().dtype(at::kDouble));
}

// Before a micro-step is touched (so that a refused `add` leaves the window as it was): one
// value per pair, and one value of each token statistic per sequence of its side, as many as
// the side's counts (or `positions`, without counts) and, where the result has rewards for
// that side, as many as its rewards; a side with rewards has statistics. Shapes only: nothing
// is read from the device.
PREFOPT_INLINE void check_pairs(const at::Tensor& chosen_rewards,
                                const at::Tensor& rejected_rewards) {
  TORCH_CHECK(!chosen_rewards.defined() || !rejected_rewards.defined() ||
                  chosen_rewards.numel() == rejected_rewards.numel(),
              "prefopt::MetricAccumulator::add: expected as many chosen as rejected rewards, got ",
              chosen_rewards.numel(), " and ", rejected_rewards.numel());
}

PREFOPT_INLINE void check_tokens(const SequenceLogprobs& lp, const char* side,
                                 const at::Tensor& rewards = {}) {
  constexpr const char* fn = "prefopt::MetricAccumulator::add";
  const bool counted = lp.count.defined();
  const at::Tensor& per_sequence = counted ? lp.count : lp.positions;
  if (!per_sequence.defined()) {
    // A side with examples but no statistics would be dropped unsaid: `entropy` over the other
    // side alone, `logits/<side>` missing without the warning.
    TORCH_CHECK(!rewards.defined() || rewards.numel() == 0, fn, ": expected the ", side,
                " log-probs' token statistics (count, or positions), one sequence per ", side,
                " reward (", rewards.numel(), "), got none; pass both sides' log-probs, or ",
                "call add without them");
    return;
  }
  const int64_t n = per_sequence.numel();
  const std::pair<const char*, const at::Tensor*> stats[] = {{"logits_sum", &lp.logits_sum},
                                                             {"logits_sum_all", &lp.logits_sum_all},
                                                             {"positions", &lp.positions},
                                                             {"correct", &lp.correct},
                                                             {"entropy_sum", &lp.entropy_sum}};
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(!t->defined() || t->numel() == n, fn, ": expected the ", side, " log-probs' ", name,
                " to hold one value per sequence, as their ", counted ? "count" : "positions",
                " does (", n, "), got ", t->numel());
  }
  TORCH_CHECK(!rewards.defined() || rewards.numel() == n, fn, ": expected the ", side,
              " log-probs of one sequence per ", side, " reward (", rewards.numel(), "), got ", n);
}

}  // namespace metrics
}  // namespace detail

PREFOPT_INLINE MetricAccumulator::MetricAccumulator(MetricsOptions options)
    : options_(std::move(options)) {
  const char* fn = "prefopt::MetricAccumulator";
  detail::check_enum(fn, "window", "a MetricWindow", options_.window(),
                     MetricWindow::kCountWeighted);
  detail::check_enum(fn, "logits", "a LogitsMetric", options_.logits(),
                     LogitsMetric::kAllPositions);
  for (size_t i = 0; i < detail::metrics::kNumBuiltins; ++i)
    slots_.push_back({detail::metrics::kBuiltinNames[i], detail::metrics::kBuiltinScalar[i]});
}

PREFOPT_INLINE MetricAccumulator::Step& MetricAccumulator::new_step(
    std::initializer_list<size_t> fills) {
  if (open_step_) {
    // add_scalar("loss") and an add that logs "loss" too would be averaged into one value.
    const Step& open = steps_.back();
    for (const size_t s : fills)
      TORCH_CHECK(open.size() <= s || !open[s].defined(), "prefopt::MetricAccumulator::add: '",
                  slots_[s].name, "' came from add_scalar in this micro-step, and this add ",
                  "logs its own; log the host's value under another name");
    open_step_ = false;
    return steps_.back();
  }
  steps_.emplace_back(slots_.size());
  scalar_builtins_ = 0;
  return steps_.back();
}

PREFOPT_INLINE MetricAccumulator::Step& MetricAccumulator::current_step() {
  if (steps_.empty()) {
    steps_.emplace_back(slots_.size());
    open_step_ = true;
    scalar_builtins_ = 0;
  }
  return steps_.back();
}

PREFOPT_INLINE size_t MetricAccumulator::slot(const std::string& name, bool scalar) {
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].name == name) {
      TORCH_CHECK(slots_[i].scalar == scalar && i != detail::metrics::kMargins &&
                      i != detail::metrics::kNumTokens,
                  "prefopt::MetricAccumulator::add_scalar: '", name,
                  "' is a built-in per-example metric; pick another name");
      return i;
    }
  }
  slots_.push_back({name, scalar});
  return slots_.size() - 1;
}

PREFOPT_INLINE void MetricAccumulator::put(Step& step, size_t slot, const at::Tensor& sum,
                                           const at::Tensor& count) {
  if (step.size() <= slot) step.resize(slots_.size());
  auto entry = at::stack({detail::metrics::as_double(sum).reshape({}),
                          detail::metrics::as_double(count).reshape({}).to(sum.device())});
  step[slot] = step[slot].defined() ? step[slot] + entry : entry;
}

PREFOPT_INLINE void MetricAccumulator::put_examples(Step& step, size_t slot,
                                                    const at::Tensor& values) {
  if (!values.defined()) return;
  // An empty side contributes (0, 0): present in the layout, absent from the means.
  put(step, slot, detail::metrics::as_double(values).sum(),
      detail::metrics::count_tensor(static_cast<double>(values.numel()), values));
}

PREFOPT_INLINE void MetricAccumulator::put_logps(Step& step, const at::Tensor& chosen,
                                                 const at::Tensor& rejected,
                                                 const PairInputs& inputs) {
  // What the loss consumed (sums or means, after any conversion), as TRL logs logps/*.
  put_examples(step, detail::metrics::kLogpsChosen,
               chosen.defined() ? chosen : inputs.policy_chosen_logps());
  put_examples(step, detail::metrics::kLogpsRejected,
               rejected.defined() ? rejected : inputs.policy_rejected_logps());
}

PREFOPT_INLINE void MetricAccumulator::put_pairs(Step& step, const at::Tensor& loss,
                                                 const at::Tensor& chosen_rewards,
                                                 const at::Tensor& rejected_rewards,
                                                 const PairInputs& inputs) {
  if (loss.defined() && loss.numel() > 0)
    put(step, detail::metrics::kLoss, detail::metrics::as_double(loss).mean(),
        detail::metrics::count_tensor(1, loss));
  put_examples(step, detail::metrics::kRewardsChosen, chosen_rewards);
  put_examples(step, detail::metrics::kRewardsRejected, rejected_rewards);
  // Strict: a tie is not an accurate pair. (Sizes checked by `add` before the step began.)
  if (chosen_rewards.defined() && rejected_rewards.defined())
    put_examples(step, detail::metrics::kAccuracies, chosen_rewards.gt(rejected_rewards));
}

PREFOPT_INLINE void MetricAccumulator::put_tokens(Step& step, const SequenceLogprobs& chosen,
                                                  const SequenceLogprobs& rejected,
                                                  TokenSides sides) {
  constexpr const char* fn = "prefopt::MetricAccumulator::add";
  // A metric TRL logs whose statistic was not gathered is left out, and said so once.
  if (sides.logits) {
    const bool scored = options_.logits() == LogitsMetric::kScored;
    const auto logits = [&](size_t slot, const SequenceLogprobs& lp) {
      const auto& sum = scored ? lp.logits_sum : lp.logits_sum_all;
      const auto& count = scored ? lp.count : lp.positions;
      if (sum.defined() && count.defined())
        put(step, slot, detail::metrics::as_double(sum).sum(), count.sum());
      return sum.defined() && count.defined();
    };
    const bool got_c = logits(detail::metrics::kLogitsChosen, chosen);
    const bool got_r = logits(detail::metrics::kLogitsRejected, rejected);
    if ((chosen.count.defined() && !got_c) || (rejected.count.defined() && !got_r)) {
      if (scored) {
        TORCH_WARN_ONCE(fn, ": logits/chosen and logits/rejected are not logged: the log-probs ",
                        "carry no logits statistics; gather them with ",
                        "with_logits_mean(true) (GatherLogprobsOptions or FusedLogprobsOptions)");
      } else {
        TORCH_WARN_ONCE(fn, ": logits/chosen and logits/rejected (LogitsMetric::kAllPositions) ",
                        "are not logged: gather the log-probs with ",
                        "GatherLogprobsOptions::with_logits_mean_unmasked(true)");
      }
    }
  }
  // Σ statistic / Σ tokens over the sides given; false when a side given lacks the statistic.
  // A side is present when its token counts are (a KTO step may have only one).
  const auto pool = [&](size_t slot, const at::Tensor& c, const at::Tensor& r, bool use_r) {
    const bool has_c = chosen.count.defined(), has_r = use_r && rejected.count.defined();
    if ((has_c && !c.defined()) || (has_r && !r.defined())) return false;
    at::Tensor sum, n;
    const auto add_side = [&](const at::Tensor& stat, const at::Tensor& count) {
      sum = sum.defined() ? sum + detail::metrics::as_double(stat).sum()
                          : detail::metrics::as_double(stat).sum();
      n = n.defined() ? n + detail::metrics::as_double(count).sum()
                      : detail::metrics::as_double(count).sum();
    };
    if (has_c) add_side(c, chosen.count);
    if (has_r) add_side(r, rejected.count);
    if (sum.defined()) put(step, slot, sum, n);
    return true;
  };
  if (!pool(detail::metrics::kEntropy, chosen.entropy_sum, rejected.entropy_sum, true)) {
    TORCH_WARN_ONCE(fn, ": entropy is not logged: the log-probs carry no entropy; gather them ",
                    "with with_entropy(true) (GatherLogprobsOptions or FusedLogprobsOptions)");
  }
  if (!pool(detail::metrics::kTokenAccuracy, chosen.correct, rejected.correct,
            sides.accuracy_rejected)) {
    TORCH_WARN_ONCE(fn, ": mean_token_accuracy is not logged: the log-probs carry no ",
                    "correct-token counts; gather them with with_token_accuracy(true) ",
                    "(GatherLogprobsOptions or FusedLogprobsOptions)");
  }
  // num_tokens is a running total: its count half only marks that tokens were counted.
  at::Tensor tokens;
  for (const auto* lp : {&chosen, &rejected}) {
    if (!lp->count.defined()) continue;
    const auto t = detail::metrics::as_double(lp->count).sum();
    tokens = tokens.defined() ? tokens + t : t;
  }
  if (tokens.defined()) {
    // A pairwise add has already counted the inputs' lengths, which are these same tokens
    // (PairInputs(policy) copies the counts): the gathered counts replace them, so each token
    // counts once.
    if (step.size() > detail::metrics::kNumTokens) step[detail::metrics::kNumTokens] = at::Tensor();
    put(step, detail::metrics::kNumTokens, tokens, detail::metrics::count_tensor(1, tokens));
  }
}

PREFOPT_INLINE void MetricAccumulator::add(const at::Tensor& loss, const SequenceLogprobs& lp) {
  TORCH_CHECK(loss.defined() && loss.numel() == 1,
              "prefopt::MetricAccumulator::add: expected a one-element SFT loss, got ",
              loss.defined() ? loss.sizes() : at::IntArrayRef{});
  TORCH_CHECK(lp.count.defined(),
              "prefopt::MetricAccumulator::add: the SFT log-probs have no token counts");
  detail::metrics::check_tokens(lp, "SFT");
  Step& step = new_step({detail::metrics::kLoss});
  put(step, detail::metrics::kLoss, detail::metrics::as_double(loss).reshape({}),
      detail::metrics::count_tensor(1, loss));
  put_tokens(step, lp, SequenceLogprobs{}, {/*logits=*/false, /*accuracy_rejected=*/false});
}

PREFOPT_INLINE void MetricAccumulator::add(const DPOLossResult& r, const PairInputs& in) {
  detail::metrics::check_pairs(r.chosen_rewards, r.rejected_rewards);
  Step& step = r.nll_loss.defined() ? new_step({detail::metrics::kLoss, detail::metrics::kNLL})
                                    : new_step({detail::metrics::kLoss});
  put_pairs(step, r.loss, r.chosen_rewards, r.rejected_rewards, in);
  put_logps(step, r.chosen_logps, r.rejected_logps, in);
  if (r.nll_loss.defined())
    put(step, detail::metrics::kNLL, r.nll_loss, detail::metrics::count_tensor(1, r.nll_loss));
  const auto& c = in.chosen_lengths();
  const auto& rj = in.rejected_lengths();
  if (c.defined() && rj.defined())
    put(step, detail::metrics::kNumTokens,
        detail::metrics::as_double(c).sum() + detail::metrics::as_double(rj).sum(),
        detail::metrics::count_tensor(1, c));
}

PREFOPT_INLINE void MetricAccumulator::add(const DPOLossResult& r, const PairInputs& in,
                                           const PairLogprobs& policy) {
  detail::metrics::check_pairs(r.chosen_rewards, r.rejected_rewards);
  detail::metrics::check_tokens(policy.chosen, "chosen", r.chosen_rewards);
  detail::metrics::check_tokens(policy.rejected, "rejected", r.rejected_rewards);
  add(r, in);
  // Pairwise: mean_token_accuracy over the chosen completions only (TRL ≥ 0.29).
  put_tokens(steps_.back(), policy.chosen, policy.rejected,
             {/*logits=*/true, /*accuracy_rejected=*/false});
}

namespace detail {
namespace metrics {
PREFOPT_INLINE DPOLossResult as_dpo(const CPOLossResult& r) {
  return {r.loss,     r.losses,       r.chosen_rewards, r.rejected_rewards,
          r.nll_loss, r.chosen_logps, r.rejected_logps};
}
// TRL's CPOTrainer logs nll_loss = 0 when cpo_alpha = 0, where the loss computes none.
PREFOPT_INLINE DPOLossResult as_cpo_logged(const CPOLossResult& r) {
  auto d = as_dpo(r);
  if (!d.nll_loss.defined() && r.loss.defined())
    d.nll_loss = at::zeros({}, r.loss.options().dtype(at::kDouble));
  return d;
}
// TRL's TPOTrainer logs no nll_loss (the gold response's NLL is folded into the loss).
PREFOPT_INLINE DPOLossResult as_tpo_logged(const TPOLossResult& r) {
  auto d = as_dpo(r);
  d.nll_loss = at::Tensor();
  return d;
}
PREFOPT_INLINE DPOLossResult as_dpo(const ORPOLossResult& r) {
  return {r.loss,     r.losses,       r.chosen_rewards, r.rejected_rewards,
          r.nll_loss, r.chosen_logps, r.rejected_logps};
}
// A metric that TRL gathers as one mean per rank and averages over the ranks: this rank's
// (Σ, count) becomes (Σ / count, 1), or (0, 0) from a rank with nothing to average (TRL: NaN),
// so that the sum over ranks counts ranks, not examples or tokens. Only under kMeanOfSteps: a
// kCountWeighted window (TRL has none for these losses) pools, as for every other metric.
PREFOPT_INLINE void as_rank_mean(std::vector<at::Tensor>& step, size_t slot,
                                 const MetricsOptions& options) {
  if (options.window() != MetricWindow::kMeanOfSteps || step.size() <= slot ||
      !step[slot].defined())
    return;
  const auto sum = step[slot][0], n = step[slot][1];
  const auto some = n > 0;
  step[slot] =
      at::stack({at::where(some, sum / n.clamp_min(1), at::zeros_like(sum)), some.to(at::kDouble)});
}
// TRL's CPOTrainer and ORPOTrainer log `gather_for_metrics(logits.mean()).mean()`: each rank's
// mean over every position, averaged over the ranks (their scored-token form has no TRL
// counterpart, and pools like DPO's); ORPO's log_odds_* are `torch.mean` per rank likewise.
PREFOPT_INLINE void cpo_orpo_rank_means(std::vector<at::Tensor>& step,
                                        const MetricsOptions& options, bool log_odds) {
  if (options.logits() == LogitsMetric::kAllPositions) {
    as_rank_mean(step, kLogitsChosen, options);
    as_rank_mean(step, kLogitsRejected, options);
  }
  if (log_odds) {
    as_rank_mean(step, kLogOddsRatio, options);
    as_rank_mean(step, kLogOddsChosen, options);
  }
}
}  // namespace metrics
}  // namespace detail

PREFOPT_INLINE void MetricAccumulator::add(const CPOLossResult& r, const PairInputs& in) {
  add(detail::metrics::as_cpo_logged(r), in);
}

PREFOPT_INLINE void MetricAccumulator::add(const CPOLossResult& r, const PairInputs& in,
                                           const PairLogprobs& policy) {
  add(detail::metrics::as_cpo_logged(r), in, policy);
  detail::metrics::cpo_orpo_rank_means(steps_.back(), options_, /*log_odds=*/false);
}

PREFOPT_INLINE void MetricAccumulator::add(const TPOLossResult& r, const PairInputs& in) {
  add(detail::metrics::as_tpo_logged(r), in);
}

PREFOPT_INLINE void MetricAccumulator::add(const TPOLossResult& r, const PairInputs& in,
                                           const PairLogprobs& policy,
                                           const SequenceLogprobs& gold) {
  detail::metrics::check_tokens(gold, "gold");
  add(detail::metrics::as_tpo_logged(r), in, policy);
  Step& step = steps_.back();
  using detail::metrics::as_double;
  if (gold.count.defined()) {
    const auto n = as_double(gold.count).sum();
    put(step, detail::metrics::kNumTokens, n, detail::metrics::count_tensor(1, n));
  }
  if (step.size() <= detail::metrics::kEntropy || !step[detail::metrics::kEntropy].defined())
    return;  // no entropy gathered for the pair (put_tokens warned)
  // TRL's TPO entropy: this rank's mean over the tokens of all three branches, then the mean
  // of the ranks' means: (mean, 1) per rank, or (0, 0) from a rank with no tokens. A
  // kCountWeighted window (TRL has none for TPO) pools the tokens, as for every other loss.
  auto sum = step[detail::metrics::kEntropy][0], n = step[detail::metrics::kEntropy][1];
  if (gold.count.defined()) {
    if (gold.entropy_sum.defined()) {
      sum = sum + as_double(gold.entropy_sum).sum();
      n = n + as_double(gold.count).sum();
    } else {
      TORCH_WARN_ONCE("prefopt::MetricAccumulator::add: the gold log-probs carry no entropy, so ",
                      "TPO's entropy covers the chosen and rejected tokens only; gather the gold ",
                      "responses with with_entropy(true) too");
    }
  }
  step[detail::metrics::kEntropy] = at::stack({sum, n});
  detail::metrics::as_rank_mean(step, detail::metrics::kEntropy, options_);
}

PREFOPT_INLINE void MetricAccumulator::add(const ORPOLossResult& r, const PairInputs& in) {
  add(detail::metrics::as_dpo(r), in);
  put_examples(steps_.back(), detail::metrics::kLogOddsRatio, r.log_odds_ratio);
  put_examples(steps_.back(), detail::metrics::kLogOddsChosen, r.log_odds_chosen);
  detail::metrics::cpo_orpo_rank_means(steps_.back(), options_, /*log_odds=*/true);
}

PREFOPT_INLINE void MetricAccumulator::add(const ORPOLossResult& r, const PairInputs& in,
                                           const PairLogprobs& policy) {
  add(detail::metrics::as_dpo(r), in, policy);
  put_examples(steps_.back(), detail::metrics::kLogOddsRatio, r.log_odds_ratio);
  put_examples(steps_.back(), detail::metrics::kLogOddsChosen, r.log_odds_chosen);
  detail::metrics::cpo_orpo_rank_means(steps_.back(), options_, /*log_odds=*/true);
}

PREFOPT_INLINE void MetricAccumulator::add(const KTOLossResult& r, const KTOInputs& in) {
  Step& step = r.kl.defined() ? new_step({detail::metrics::kLoss, detail::metrics::kKL})
                              : new_step({detail::metrics::kLoss});
  if (r.loss.defined() && r.loss.numel() > 0)
    put(step, detail::metrics::kLoss, detail::metrics::as_double(r.loss).mean(),
        detail::metrics::count_tensor(1, r.loss));
  put_examples(step, detail::metrics::kRewardsChosen, r.chosen_rewards);
  put_examples(step, detail::metrics::kRewardsRejected, r.rejected_rewards);
  put_examples(step, detail::metrics::kLogpsChosen, in.policy_chosen_logps());
  put_examples(step, detail::metrics::kLogpsRejected, in.policy_rejected_logps());
  if (r.kl.defined()) put(step, detail::metrics::kKL, r.kl, detail::metrics::count_tensor(1, r.kl));
}

PREFOPT_INLINE void MetricAccumulator::add(const KTOLossResult& r, const KTOInputs& in,
                                           const SequenceLogprobs& chosen,
                                           const SequenceLogprobs& rejected) {
  detail::metrics::check_tokens(chosen, "chosen", r.chosen_rewards);
  detail::metrics::check_tokens(rejected, "rejected", r.rejected_rewards);
  add(r, in);
  put_tokens(steps_.back(), chosen, rejected, {/*logits=*/true, /*accuracy_rejected=*/true});
}

PREFOPT_INLINE void MetricAccumulator::add_scalar(const std::string& name,
                                                  const at::Tensor& value) {
  TORCH_CHECK(value.defined() && value.numel() == 1,
              "prefopt::MetricAccumulator::add_scalar: expected a one-element tensor for '", name,
              "', got ", value.defined() ? value.sizes() : at::IntArrayRef{}, " (",
              value.defined() ? "defined" : "undefined", ")");
  const size_t s = slot(name, true);
  // A built-in scalar that this micro-step's add logged already would be averaged with it
  // (a value from add_scalar itself is only another sample).
  const bool builtin = s < detail::metrics::kNumBuiltins;
  TORCH_CHECK(!builtin || open_step_ || steps_.empty() || steps_.back().size() <= s ||
                  !steps_.back()[s].defined() || (scalar_builtins_ >> s & 1u) != 0,
              "prefopt::MetricAccumulator::add_scalar: '", name, "' is logged by this ",
              "micro-step's add already; log the host's value under another name");
  put(current_step(), s, value, detail::metrics::count_tensor(1, value));
  if (builtin) scalar_builtins_ |= 1u << s;
}

PREFOPT_INLINE void MetricAccumulator::add_scalar(const std::string& name, double value) {
  add_scalar(name, at::scalar_tensor(value, at::kDouble));
}

PREFOPT_INLINE at::Tensor MetricAccumulator::pack() const {
  if (steps_.empty()) return {};
  // Pack on the device of the results (NCCL needs CUDA tensors), read once.
  at::Device device(at::kCPU);
  for (const auto& step : steps_)
    for (const auto& e : step)
      if (e.defined() && !e.is_cpu()) device = e.device();
  const auto zeros = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(device));
  std::vector<at::Tensor> parts;
  parts.reserve(steps_.size() * slots_.size());
  for (const auto& step : steps_)
    for (size_t s = 0; s < slots_.size(); ++s)
      parts.push_back(s < step.size() && step[s].defined() ? step[s].to(device) : zeros);
  return at::stack(parts);
}

PREFOPT_INLINE Metrics MetricAccumulator::compute(c10d::ProcessGroup* group) {
  constexpr const char* fn = "prefopt::MetricAccumulator::compute";
  at::Tensor packed = pack();
  // An NCCL group takes CUDA tensors only, and a window may hold none (no micro-step, or only
  // add_scalar doubles, which live on the CPU).
  const bool nccl = group != nullptr && group->getSize() > 1 && group->getBackendName() == "nccl";
  if (nccl && packed.defined() && packed.is_cpu()) packed = packed.to(at::Device(at::kCUDA));
  if (group != nullptr && group->getSize() > 1) {
    // The ranks must agree on the layout of what they sum (micro-steps, names of the slots),
    // or values of different metrics would mix, and packs of different sizes would fail inside
    // the collective on some ranks only. One cheap all-reduce of [x, x²] for each of: the
    // micro-steps, the slots and a hash of their names; Σx² = W·x² and Σx = W·x together hold
    // on a rank only when every rank has the same x, so every rank fails with the same error.
    uint32_t h = 2166136261u;  // FNV-1a over the slot names, cut to 20 bits: exact squares
    for (const auto& slot : slots_) {
      for (const char ch : slot.name + '\n') h = (h ^ static_cast<uint8_t>(ch)) * 16777619u;
    }
    const double mine[3] = {static_cast<double>(steps_.size()), static_cast<double>(slots_.size()),
                            static_cast<double>(h & 0xfffffu)};
    auto layout = at::empty({6}, at::kDouble);
    for (int i = 0; i < 3; ++i) {
      layout[2 * i] = mine[i];
      layout[2 * i + 1] = mine[i] * mine[i];
    }
    layout = layout.to(packed.defined() ? packed.device()
                       : nccl           ? at::Device(at::kCUDA)
                                        : at::Device(at::kCPU));
    all_reduce_sum(layout, group, fn);
    const auto sums = layout.cpu();
    const auto* v = sums.data_ptr<double>();
    const double world = group->getSize();
    bool same = true;
    for (int i = 0; i < 3; ++i) {
      same = same && v[2 * i] == world * mine[i] && v[2 * i + 1] == world * mine[i] * mine[i];
    }
    if (!same) {
      std::string names;
      for (size_t s = detail::metrics::kNumBuiltins; s < slots_.size(); ++s)
        names += (names.empty() ? "'" : ", '") + slots_[s].name + "'";
      const size_t n_steps = steps_.size();
      finish(at::Tensor());  // the window is dropped on every rank alike
      TORCH_CHECK(false, fn, ": the ranks' windows differ (this rank ", group->getRank(), ": ",
                  n_steps, " micro-steps, add_scalar names [", names, "]); every rank must make ",
                  "the same add and add_scalar calls between two compute calls");
    }
  }
  if (packed.defined()) all_reduce_sum(packed, group, fn);
  return finish(packed);
}

PREFOPT_INLINE Metrics
MetricAccumulator::compute_ranks(const std::vector<MetricAccumulator*>& ranks) {
  constexpr const char* fn = "prefopt::MetricAccumulator::compute_ranks";
  TORCH_CHECK(!ranks.empty() && ranks[0] != nullptr, fn, ": expected at least one accumulator");
  const auto& first = *ranks[0];
  at::Tensor total;
  for (size_t i = 0; i < ranks.size(); ++i) {
    TORCH_CHECK(ranks[i] != nullptr, fn, ": accumulator ", i, " is null");
    for (size_t j = 0; j < i; ++j) {
      // The same accumulator twice would be summed twice, then cleared before its own result.
      TORCH_CHECK(ranks[j] != ranks[i], fn, ": accumulators ", j, " and ", i,
                  " are the same object; pass each rank's accumulator once");
    }
    const auto& r = *ranks[i];
    TORCH_CHECK(r.steps_.size() == first.steps_.size(), fn, ": rank ", i, " has ", r.steps_.size(),
                " micro-steps in its window, rank 0 has ", first.steps_.size(),
                "; every rank must make the same calls");
    TORCH_CHECK(r.slots_.size() == first.slots_.size(), fn, ": rank ", i, " logs ",
                r.slots_.size() - detail::metrics::kNumBuiltins, " add_scalar names, rank 0 logs ",
                first.slots_.size() - detail::metrics::kNumBuiltins);
    for (size_t s = 0; s < r.slots_.size(); ++s) {
      TORCH_CHECK(r.slots_[s].name == first.slots_[s].name, fn, ": rank ", i, " logs '",
                  r.slots_[s].name, "' where rank 0 logs '", first.slots_[s].name, "'");
    }
    const auto p = r.pack();
    if (p.defined()) total = total.defined() ? total + p.to(total.device()) : p;
  }
  for (size_t i = 1; i < ranks.size(); ++i) ranks[i]->finish(at::Tensor());  // clear them
  return ranks[0]->finish(total);
}

PREFOPT_INLINE Metrics MetricAccumulator::finish(const at::Tensor& packed) {
  const size_t n_steps = packed.defined() ? steps_.size() : 0;
  const size_t n_slots = slots_.size();
  Metrics out;
  at::Tensor totals;  // [n_steps, n_slots, 2] on the CPU
  if (n_steps > 0) {
    totals =
        packed.cpu().reshape({static_cast<int64_t>(n_steps), static_cast<int64_t>(n_slots), 2});
  }
  steps_.clear();
  open_step_ = false;

  const bool mean_of_steps = options_.window() == MetricWindow::kMeanOfSteps;
  // Window value of slot s, or NaN when no step had any example of it.
  const auto window_value = [&](size_t s, double* value) {
    if (n_steps == 0) return false;
    auto acc = totals.accessor<double, 3>();
    double num = 0, den = 0;
    // kMeanOfSteps: each micro-step's value (its examples or tokens pooled over the ranks),
    // then the plain mean of the steps, as TRL's log() does; kCountWeighted pools the window.
    const bool per_step = mean_of_steps;
    for (size_t i = 0; i < n_steps; ++i) {
      const double sum = acc[i][s][0], count = acc[i][s][1];
      if (count <= 0) continue;
      num += per_step ? sum / count : sum;
      den += per_step ? 1.0 : count;
    }
    if (den <= 0) return false;
    *value = num / den;
    return true;
  };
  const auto margins = [&](double* value) {
    if (n_steps == 0) return false;
    if (!mean_of_steps) {
      double c = 0, r = 0;
      if (!window_value(detail::metrics::kRewardsChosen, &c) ||
          !window_value(detail::metrics::kRewardsRejected, &r))
        return false;
      *value = c - r;
      return true;
    }
    auto acc = totals.accessor<double, 3>();
    double num = 0;
    int64_t den = 0;
    for (size_t i = 0; i < n_steps; ++i) {
      const double nc = acc[i][detail::metrics::kRewardsChosen][1],
                   nr = acc[i][detail::metrics::kRewardsRejected][1];
      if (nc <= 0 || nr <= 0) continue;
      num += acc[i][detail::metrics::kRewardsChosen][0] / nc -
             acc[i][detail::metrics::kRewardsRejected][0] / nr;
      ++den;
    }
    if (den == 0) return false;
    *value = num / static_cast<double>(den);
    return true;
  };

  const auto& prefix = options_.prefix();
  for (size_t s = 0; s < n_slots; ++s) {
    double v = 0;
    if (s == detail::metrics::kMargins) {
      if (margins(&v)) out.set(prefix + slots_[s].name, v);
    } else if (s == detail::metrics::kNumTokens) {
      if (n_steps > 0) {
        auto acc = totals.accessor<double, 3>();
        for (size_t i = 0; i < n_steps; ++i) {
          num_tokens_ += acc[i][s][0];
          counted_tokens_ = counted_tokens_ || acc[i][s][1] > 0;
        }
      }
      if (counted_tokens_) out.set(prefix + slots_[s].name, num_tokens_);
    } else if (window_value(s, &v)) {
      out.set(prefix + slots_[s].name, v);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------ JSONL

namespace detail {

// The JSON line of `to_json`; `fn` names the public function in errors.
PREFOPT_INLINE std::string metrics_json(const char* fn, int64_t step, const Metrics& metrics) {
  using json = nlohmann::ordered_json;
  json j;
  j["step"] = step;
  for (const auto& [name, value] : metrics) {
    // The object's keys are unique: a metric "step" would silently replace the step number.
    TORCH_CHECK(name != "step", fn, ": a metric named 'step' would replace the line's step (", step,
                "); log it under another name");
    if (std::isfinite(value)) {
      j[name] = value;
    } else {
      j[name] = nullptr;
    }
  }
  try {
    return j.dump();
  } catch (const json::type_error&) {
    // Only invalid UTF-8 in a name (a metric's or the prefix) makes dump throw. Find that name
    // (the error path only) and quote it with the bad bytes replaced, so that the message
    // itself stays valid UTF-8.
    for (const auto& [name, value] : metrics) {
      try {
        (void)json(name).dump();
      } catch (const json::type_error& e) {
        TORCH_CHECK(false, fn, ": expected metric names (prefix included) in UTF-8, got ",
                    json(name).dump(-1, ' ', false, json::error_handler_t::replace), " (", e.what(),
                    ")");
      }
    }
    throw;
  }
}

}  // namespace detail

PREFOPT_INLINE std::string to_json(int64_t step, const Metrics& metrics) {
  return detail::metrics_json("prefopt::to_json", step, metrics);
}

PREFOPT_INLINE JsonlWriter::JsonlWriter(const std::string& path, bool sync)
    : path_(path), sync_(sync) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  TORCH_CHECK(fd_ >= 0, "prefopt::JsonlWriter: cannot open '", path,
              "' for appending: ", std::strerror(errno));
}

PREFOPT_INLINE JsonlWriter::~JsonlWriter() {
  if (fd_ >= 0) ::close(fd_);
}

PREFOPT_INLINE JsonlWriter::JsonlWriter(JsonlWriter&& other) noexcept
    : path_(std::move(other.path_)), fd_(other.fd_), sync_(other.sync_) {
  other.fd_ = -1;
}

PREFOPT_INLINE JsonlWriter& JsonlWriter::operator=(JsonlWriter&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    sync_ = other.sync_;
    other.fd_ = -1;
  }
  return *this;
}

PREFOPT_INLINE void JsonlWriter::write(int64_t step, const Metrics& metrics) {
  constexpr const char* fn = "prefopt::JsonlWriter::write";
  TORCH_CHECK(fd_ >= 0, fn, ": the writer was moved from");
  const std::string line = detail::metrics_json(fn, step, metrics) + "\n";
  // One write call per line: O_APPEND places it atomically at the end of the file. A short
  // write's rest is not retried, since another writer's line could come in between.
  ssize_t n;
  do {
    n = ::write(fd_, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
  if (n == static_cast<ssize_t>(line.size())) {
    // A failed fsync (EIO, ENOSPC on some file systems) means the line may not be on disk:
    // the caller asked to know.
    TORCH_CHECK(!sync_ || ::fsync(fd_) == 0, fn, ": the line was written to '", path_,
                "', but fsync failed: ", std::strerror(errno));
    return;
  }
  const int write_errno = n < 0 ? errno : 0;
  // A short write (disk full, quota, RLIMIT_FSIZE) left a fragment that the next line would
  // glue onto: cut the file back to where this line began. With O_APPEND the offset is now the
  // end of the fragment, so the line began n bytes before it.
  std::string truncated;
  if (n > 0) {
    const off_t end = ::lseek(fd_, 0, SEEK_CUR);
    if (end < 0 || ::ftruncate(fd_, end - n) != 0) {
      truncated = std::string("; removing the partial line also failed: ") + std::strerror(errno);
    }
  }
  TORCH_CHECK(false, fn, ": writing ", line.size(), " bytes to '", path_, "' failed after ",
              n < 0 ? 0 : n, ": ",
              write_errno != 0 ? std::strerror(write_errno)
                               : "short write (disk full, quota or file-size limit)",
              truncated);
}

PREFOPT_END_NAMESPACE
