// SPDX-License-Identifier: Apache-2.0
// The DPO family: every TRL `loss_type` (sigmoid, hinge, ipo, robust, ...), f-divergences,
// multi-loss (MPO) weights, the sft/RPO term and the bco_pair running-mean baseline.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOSSES_DPO
#endif

#include <prefopt/losses/common.h>

#include <memory>
#include <string>
#include <vector>

PREFOPT_BEGIN_NAMESPACE

/// TRL's name of a loss type (`"sigmoid"`, `"exo_pair"`, ...).
PREFOPT_API const char* dpo_loss_type_name(DPOLossType type);
/// The loss type TRL calls `name`; a TORCH_CHECK_VALUE listing the names for anything else.
PREFOPT_API DPOLossType dpo_loss_type_from_name(const std::string& name);
/// TRL's name of an f-divergence (`"reverse_kl"`, ...).
PREFOPT_API const char* f_divergence_name(FDivergence f);
/// The f-divergence TRL calls `name`; a TORCH_CHECK_VALUE for anything else.
PREFOPT_API FDivergence f_divergence_from_name(const std::string& name);

/// Options of `functional::dpo_loss`. Defaults are current TRL's (1.x); each anchor's
/// deviation is an option, whose doc names the TRL version or anchor it reproduces (see also
/// the README's loss table).
///
/// Example:
/// ```
/// auto opts = prefopt::DPOLossOptions().beta(0.1).loss_type(prefopt::DPOLossType::kIPO);
/// auto mpo = prefopt::DPOLossOptions()
///                .loss_type({prefopt::DPOLossType::kSigmoid, prefopt::DPOLossType::kBCOPair,
///                            prefopt::DPOLossType::kSFT})
///                .loss_weights({0.8, 0.2, 1.0});
/// ```
struct DPOLossOptions {
  DPOLossOptions() = default;
  /// Lets a reduction tag stand for the options: `F::dpo_loss(pc, pr, rc, rr, torch::kSum)`.
  template <typename R, typename = detail::if_reduction_tag<R>>
  DPOLossOptions(R reduction) : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

  /// One loss type. Default: kSigmoid.
  DPOLossOptions& loss_type(DPOLossType type) {
    loss_type_ = {type};
    return *this;
  }
  /// Several loss types, summed with `loss_weights` (TRL's list form; MPO).
  DPOLossOptions& loss_type(std::vector<DPOLossType> types) {
    loss_type_ = std::move(types);
    return *this;
  }
  /// The loss types.
  const std::vector<DPOLossType>& loss_type() const noexcept { return loss_type_; }

  /// Weight of each loss type; empty means 1 for each. The loss is Σ_k w_k·mean(losses_k).
  /// A negative weight (which maximises its term) warns. Default: {}.
  TORCH_ARG(std::vector<double>, loss_weights) = {};
  /// β: the inverse temperature of the implicit reward β·ρ (IPO's τ). Must be > 0.
  /// Default: 0.1.
  TORCH_ARG(double, beta) = 0.1;
  /// ε ∈ [0, 0.5): the label-flip rate of `robust`, `aot`, `aot_unpaired` and `exo_pair`'s
  /// target (which needs ε > 0), as in TRL ≥ 0.29, where one ε serves a mixed list of types and
  /// `sigmoid`/`sigmoid_norm` ignore it. With `cdpo` it also smooths `sigmoid` and
  /// `sigmoid_norm`. An ε that no selected type uses is an error, never silently ignored.
  /// Default: 0.
  TORCH_ARG(double, label_smoothing) = 0.0;
  /// Conservative DPO (cDPO, arXiv:2305.18290): `label_smoothing` also smooths `sigmoid` and
  /// `sigmoid_norm`, −(1−ε)ℓ(z) − εℓ(−z), as TRL ≤ 0.28, LLaMA-Factory and OpenRLHF apply it
  /// to sigmoid. Migrating a TRL ≤ 0.28 run of `loss_type="sigmoid", label_smoothing=ε`: set
  /// `.label_smoothing(ε).cdpo(true)`. Default: false (TRL ≥ 0.29).
  TORCH_ARG(bool, cdpo) = false;
  /// The f-divergence mapping log-ratios to scores (see `FDivergence`, TRL ≥ 1.10's
  /// constants). Any other than kReverseKL is an error with a loss type that reads each side's
  /// log-ratio alone (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, aot, aot_unpaired),
  /// as in TRL ≥ 1.10; with `sft` alone (which reads no log-ratio) it warns that it is
  /// ignored. Default: kReverseKL.
  TORCH_ARG(FDivergence, f_divergence_type) = FDivergence::kReverseKL;
  /// α of kAlphaDivergence. TRL ≤ 0.28's coefficient a (default 1.0) is α = 1 − a here. Read
  /// with `f_divergence_type` kAlphaDivergence only: another value than 0.5 with any other
  /// warns that it is ignored. Default: 0.5 (TRL ≥ 0.29).
  TORCH_ARG(double, f_alpha_divergence_coef) = 0.5;
  /// τ of `discopop`. Must be > 0. Read by `discopop` only: another value than 0.05 without it
  /// warns that it is ignored. Default: 0.05.
  TORCH_ARG(double, discopop_tau) = 0.05;
  /// IPO's length normalisation. Read by `ipo` only: kNone without it warns that it is
  /// ignored. Default: kPerToken.
  TORCH_ARG(IPONormalization, ipo_normalization) = IPONormalization::kPerToken;
  /// Leave the reference out of the loss (ρ = logp_policy): TRL ≤ 0.28's `reference_free`
  /// (removed in 0.29, which recommends CPO). The reference may then be undefined; when it is
  /// given it still feeds the logged rewards β·(π − ref), as in TRL, and a warning says it is
  /// unused in the loss. TRL ≤ 0.28 applied it to sigmoid, hinge, ipo, robust, exo_pair,
  /// apo_zero and apo_down only: its nca_pair, bco_pair, sppo_hard, aot, aot_unpaired and
  /// discopop kept the reference; here every type leaves it out. Default: false.
  TORCH_ARG(bool, reference_free) = false;
  /// RPO (arXiv:2404.19733 v3, TRL ≤ 0.28): adds α·NLL to every pair's loss; the same as
  /// appending kSFT with weight α. A negative α warns. Default: 0.
  TORCH_ARG(double, rpo_alpha) = 0.0;
  /// How kSFT / `rpo_alpha` average the chosen NLL. Not read without either, nor when
  /// `PairInputs::nll_loss` is given: kSequenceMean then warns that it is ignored.
  /// Default: kTokenMean (TRL).
  TORCH_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Rewards (Σ_k w_k)·β·ρ over every type, `sft`'s weight included, as TRL ≤ 0.28 logged
  /// them with several loss types (MPO); otherwise β·ρ, as TRL ≥ 0.29. Default: false.
  TORCH_ARG(bool, weighted_rewards) = false;
  /// Functor only: keep `bco_pair`'s running-mean baseline (TRL ≤ 0.28, LLaMA-Factory) in a
  /// `BCOBaseline` that the `DPOLoss` holds (an error without `bco_pair`). Default: false
  /// (TRL ≥ 0.29 and Liger: no baseline).
  TORCH_ARG(bool, bco_running_mean) = false;
  /// Reduction of the per-pair losses. Default: torch::kMean.
  TORCH_ARG(LossReduction, reduction) = torch::kMean;

 private:
  std::vector<DPOLossType> loss_type_{DPOLossType::kSigmoid};
};

/// Result of `functional::dpo_loss`.
struct DPOLossResult {
  at::Tensor loss;              ///< reduced loss (0-dim), or [B] with torch::kNone
  at::Tensor losses;            ///< [B] per-pair loss, weights and all loss types included
  at::Tensor chosen_rewards;    ///< [B] β·ρ_c (detached; see `weighted_rewards`)
  at::Tensor rejected_rewards;  ///< [B] β·ρ_r (detached)
  at::Tensor nll_loss;          ///< the NLL of kSFT / `rpo_alpha` (detached); undefined if unused
  at::Tensor chosen_logps;      ///< [B] policy log-probs the loss consumed (sums), detached
  at::Tensor rejected_logps;    ///< [B] the same for the rejected completions
};

/// The running mean of `bco_pair`'s rewards, δ (TRL ≤ 0.28's `RunningMoments`, as used by
/// BCO and LLaMA-Factory's MPO). Each step folds in the mean of that step's chosen and
/// rejected rewards as one sample; across ranks, fold in the ranks' statistics instead
/// (mean, biased variance and count of the per-rank means).
///
/// Example:
/// ```
/// prefopt::BCOBaseline baseline;
/// auto delta = baseline.update(chosen_rewards, rejected_rewards);
/// auto r = F::dpo_loss(inputs, delta, opts);  // the overload that takes bco_pair's δ
/// ```
class PREFOPT_API BCOBaseline {
 public:
  /// Folds in `count` samples of mean `mean` and (biased) variance `var`; returns the new mean.
  double update(double mean, double var = 0.0, double count = 1.0);
  /// Folds in the mean of the step's β·ρ_c and β·ρ_r; returns δ as a 0-dim tensor on their
  /// device. Reads one scalar from the device.
  at::Tensor update(const at::Tensor& chosen_rewards, const at::Tensor& rejected_rewards);

  /// The running mean δ.
  double mean() const noexcept { return mean_; }
  /// The running (biased) variance.
  double var() const noexcept { return var_; }
  /// The number of samples folded in (starts at 1e-24, as TRL's).
  double count() const noexcept { return count_; }
  /// Restores a saved state (mean, var, count): a finite mean, a finite var ≥ 0 and a finite
  /// count > 0, or a TORCH_CHECK_VALUE.
  void load(double mean, double var, double count);

 private:
  double mean_ = 0.0;
  double var_ = 1.0;
  double count_ = 1e-24;  // TRL's initial count: the first update sets the mean.
};

namespace functional {

/// The options of the functional form (`DPOLossOptions`, as libtorch names them).
using DPOLossFuncOptions = DPOLossOptions;

/// DPO-family loss of B pairs (arXiv:2305.18290 and the papers of each `DPOLossType`).
///
/// `loss = reduce(weights ⊙ (Σ_k w_k · losses_k + rpo_alpha · NLL))`, e.g. for `sigmoid`
/// `losses = −log σ(β[(π_c − π_r) − (ref_c − ref_r)])`. With the mean that is TRL ≥ 0.29's
/// Σ_k w_k · mean(weights ⊙ losses_k), and TRL ≤ 0.28's RPO term, which the WPO weights
/// scale too (the NLL is added to every pair's loss, so torch::kSum counts it B times).
///
/// - `policy_*_logps`: [B], summed completion log-probs (native form: sums; per-token means
///   are converted with the lengths), any floating dtype (bf16/fp16 are computed in fp32,
///   fp64 in fp64); differentiable.
/// - `reference_*_logps`: [B], same form and dtype family; may be undefined with
///   `reference_free`. Always treated as constants: no gradient reaches them.
/// - `PairInputs` also carries `chosen_lengths`/`rejected_lengths` (IPO, `sigmoid_norm`,
///   token-mean NLL), WPO `weights` and an explicit `nll_loss`; the overload below adds
///   `bco_pair`'s baseline.
///
/// Returns `DPOLossResult` {loss, losses, chosen_rewards, rejected_rewards, nll_loss,
/// chosen_logps, rejected_logps}.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto r = F::dpo_loss(pc, pr, rc, rr);                        // sigmoid, β = 0.1
/// auto ipo = F::dpo_loss(prefopt::PairInputs(policy, reference),
///                        prefopt::DPOLossOptions().loss_type(prefopt::DPOLossType::kIPO));
/// r.loss.backward();
/// ```
PREFOPT_API DPOLossResult dpo_loss(const PairInputs& inputs,
                                   const DPOLossFuncOptions& options = {});

/// `dpo_loss` on the four log-prob vectors alone.
PREFOPT_API DPOLossResult dpo_loss(const at::Tensor& policy_chosen_logps,
                                   const at::Tensor& policy_rejected_logps,
                                   const at::Tensor& reference_chosen_logps,
                                   const at::Tensor& reference_rejected_logps,
                                   const DPOLossFuncOptions& options = {});

/// `dpo_loss` with `bco_pair`'s running-mean baseline δ (0-dim tensor or a number): the
/// functional form of what `DPOLoss` does with `bco_running_mean`. δ needs `bco_pair` among
/// the loss types, and must be finite (checked for a CPU δ); an undefined δ is no baseline.
/// The overloads without δ refuse `bco_running_mean(true)`, whose baseline only the functor
/// keeps.
///
/// Example:
/// ```
/// prefopt::BCOBaseline baseline;  // the host's state, saved with its checkpoints
/// auto delta = baseline.update(beta * rho_chosen, beta * rho_rejected);
/// auto r = F::dpo_loss(inputs, delta, DPOLossOptions().loss_type(DPOLossType::kBCOPair));
/// ```
PREFOPT_API DPOLossResult dpo_loss(const PairInputs& inputs, const at::Tensor& bco_delta,
                                   const DPOLossFuncOptions& options);

}  // namespace functional

/// Functor form of `functional::dpo_loss`, callable on a const object like the other loss
/// functors. With `bco_running_mean` (and `bco_pair`) it holds `bco_pair`'s running baseline
/// and updates it on every call; copies of the functor share that baseline. A call that
/// throws leaves the baseline unchanged. The update is not synchronised: calls with a baseline
/// must not run concurrently (it is training state that one loop advances step by step).
///
/// Example:
/// ```
/// const prefopt::DPOLoss dpo(prefopt::DPOLossOptions().beta(0.1));
/// auto r = dpo(prefopt::PairInputs(policy, reference));
/// ```
class PREFOPT_API DPOLoss {
 public:
  /// A DPO loss with `options` (and, with `bco_running_mean`, a fresh baseline).
  explicit DPOLoss(DPOLossOptions options = {});
  /// `functional::dpo_loss(inputs, options())`, with the baseline when it keeps one.
  DPOLossResult operator()(const PairInputs& inputs) const;
  /// The same on the four summed log-prob vectors.
  DPOLossResult operator()(const at::Tensor& policy_chosen_logps,
                           const at::Tensor& policy_rejected_logps,
                           const at::Tensor& reference_chosen_logps,
                           const at::Tensor& reference_rejected_logps) const {
    return (*this)(PairInputs()
                       .policy_chosen_logps(policy_chosen_logps)
                       .policy_rejected_logps(policy_rejected_logps)
                       .reference_chosen_logps(reference_chosen_logps)
                       .reference_rejected_logps(reference_rejected_logps)
                       .logps_form(LogpsForm::kSum));
  }
  /// The options the functor was made with.
  const DPOLossOptions& options() const noexcept { return options_; }
  /// The running baseline (only with `bco_running_mean`; a TORCH_CHECK otherwise).
  BCOBaseline& bco_baseline() const;

 private:
  DPOLossOptions options_;
  std::shared_ptr<BCOBaseline> baseline_;  // only with bco_running_mean
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOSSES_DPO
#undef PREFOPT_OUTERMOST_LOSSES_DPO
#include <prefopt/detail/header_only.h>
#endif
