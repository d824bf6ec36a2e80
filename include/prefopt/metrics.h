// SPDX-License-Identifier: Apache-2.0
// Training metrics with TRL's names, reduced exactly over gradient-accumulation micro-steps and
// over ranks (one collective per log step), and a JSON Lines writer for them.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_METRICS
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/common.h>
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace c10d {
class ProcessGroup;
}

PREFOPT_BEGIN_NAMESPACE

/// How a metric is averaged over the micro-steps (and ranks) of one logging window.
enum class MetricWindow {
  /// The plain mean over micro-steps of each micro-step's value, where a micro-step's value
  /// pools every rank: its examples for the per-example metrics, its tokens for the token
  /// metrics (`logits/*`, `entropy`, `mean_token_accuracy`), its ranks' samples for scalars;
  /// except where TRL averages each rank's mean (CPO's and ORPO's `logits/*` under
  /// kAllPositions, ORPO's `log_odds_*`, TPO's `entropy`): the mean of the ranks' means.
  /// Current TRL (DPO, CPO, ORPO, TPO; KTO since 1.6): `log()` averages the stored per-step
  /// values. A micro-step without examples (or tokens) of a metric is left out of that
  /// metric's mean, where TRL averages in a 0 for the token metrics and a NaN for a pairwise
  /// step without pairs (its KTO leaves such a step out too).
  kMeanOfSteps,
  /// Σ values / Σ counts over the whole window and every rank, tokens pooled likewise: TRL's
  /// KTO up to 1.5.x and LLaMA-Factory's KTO. With equal counts in every micro-step both
  /// windows agree.
  kCountWeighted,
};

/// Which positions `logits/chosen` and `logits/rejected` average the vocabulary-mean logit
/// over.
enum class LogitsMetric {
  kScored,        ///< completion tokens that are scored (TRL ≥ 0.29); needs `with_logits_mean`
  kAllPositions,  ///< every position, prompt and padding included (TRL's CPO and ORPO,
                  ///< LLaMA-Factory, torchtune, Liger); needs `with_logits_mean_unmasked`
};

/// Options of `MetricAccumulator`.
///
/// Example:
/// ```
/// auto opts = prefopt::MetricsOptions().window(prefopt::MetricWindow::kCountWeighted);
/// ```
struct MetricsOptions {
  /// Averaging over the window. Default: kMeanOfSteps (current TRL).
  TORCH_ARG(MetricWindow, window) = MetricWindow::kMeanOfSteps;
  /// Prefix of every name: "" in training, "eval_" in evaluation (as TRL logs them).
  TORCH_ARG(std::string, prefix) = "";
  /// Positions of `logits/*`. Default: kScored.
  TORCH_ARG(LogitsMetric, logits) = LogitsMetric::kScored;
};

/// The metrics of one log step: names in a fixed order (TRL's), each with its value.
///
/// Example:
/// ```
/// prefopt::Metrics m = acc.compute();
/// double acc1 = m.at("rewards/accuracies");
/// for (const auto& [name, value] : m) { ... }
/// ```
class PREFOPT_API Metrics {
 public:
  /// A metric: its name and value.
  using value_type = std::pair<std::string, double>;
  /// Iterates the metrics in order.
  using const_iterator = std::vector<value_type>::const_iterator;

  /// Sets `name` (appended if new, replaced in place otherwise).
  void set(const std::string& name, double value);
  /// The value of `name`; a TORCH_CHECK_INDEX naming the metrics present if it is missing.
  double at(const std::string& name) const;
  /// Pointer to the value of `name`, or nullptr.
  const double* find(const std::string& name) const;
  /// Whether `name` is present.
  bool contains(const std::string& name) const { return find(name) != nullptr; }

  /// The first metric.
  const_iterator begin() const noexcept { return items_.begin(); }
  /// Past the last metric.
  const_iterator end() const noexcept { return items_.end(); }
  /// The number of metrics.
  size_t size() const noexcept { return items_.size(); }
  /// Whether there are none.
  bool empty() const noexcept { return items_.empty(); }

 private:
  std::vector<value_type> items_;
};

/// Accumulates the metrics of every micro-step between two log steps and reduces them, over
/// the micro-steps and over the ranks of a c10d process group, when `compute` is called.
///
/// What each micro-step contributes (names as TRL logs them, `prefix` prepended):
/// - `loss` (the mean when `loss` is a vector), `nll_loss` (DPO's sft/RPO term, CPO's (0 when
///   `cpo_alpha` = 0), ORPO's; TPO's is not logged, as in TRL), `kl`, and scalars from
///   `add_scalar`: one sample per micro-step and rank;
/// - `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`: the examples of
///   each side (`logps/*` are the log-probs the loss consumed, the result's `chosen_logps`:
///   sums for DPO, means for SimPO/ORPO, as TRL logs them);
/// - `rewards/accuracies`: the fraction of pairs with r_c > r_r (ties are not accurate);
/// - `rewards/margins`: `rewards/chosen − rewards/rejected` of the same window (for pairs this
///   is the mean of r_c − r_r; for KTO a micro-step needs both sides);
/// - `log_odds_ratio`, `log_odds_chosen` (ORPO): pair means, per rank (see its `add`);
/// - from the policy's `SequenceLogprobs`, token-weighted over the ranks (and averaged over
///   the micro-steps as the window says; CPO's and ORPO's `logits/*` under kAllPositions are
///   per rank, see their `add`): `logits/chosen`, `logits/rejected` (see
///   `LogitsMetric`; gather with `with_logits_mean`), `entropy` over both sides
///   (`with_entropy`), `mean_token_accuracy` (`with_token_accuracy`) over the chosen side for
///   pairwise losses (TRL ≥ 0.29), both sides for KTO; a statistic that was not gathered
///   leaves its metric out with a warning (once per process) naming the option;
///   `num_tokens`: scored tokens seen since the accumulator was made, summed over ranks, each
///   counted once (TRL counts prompt tokens too); TPO's `entropy` is TRL's per-rank form (see
///   its `add`).
///
/// A side with no examples contributes nothing and breaks nothing: its metrics are absent
/// from a window that has none, never NaN. Nothing is read from the device before `compute`.
///
/// `add` checks sizes (a TORCH_CHECK before it touches the window, so that a refused call
/// leaves it as it was): as many chosen as rejected rewards for pairs, and in each
/// `SequenceLogprobs` one value of every statistic per sequence (as `count`, or `positions`
/// without counts), one sequence per reward of its side, and statistics for every side that has
/// rewards (a side left out would silently narrow `entropy` to the other side).
///
/// Every rank must make the same calls (the same number of micro-steps, the same
/// `add_scalar` names in the same order) before the collective `compute(group)`.
///
/// Example:
/// ```
/// prefopt::MetricAccumulator metrics;
/// for (int micro = 0; micro < grad_accum; ++micro) {
///   auto r = F::dpo_loss(prefopt::PairInputs(policy, reference), opts);
///   (r.loss / grad_accum).backward();
///   metrics.add(r, prefopt::PairInputs(policy, reference), policy);
/// }
/// prefopt::Metrics m = metrics.compute(group.get());  // nullptr: this process alone
/// fmt::print("{}\n", m);                              // with <prefopt/fmt.h>
/// ```
class PREFOPT_API MetricAccumulator {
 public:
  /// An empty window with `options`.
  explicit MetricAccumulator(MetricsOptions options = {});

  /// A DPO-family micro-step; `policy` (optional) feeds the token metrics.
  void add(const DPOLossResult& result, const PairInputs& inputs);
  /// The same, with the policy's token statistics.
  void add(const DPOLossResult& result, const PairInputs& inputs, const PairLogprobs& policy);
  /// A CPO / SimPO / AlphaPO micro-step. `nll_loss` is logged as 0 when the loss has no NLL
  /// term (`cpo_alpha` = 0, and AlphaPO, for which TRL sets it to 0), as TRL's CPOTrainer
  /// logs it.
  void add(const CPOLossResult& result, const PairInputs& inputs);
  /// The same, with the policy's token statistics. Under kAllPositions with the default
  /// kMeanOfSteps window, `logits/*` are TRL's CPO form, `gather(logits.mean()).mean()`: each
  /// rank's mean over its positions, averaged over the ranks (a rank with no positions is left
  /// out; TRL: NaN). kScored, and a kCountWeighted window, pool the tokens as for DPO.
  void add(const CPOLossResult& result, const PairInputs& inputs, const PairLogprobs& policy);
  /// A TPO micro-step: CPO's metrics but `nll_loss`, which TRL's TPOTrainer does not log.
  void add(const TPOLossResult& result, const PairInputs& inputs);
  /// The same, with the policy's token statistics and the gold responses' (optional; pass them
  /// only when `tpo_alpha` ≠ 0, as TRL drops the gold branch otherwise). With the default
  /// kMeanOfSteps window `entropy` is then TRL's TPO form: each rank's mean over every
  /// completion token of the branches (chosen, rejected, gold), averaged over the ranks; a rank
  /// with no tokens is left out (TRL: NaN). `num_tokens` counts the gold tokens too. `logits/*`
  /// and `mean_token_accuracy` are as for DPO (TRL's TPO pools the ranks' scored tokens).
  void add(const TPOLossResult& result, const PairInputs& inputs, const PairLogprobs& policy,
           const SequenceLogprobs& gold = {});
  /// An ORPO micro-step (also `log_odds_ratio`, `log_odds_chosen`). With the default
  /// kMeanOfSteps window these are TRL's `gather(torch.mean(x)).mean()`: each rank's mean over
  /// its pairs, averaged over the ranks (a rank without pairs is left out; TRL: NaN), where a
  /// kCountWeighted window pools the pairs.
  void add(const ORPOLossResult& result, const PairInputs& inputs);
  /// The same, with the policy's token statistics; `logits/*` as for CPO (per rank under
  /// kAllPositions).
  void add(const ORPOLossResult& result, const PairInputs& inputs, const PairLogprobs& policy);
  /// A KTO micro-step (also `kl`); either side may be empty.
  void add(const KTOLossResult& result, const KTOInputs& inputs);
  /// The same, with the token statistics of both sides.
  void add(const KTOLossResult& result, const KTOInputs& inputs, const SequenceLogprobs& chosen,
           const SequenceLogprobs& rejected);
  /// An SFT micro-step (TRL's SFTTrainer): `loss` (0-dim) and, from the log-probs of the
  /// scored tokens, `mean_token_accuracy` (`with_token_accuracy`), `entropy` (`with_entropy`)
  /// and `num_tokens`, token-weighted like the pairwise token metrics.
  void add(const at::Tensor& loss, const SequenceLogprobs& lp);
  /// Adds one sample of a scalar metric (e.g. `aux_loss`, `grad_norm`) to the current
  /// micro-step: the one the last `add` started, or, before any `add` in the window, the one
  /// the next `add` fills. `value` (0-dim, any device) is read only at `compute`. The built-in
  /// `loss`, `nll_loss` and `kl` may come from here where no `add` logs them (a host's own
  /// loss, one sample per call); in a micro-step whose `add` logs one, giving it here too is an
  /// error (the two would be averaged into one value).
  void add_scalar(const std::string& name, const at::Tensor& value);
  /// The same from a number.
  void add_scalar(const std::string& name, double value);

  /// Reduces the window over its micro-steps and, with a group, over the group's ranks (one
  /// all-reduce of one packed fp64 tensor, on the device the losses were on, after a 6-value
  /// one that checks that the ranks' windows agree), then starts a new window. Returns the
  /// metrics in TRL's order; an empty window gives only `num_tokens` if tokens were ever
  /// counted.
  Metrics compute(c10d::ProcessGroup* group = nullptr);

  /// Reduces the windows of several accumulators in this process as if each were one rank of
  /// a process group (the all-reduce done locally), and returns what `compute(group)` would
  /// return on every rank; each accumulator starts a new window. For checking a multi-rank
  /// trainer's logged numbers offline (`prefopt-eval`'s metrics requests) and for tests. The
  /// accumulators must have made the same calls (same micro-steps, same `add_scalar` names):
  /// a TORCH_CHECK names the first difference, as it does an accumulator passed twice. Uses the
  /// options of `ranks[0]`.
  ///
  /// Example:
  /// ```
  /// prefopt::MetricAccumulator rank0, rank1;
  /// rank0.add(r0, in0);  rank1.add(r1, in1);
  /// auto m = prefopt::MetricAccumulator::compute_ranks({&rank0, &rank1});
  /// ```
  static Metrics compute_ranks(const std::vector<MetricAccumulator*>& ranks);

  /// Micro-steps in the current window.
  int64_t steps() const noexcept { return static_cast<int64_t>(steps_.size()); }
  /// The options of the accumulator.
  const MetricsOptions& options() const noexcept { return options_; }

 private:
  struct Slot {
    std::string name;
    bool scalar;  // a per-micro-step sample, not a per-example mean
  };
  // Per micro-step: one [2] fp64 tensor (Σ value, count) per slot, undefined where absent.
  using Step = std::vector<at::Tensor>;

  at::Tensor pack() const;  // [steps · slots, 2] fp64, or undefined for an empty window
  Metrics finish(const at::Tensor& packed);  // reduces `pack()`'s sum over ranks, clears
  // The next add's step; `fills`: the built-in scalar slots that add logs (checked against
  // add_scalar values in an open step).
  Step& new_step(std::initializer_list<size_t> fills);
  Step& current_step();
  size_t slot(const std::string& name, bool scalar);
  void put(Step& step, size_t slot, const at::Tensor& sum, const at::Tensor& count);
  void put_examples(Step& step, size_t slot, const at::Tensor& values);
  void put_pairs(Step& step, const at::Tensor& loss, const at::Tensor& chosen_rewards,
                 const at::Tensor& rejected_rewards, const PairInputs& inputs);
  void put_logps(Step& step, const at::Tensor& chosen, const at::Tensor& rejected,
                 const PairInputs& inputs);
  struct TokenSides {
    bool logits;             // log logits/* (not for SFT steps)
    bool accuracy_rejected;  // mean_token_accuracy over the rejected side too (KTO)
  };
  void put_tokens(Step& step, const SequenceLogprobs& chosen, const SequenceLogprobs& rejected,
                  TokenSides sides);

  MetricsOptions options_;
  std::vector<Slot> slots_;
  std::vector<Step> steps_;
  bool open_step_ = false;        // add_scalar before any add opens a step the next add reuses
  uint32_t scalar_builtins_ = 0;  // the built-in slots add_scalar filled in the last step
  double num_tokens_ = 0;
  bool counted_tokens_ = false;
};

/// Appends one JSON object per log step to a file: `{"step": N, "<name>": value, ...}` and a
/// newline, written with a single `write` on a file opened for appending, so a crash loses at
/// most the line being written and concurrent writers never interleave within a line. A write
/// that fails part-way (disk full, quota, file-size limit) is cut back to where its line began,
/// so that the file holds only complete lines, and throws. Non-finite values are written as
/// `null`. Uses nlohmann-json for the encoding.
///
/// Example:
/// ```
/// prefopt::JsonlWriter log("metrics.jsonl");
/// log.write(step, metrics.compute(group));
/// ```
class PREFOPT_API JsonlWriter {
 public:
  /// Opens (creating if needed) `path` for appending; `sync`: also fsync every line (a
  /// failed fsync throws, naming the file).
  explicit JsonlWriter(const std::string& path, bool sync = false);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;
  /// Takes over `other`'s file.
  JsonlWriter(JsonlWriter&& other) noexcept;
  /// Closes this writer's file and takes over `other`'s.
  JsonlWriter& operator=(JsonlWriter&& other) noexcept;

  /// Writes one line: `step` first, then the metrics in order. Throws (c10::Error) when a
  /// metric name is not valid UTF-8 or is `step` itself, or when the line cannot be written
  /// whole.
  void write(int64_t step, const Metrics& metrics);
  /// The file written to.
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  bool sync_ = false;
};

/// One JSON object (no newline) as `JsonlWriter` writes it. Throws (c10::Error) when a metric
/// name (prefix included) is not valid UTF-8, or is `step`, the key of the step number.
PREFOPT_API std::string to_json(int64_t step, const Metrics& metrics);

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_METRICS
#undef PREFOPT_OUTERMOST_METRICS
#include <prefopt/detail/header_only.h>
#endif
