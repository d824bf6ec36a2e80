// SPDX-License-Identifier: Apache-2.0
// Training metrics with TRL's names from the Eigen layer's loss results, averaged over the
// micro-steps of a logging window (one process; no ranks).
//
// Mirrors `MetricAccumulator` of include/prefopt/metrics.h and metrics-inl.h without the
// token statistics (logits/*, entropy, mean_token_accuracy) and the collective: the reference
// this layer is tested against (tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>
#include <prefopt/eigen/cpo.h>
#include <prefopt/eigen/dpo.h>
#include <prefopt/eigen/kto.h>
#include <prefopt/eigen/orpo.h>
#include <prefopt/eigen/tpo.h>

#include <initializer_list>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// How a metric is averaged over the micro-steps of one logging window: with per-step sums
/// s_i over counts n_i, kMeanOfSteps gives mean_i(s_i / n_i) and kCountWeighted Σ s_i / Σ n_i.
///
/// Example:
/// ```
/// auto o = prefopt::eigen::MetricsOptions().window(prefopt::eigen::MetricWindow::kCountWeighted);
/// ```
enum class MetricWindow {
  /// The plain mean over micro-steps of each micro-step's value (current TRL's `log()`); a
  /// micro-step without examples of a metric is left out of that metric's mean.
  kMeanOfSteps,
  /// Σ values / Σ counts over the whole window (TRL's KTO up to 1.5.x, LLaMA-Factory's KTO).
  kCountWeighted,
};

/// Options of `eigen::MetricAccumulator`.
///
/// Example:
/// ```
/// auto o = prefopt::eigen::MetricsOptions().prefix("eval_");
/// ```
struct MetricsOptions {
  /// Averaging over the window. Default: kMeanOfSteps (current TRL).
  PREFOPT_EIGEN_ARG(MetricWindow, window) = MetricWindow::kMeanOfSteps;
  /// Prefix of every name: "" in training, "eval_" in evaluation. Default: "".
  PREFOPT_EIGEN_ARG(std::string, prefix) = "";
};

/// The metrics of one log step: names in a fixed order (TRL's), each with its value.
///
/// Example:
/// ```
/// prefopt::eigen::Metrics m = acc.compute();
/// double a = m.at("rewards/accuracies");
/// for (const auto& [name, value] : m) std::printf("%s=%g ", name.c_str(), value);
/// ```
class Metrics {
 public:
  /// A name and its value.
  using value_type = std::pair<std::string, double>;
  /// Iterates the metrics in order.
  using const_iterator = std::vector<value_type>::const_iterator;

  /// Sets `name` (appended if new, replaced in place otherwise).
  void set(const std::string& name, double value) {
    for (auto& item : items_) {
      if (item.first == name) {
        item.second = value;
        return;
      }
    }
    items_.emplace_back(name, value);
  }
  /// Pointer to the value of `name`, or nullptr.
  const double* find(const std::string& name) const {
    for (const auto& item : items_)
      if (item.first == name) return &item.second;
    return nullptr;
  }
  /// The value of `name`; std::out_of_range naming the metrics present if it is missing.
  double at(const std::string& name) const {
    if (const double* v = find(name)) return *v;
    std::string names;
    for (const auto& item : items_) names += (names.empty() ? "" : ", ") + item.first;
    throw std::out_of_range("prefopt::eigen::Metrics::at: no metric '" + name + "'; have " +
                            (names.empty() ? std::string("none") : names));
  }
  /// Whether `name` is present.
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  /// The first metric.
  const_iterator begin() const noexcept { return items_.begin(); }
  /// Past the last metric.
  const_iterator end() const noexcept { return items_.end(); }
  /// Number of metrics.
  size_t size() const noexcept { return items_.size(); }
  /// Whether there are none.
  bool empty() const noexcept { return items_.empty(); }

 private:
  std::vector<value_type> items_;
};

/// Accumulates the metrics of every micro-step between two log steps and averages them when
/// `compute` is called: the Eigen form of the libtorch layer's `MetricAccumulator` for one
/// process.
///
/// Per micro-step (TRL's names, `prefix` prepended): `loss` (the mean when it is a vector),
/// `nll_loss`, `kl` and `add_scalar` values (one sample each); `rewards/chosen`,
/// `rewards/rejected`, `logps/chosen`, `logps/rejected` (the examples of each side; `logps/*`
/// are the log-probs the loss consumed); `rewards/accuracies` (fraction of pairs with
/// r_c > r_r: ties are not accurate); `rewards/margins` (rewards/chosen − rewards/rejected);
/// ORPO's `log_odds_ratio`, `log_odds_chosen`; `num_tokens` (running total of the lengths
/// given, since construction). A side with no examples contributes nothing: its metrics are
/// absent from a window that has none, never NaN.
///
/// Example:
/// ```
/// prefopt::eigen::MetricAccumulator metrics;
/// auto r = prefopt::eigen::dpo_loss(in);
/// metrics.add(r, in);
/// prefopt::eigen::Metrics m = metrics.compute();  // starts a new window
/// ```
class MetricAccumulator {
 public:
  /// An accumulator with an empty window. std::invalid_argument when `options.window()` is
  /// not a MetricWindow value (an integer cast to the enum), as the libtorch layer refuses it.
  explicit MetricAccumulator(MetricsOptions options = {}) : options_(std::move(options)) {
    const auto window = static_cast<unsigned>(options_.window());
    detail::check(window <= static_cast<unsigned>(MetricWindow::kCountWeighted),
                  "prefopt::eigen::MetricAccumulator", ": window is not a MetricWindow value (got ",
                  static_cast<int>(options_.window()), ")");
    for (size_t i = 0; i < kNumBuiltins; ++i)
      slots_.push_back({builtin_name(i), builtin_scalar(i)});
  }

  /// A DPO-family micro-step.
  template <typename T>
  void add(const DPOLossResult<T>& r, const PairInputs<T>& in) {
    add_pairwise(r.loss, r.chosen_rewards, r.rejected_rewards, r.nll_loss, r.chosen_logps,
                 r.rejected_logps, in);
  }
  /// A CPO / SimPO / AlphaPO micro-step. `nll_loss` is logged as 0 when the loss has no NLL
  /// term (`cpo_alpha` = 0, and AlphaPO), as TRL's CPOTrainer logs it.
  template <typename T>
  void add(const CPOLossResult<T>& r, const PairInputs<T>& in) {
    add_pairwise(r.loss, r.chosen_rewards, r.rejected_rewards,
                 std::optional<T>(r.nll_loss.value_or(T(0))), r.chosen_logps, r.rejected_logps, in);
  }
  /// A TPO micro-step: CPO's metrics but `nll_loss`, which TRL's TPOTrainer does not log.
  template <typename T>
  void add(const TPOLossResult<T>& r, const PairInputs<T>& in) {
    add_pairwise(r.loss, r.chosen_rewards, r.rejected_rewards, std::optional<T>(), r.chosen_logps,
                 r.rejected_logps, in);
  }
  /// An ORPO micro-step (also `log_odds_ratio`, `log_odds_chosen`).
  template <typename T>
  void add(const ORPOLossResult<T>& r, const PairInputs<T>& in) {
    add_pairwise(r.loss, r.chosen_rewards, r.rejected_rewards, std::optional<T>(r.nll_loss),
                 r.chosen_logps, r.rejected_logps, in);
    put_examples(steps_.back(), kLogOddsRatio, r.log_odds_ratio);
    put_examples(steps_.back(), kLogOddsChosen, r.log_odds_chosen);
  }
  /// A KTO micro-step (also `kl`); either side may be empty.
  template <typename T>
  void add(const KTOLossResult<T>& r, const KTOInputs<T>& in) {
    Step& step = new_step({kLoss, kKL});
    if (r.loss.size() > 0) put(step, kLoss, r.loss.template cast<double>().mean(), 1);
    put_examples(step, kRewardsChosen, r.chosen_rewards);
    put_examples(step, kRewardsRejected, r.rejected_rewards);
    put_examples(step, kLogpsChosen, in.policy_chosen_logps());
    put_examples(step, kLogpsRejected, in.policy_rejected_logps());
    put(step, kKL, static_cast<double>(r.kl), 1);
  }
  /// Adds one sample of a scalar metric (e.g. `grad_norm`) to the current micro-step: the one
  /// the last `add` started, or, before any `add` in the window, the one the next `add` fills.
  /// The built-in `loss`, `nll_loss` and `kl` may come from here where no `add` logs them (a
  /// host's own loss); in a micro-step whose `add` logs one, giving it here too is an error.
  void add_scalar(const std::string& name, double value) {
    size_t s = slots_.size();
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].name == name) {
        detail::check(slots_[i].scalar && i != kMargins && i != kNumTokens,
                      "prefopt::eigen::MetricAccumulator::add_scalar", ": '", name,
                      "' is a built-in per-example metric; pick another name");
        s = i;
      }
    }
    if (s == slots_.size()) slots_.push_back({name, true});
    // A built-in scalar that this micro-step's add logged already would be averaged with it.
    // (A value from add_scalar itself is only another sample.)
    const bool builtin = s < kNumBuiltins;
    detail::check(!builtin || open_step_ || steps_.empty() || steps_.back().size() <= s ||
                      steps_.back()[s].second == 0 || (scalar_builtins_ >> s & 1u) != 0,
                  "prefopt::eigen::MetricAccumulator::add_scalar", ": '", name,
                  "' is logged by this micro-step's add already; log the host's value under ",
                  "another name");
    if (steps_.empty()) {
      steps_.emplace_back();
      open_step_ = true;
      scalar_builtins_ = 0;
    }
    put(steps_.back(), s, value, 1);
    if (builtin) scalar_builtins_ |= 1u << s;
  }

  /// Averages the window over its micro-steps (see `MetricWindow`) and starts a new window.
  /// Returns the metrics in TRL's order; an empty window gives only `num_tokens` if tokens were
  /// ever counted.
  Metrics compute() {
    Metrics out;
    const bool mean_of_steps = options_.window() == MetricWindow::kMeanOfSteps;
    const auto entry = [&](const Step& step, size_t s) {
      return s < step.size() ? step[s] : std::make_pair(0.0, 0.0);
    };
    const auto window_value = [&](size_t s, double* value) {
      double num = 0, den = 0;
      for (const Step& step : steps_) {
        const auto [sum, count] = entry(step, s);
        if (count <= 0) continue;
        num += mean_of_steps ? sum / count : sum;
        den += mean_of_steps ? 1.0 : count;
      }
      if (den <= 0) return false;
      *value = num / den;
      return true;
    };
    const auto margins = [&](double* value) {
      if (!mean_of_steps) {
        double c = 0, r = 0;
        if (!window_value(kRewardsChosen, &c) || !window_value(kRewardsRejected, &r)) return false;
        *value = c - r;
        return true;
      }
      double num = 0;
      int64_t den = 0;
      for (const Step& step : steps_) {
        const auto [sc, nc] = entry(step, kRewardsChosen);
        const auto [sr, nr] = entry(step, kRewardsRejected);
        if (nc <= 0 || nr <= 0) continue;
        num += sc / nc - sr / nr;
        ++den;
      }
      if (den == 0) return false;
      *value = num / static_cast<double>(den);
      return true;
    };
    for (size_t s = 0; s < slots_.size(); ++s) {
      const std::string name = options_.prefix() + slots_[s].name;
      double v = 0;
      if (s == kMargins) {
        if (margins(&v)) out.set(name, v);
      } else if (s == kNumTokens) {
        for (const Step& step : steps_) {
          const auto [sum, count] = entry(step, s);
          num_tokens_ += sum;
          counted_tokens_ = counted_tokens_ || count > 0;
        }
        if (counted_tokens_) out.set(name, num_tokens_);
      } else if (window_value(s, &v)) {
        out.set(name, v);
      }
    }
    steps_.clear();
    open_step_ = false;
    return out;
  }

  /// Micro-steps in the current window.
  int64_t steps() const noexcept { return static_cast<int64_t>(steps_.size()); }
  /// The options.
  const MetricsOptions& options() const noexcept { return options_; }

 private:
  enum Builtin : size_t {
    kLoss,
    kRewardsChosen,
    kRewardsRejected,
    kAccuracies,
    kMargins,
    kLogpsChosen,
    kLogpsRejected,
    kNLL,
    kLogOddsRatio,
    kLogOddsChosen,
    kKL,
    kNumTokens,
    kNumBuiltins,
  };
  static const char* builtin_name(size_t i) {
    static const char* const names[kNumBuiltins] = {"loss",
                                                    "rewards/chosen",
                                                    "rewards/rejected",
                                                    "rewards/accuracies",
                                                    "rewards/margins",
                                                    "logps/chosen",
                                                    "logps/rejected",
                                                    "nll_loss",
                                                    "log_odds_ratio",
                                                    "log_odds_chosen",
                                                    "kl",
                                                    "num_tokens"};
    return names[i];
  }
  static bool builtin_scalar(size_t i) { return i == kLoss || i == kNLL || i == kKL; }

  struct Slot {
    std::string name;
    bool scalar;  // a per-micro-step sample, not a per-example mean
  };
  using Step = std::vector<std::pair<double, double>>;  // per slot: (Σ value, count)

  // The next add's step; `fills`: the built-in scalar slots that add logs (checked against
  // add_scalar values in an open step, which would be averaged with them).
  Step& new_step(std::initializer_list<size_t> fills) {
    if (open_step_) {
      const Step& open = steps_.back();
      for (const size_t s : fills)
        detail::check(open.size() <= s || open[s].second == 0,
                      "prefopt::eigen::MetricAccumulator::add", ": '", slots_[s].name,
                      "' came from add_scalar in this micro-step, and this add logs its own; log ",
                      "the host's value under another name");
      open_step_ = false;
      return steps_.back();
    }
    steps_.emplace_back();
    scalar_builtins_ = 0;
    return steps_.back();
  }
  void put(Step& step, size_t slot, double sum, double count) {
    if (step.size() <= slot) step.resize(slots_.size(), {0.0, 0.0});
    step[slot].first += sum;
    step[slot].second += count;
  }
  template <typename V>
  void put_examples(Step& step, size_t slot, const V& values) {
    put(step, slot, values.template cast<double>().sum(), static_cast<double>(values.size()));
  }
  template <typename T>
  void add_pairwise(const Vector<T>& loss, const Vector<T>& chosen_rewards,
                    const Vector<T>& rejected_rewards, const std::optional<T>& nll,
                    const Vector<T>& chosen_logps, const Vector<T>& rejected_logps,
                    const PairInputs<T>& in) {
    detail::check(chosen_rewards.size() == rejected_rewards.size(),
                  "prefopt::eigen::MetricAccumulator::add",
                  ": expected as many chosen as rejected rewards, got ", chosen_rewards.size(),
                  " and ", rejected_rewards.size());
    Step& step = nll ? new_step({kLoss, kNLL}) : new_step({kLoss});
    if (loss.size() > 0) put(step, kLoss, loss.template cast<double>().mean(), 1);
    put_examples(step, kRewardsChosen, chosen_rewards);
    put_examples(step, kRewardsRejected, rejected_rewards);
    // Strict: a tie is not an accurate pair.
    put_examples(step, kAccuracies,
                 (chosen_rewards.array() > rejected_rewards.array()).template cast<double>());
    put_examples(step, kLogpsChosen, chosen_logps);
    put_examples(step, kLogpsRejected, rejected_logps);
    if (nll) put(step, kNLL, static_cast<double>(*nll), 1);
    if (in.chosen_lengths() && in.rejected_lengths())
      put(step, kNumTokens, in.chosen_lengths()->sum() + in.rejected_lengths()->sum(), 1);
  }

  MetricsOptions options_;
  std::vector<Slot> slots_;
  std::vector<Step> steps_;
  bool open_step_ = false;        // add_scalar before any add opens a step the next add reuses
  uint32_t scalar_builtins_ = 0;  // the built-in slots add_scalar filled in the last step
  double num_tokens_ = 0;
  bool counted_tokens_ = false;
};

}  // namespace eigen
PREFOPT_END_NAMESPACE
