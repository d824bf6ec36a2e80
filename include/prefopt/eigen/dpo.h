// SPDX-License-Identifier: Apache-2.0
// The DPO family on Eigen vectors, with closed-form gradients: every TRL `loss_type`,
// f-divergences, multi-loss (MPO) weights, the sft/RPO term, WPO weights and bco_pair's
// baseline.
//
// Mirrors include/prefopt/losses/dpo.h and include/prefopt/losses/dpo-inl.h (the reference this
// layer is tested against, in tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>

#include <memory>
#include <numeric>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// Options of `eigen::dpo_loss`: the libtorch layer's `DPOLossOptions`, same names, defaults
/// (current TRL, 1.x) and checks.
///
/// Example:
/// ```
/// namespace pe = prefopt::eigen;
/// auto opts = pe::DPOLossOptions().beta(0.1).loss_type(prefopt::DPOLossType::kIPO);
/// auto mpo = pe::DPOLossOptions()
///                .loss_type({prefopt::DPOLossType::kSigmoid, prefopt::DPOLossType::kBCOPair,
///                            prefopt::DPOLossType::kSFT})
///                .loss_weights({0.8, 0.2, 1.0});
/// ```
struct DPOLossOptions {
  /// The defaults.
  DPOLossOptions() = default;
  /// Lets a reduction stand for the options: `dpo_loss(in, Reduction::kSum)`.
  DPOLossOptions(Reduction reduction)
      : reduction_(reduction) {}  // NOLINT(google-explicit-constructor)

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
  /// Default: {}.
  PREFOPT_EIGEN_ARG(std::vector<double>, loss_weights) = {};
  /// β: the inverse temperature of the implicit reward β·ρ (IPO's τ). Must be > 0.
  /// Default: 0.1.
  PREFOPT_EIGEN_ARG(double, beta) = 0.1;
  /// ε ∈ [0, 0.5): the label-flip rate of `robust`, `aot`, `aot_unpaired` and `exo_pair`'s
  /// target (which needs ε > 0); with `cdpo` it also smooths `sigmoid` and `sigmoid_norm`. An
  /// ε that no selected type uses is an error. Default: 0.
  PREFOPT_EIGEN_ARG(double, label_smoothing) = 0.0;
  /// Conservative DPO: `label_smoothing` also smooths `sigmoid` and `sigmoid_norm`,
  /// −(1−ε)ℓ(z) − εℓ(−z) (TRL ≤ 0.28, LLaMA-Factory, OpenRLHF). Default: false (TRL ≥ 0.29).
  PREFOPT_EIGEN_ARG(bool, cdpo) = false;
  /// The f-divergence mapping log-ratios to scores; with `sft` alone (which reads no
  /// log-ratio) another than kReverseKL warns that it is ignored. Default: kReverseKL.
  PREFOPT_EIGEN_ARG(FDivergence, f_divergence_type) = FDivergence::kReverseKL;
  /// α of kAlphaDivergence (TRL ≤ 0.28's coefficient a is α = 1 − a). Read with
  /// kAlphaDivergence only: another value than 0.5 otherwise warns. Default: 0.5.
  PREFOPT_EIGEN_ARG(double, f_alpha_divergence_coef) = 0.5;
  /// τ of `discopop`. Must be > 0. Read by `discopop` only: another value than 0.05 without it
  /// warns. Default: 0.05.
  PREFOPT_EIGEN_ARG(double, discopop_tau) = 0.05;
  /// IPO's length normalisation. Read by `ipo` only: kNone without it warns. Default: kPerToken.
  PREFOPT_EIGEN_ARG(IPONormalization, ipo_normalization) = IPONormalization::kPerToken;
  /// Leave the reference out of the loss (ρ = logp_policy), TRL ≤ 0.28. A reference that is
  /// given still feeds the rewards β·(π − ref) (with a warning). Default: false.
  PREFOPT_EIGEN_ARG(bool, reference_free) = false;
  /// RPO: adds α·NLL to every pair's loss (the same as appending kSFT with weight α).
  /// Default: 0.
  PREFOPT_EIGEN_ARG(double, rpo_alpha) = 0.0;
  /// How kSFT / `rpo_alpha` average the chosen NLL. Not read without either, nor when
  /// `PairInputs::nll_loss` is given: kSequenceMean then warns. Default: kTokenMean (TRL).
  PREFOPT_EIGEN_ARG(NLLNormalization, nll_normalization) = NLLNormalization::kTokenMean;
  /// Rewards (Σ_k w_k)·β·ρ over every type, `sft`'s weight included (TRL ≤ 0.28 with several
  /// types); otherwise β·ρ. Default: false.
  PREFOPT_EIGEN_ARG(bool, weighted_rewards) = false;
  /// Functor only: `DPOLoss` keeps `bco_pair`'s running-mean baseline in a `BCOBaseline`
  /// (TRL ≤ 0.28, LLaMA-Factory); an error without `bco_pair`. Default: false.
  PREFOPT_EIGEN_ARG(bool, bco_running_mean) = false;
  /// Reduction of the per-pair losses. Default: kMean.
  PREFOPT_EIGEN_ARG(Reduction, reduction) = Reduction::kMean;

 private:
  std::vector<DPOLossType> loss_type_{DPOLossType::kSigmoid};
};

/// Result of `eigen::dpo_loss`: the libtorch layer's `DPOLossResult` plus the gradients of
/// `loss` (of the sum of its entries with Reduction::kNone) with respect to each input vector,
/// as given (sums or means).
///
/// Example:
/// ```
/// auto r = prefopt::eigen::dpo_loss(in);
/// host_backward(r.grad_policy_chosen, r.grad_policy_rejected);  // dL/d(sequence log-prob)
/// ```
template <typename T>
struct DPOLossResult {
  Vector<T> loss;                     ///< [1] reduced loss, or [B] with Reduction::kNone
  Vector<T> losses;                   ///< [B] per-pair loss, weights and all loss types included
  Vector<T> chosen_rewards;           ///< [B] β·ρ_c (see `weighted_rewards`)
  Vector<T> rejected_rewards;         ///< [B] β·ρ_r
  std::optional<T> nll_loss;          ///< the NLL of kSFT / `rpo_alpha`; empty if unused
  Vector<T> chosen_logps;             ///< [B] policy log-probs the loss consumed (sums)
  Vector<T> rejected_logps;           ///< [B] the same for the rejected completions
  Vector<T> grad_policy_chosen;       ///< [B] d loss / d policy_chosen_logps
  Vector<T> grad_policy_rejected;     ///< [B] d loss / d policy_rejected_logps
  Vector<T> grad_reference_chosen;    ///< [B] d loss / d reference_chosen_logps ([0] if none)
  Vector<T> grad_reference_rejected;  ///< [B] d loss / d reference_rejected_logps ([0] if none)
  T grad_nll_loss = T(0);             ///< d loss / d PairInputs::nll_loss (0 when it is not given)
};

/// The running mean of `bco_pair`'s rewards, δ (TRL ≤ 0.28's `RunningMoments`): the libtorch
/// layer's `BCOBaseline`. Each step folds in the mean of that step's chosen and rejected
/// rewards as one sample.
///
/// Example:
/// ```
/// prefopt::eigen::BCOBaseline baseline;
/// double delta = baseline.update(chosen_rewards, rejected_rewards);
/// auto r = prefopt::eigen::dpo_loss(in, delta, opts);
/// ```
class BCOBaseline {
 public:
  /// Folds in `count` samples of mean `mean` and (biased) variance `var`; returns the new mean.
  double update(double mean, double var = 0.0, double count = 1.0) {
    detail::check(valid(mean, var, count), "prefopt::eigen::BCOBaseline::update",
                  ": expected a finite mean, a finite var >= 0 and a finite count > 0, got mean ",
                  mean, ", var ", var, ", count ", count);
    // Chan et al.'s parallel update, as TRL's RunningMoments does it.
    const double delta = mean - mean_;
    const double total = count_ + count;
    const double m2 = var_ * count_ + delta * delta * count_ * count / total + var * count;
    mean_ += delta * count / total;
    var_ = m2 / total;
    count_ = total;
    return mean_;
  }
  /// Folds in the mean (in double) of the step's β·ρ_c and β·ρ_r; returns δ.
  template <typename T>
  double update(const Vector<T>& chosen_rewards, const Vector<T>& rejected_rewards) {
    const Eigen::Index n = chosen_rewards.size() + rejected_rewards.size();
    detail::check(n > 0, "prefopt::eigen::BCOBaseline::update",
                  ": expected at least one reward, got none");
    const double sum = chosen_rewards.template cast<double>().sum() +
                       rejected_rewards.template cast<double>().sum();
    return update(sum / static_cast<double>(n));
  }
  /// The running mean δ.
  double mean() const noexcept { return mean_; }
  /// The running (biased) variance.
  double var() const noexcept { return var_; }
  /// The number of samples folded in (starts at TRL's 1e-24).
  double count() const noexcept { return count_; }
  /// Restores a saved state: a finite mean, a finite var ≥ 0 and a finite count > 0.
  void load(double mean, double var, double count) {
    detail::check(valid(mean, var, count), "prefopt::eigen::BCOBaseline::load",
                  ": expected a finite mean, a finite var >= 0 and a finite count > 0, got mean ",
                  mean, ", var ", var, ", count ", count);
    mean_ = mean;
    var_ = var;
    count_ = count;
  }

 private:
  static bool valid(double mean, double var, double count) {
    return std::isfinite(mean) && std::isfinite(var) && var >= 0 && std::isfinite(count) &&
           count > 0;
  }
  double mean_ = 0.0;
  double var_ = 1.0;
  double count_ = 1e-24;  // TRL's initial count: the first update sets the mean.
};

namespace detail {

constexpr const char* kDPOFn = "prefopt::eigen::dpo_loss";

// The rules the libtorch layer applies too (losses/types.h).
using prefopt::detail::dpo_reads_label_smoothing;
using prefopt::detail::dpo_takes_f_divergence;
using prefopt::detail::has_loss_type;

/// The option checks of losses/dpo-inl.h's `check_options`.
inline void check_dpo_options(const DPOLossOptions& o) {
  const char* fn = kDPOFn;
  const auto& types = o.loss_type();
  check(!types.empty(), fn, ": expected at least one loss_type, got none");
  check(o.loss_weights().empty() || o.loss_weights().size() == types.size(), fn,
        ": expected one loss_weight per loss_type (", types.size(), "), got ",
        o.loss_weights().size());
  for (double w : o.loss_weights())
    check(std::isfinite(w), fn, ": expected finite loss_weights, got ", w);
  check(std::isfinite(o.beta()) && o.beta() > 0, fn, ": expected beta > 0, got ", o.beta());
  const double eps = o.label_smoothing();
  check(eps >= 0 && eps < 0.5, fn, ": expected label_smoothing in [0, 0.5), got ", eps);
  const bool cdpo = o.cdpo();
  if (eps != 0) {
    check(std::any_of(types.begin(), types.end(),
                      [cdpo](DPOLossType t) { return dpo_reads_label_smoothing(t, cdpo); }),
          fn, ": label_smoothing = ", eps, " is not used by any of the loss types (robust, ",
          "exo_pair, aot and aot_unpaired take it; sigmoid and sigmoid_norm only with cdpo(true), ",
          "conservative DPO, since TRL 0.29 ignores it there)");
  }
  if (cdpo) {
    check(has_loss_type(types, DPOLossType::kSigmoid) ||
              has_loss_type(types, DPOLossType::kSigmoidNorm),
          fn, ": cdpo(true) smooths sigmoid and sigmoid_norm, and neither is among the loss types");
    if (eps == 0) {
      warn_once(str(fn, "/cdpo"), str(fn, ": cdpo(true) with label_smoothing 0 is plain sigmoid; ",
                                      "set the label-flip rate with label_smoothing"));
    }
  }
  check(!has_loss_type(types, DPOLossType::kExoPair) || eps > 0, fn,
        ": exo_pair needs label_smoothing in (0, 0.5), got ", eps);
  check(std::isfinite(o.discopop_tau()) && o.discopop_tau() > 0, fn,
        ": expected discopop_tau > 0, got ", o.discopop_tau());
  check(std::isfinite(o.f_alpha_divergence_coef()), fn,
        ": expected a finite f_alpha_divergence_coef, got ", o.f_alpha_divergence_coef());
  check(std::isfinite(o.rpo_alpha()), fn, ": expected a finite rpo_alpha, got ", o.rpo_alpha());
  // Legal (TRL takes them), but a negative weight maximises its term: most likely a sign slip.
  for (double w : o.loss_weights()) {
    if (w < 0) {
      warn_once(str(fn, "/negative_weight"),
                str(fn, ": loss_weight ", w, " < 0 maximises its loss term"));
    }
  }
  if (o.rpo_alpha() < 0) {
    warn_once(str(fn, "/negative_rpo"),
              str(fn, ": rpo_alpha = ", o.rpo_alpha(), " < 0 maximises the chosen NLL"));
  }
  const int ipo = static_cast<int>(o.ipo_normalization());
  check(ipo == 0 || ipo == 1, fn, ": ipo_normalization is not an IPONormalization value (got ", ipo,
        ")");
  check_nll_normalization(fn, o.nll_normalization());
  check(prefopt::detail::is_valid(o.f_divergence_type()), fn,
        ": f_divergence_type is not an FDivergence value (got ",
        static_cast<int>(o.f_divergence_type()), ")");
  for (DPOLossType t : types) {
    check(prefopt::detail::is_valid(t), fn, ": loss_type holds a value that is not a ",
          "DPOLossType (", static_cast<int>(t), ")");
    check(o.f_divergence_type() == FDivergence::kReverseKL || dpo_takes_f_divergence(t), fn,
          ": f_divergence_type = ", prefopt::detail::name_of(o.f_divergence_type()),
          " is only defined for the loss types built on the chosen - rejected difference ",
          "(sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft), got ",
          prefopt::detail::name_of(t), "; use reverse_kl with it");
  }
  check_reduction(fn, o.reduction());
}

/// The warnings of losses/dpo-inl.h's `warn_unread_options`: an option that only some loss
/// types read, set to another value than the default of `DPOLossOptions` while no selected type
/// reads it (one key per option). `nll_given`: the host's `nll_loss`, which replaces the NLL
/// that `nll_normalization` averages.
inline void warn_unread_dpo_options(const DPOLossOptions& o, bool nll_given) {
  const char* fn = kDPOFn;
  const DPOLossOptions defaults;
  const auto& types = o.loss_type();
  const bool scores =
      std::any_of(types.begin(), types.end(), prefopt::detail::dpo_reads_f_divergence);
  if (o.f_divergence_type() != defaults.f_divergence_type() && !scores) {
    warn_once(
        str(fn, "/unread_f_divergence_type"),
        str(fn, ": f_divergence_type = ", prefopt::detail::name_of(o.f_divergence_type()),
            " maps the log-ratios of sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust ",
            "and discopop, and none is among the loss types (sft reads none): it is ", "ignored"));
  }
  if (o.f_alpha_divergence_coef() != defaults.f_alpha_divergence_coef() &&
      o.f_divergence_type() != FDivergence::kAlphaDivergence) {
    warn_once(str(fn, "/unread_f_alpha_divergence_coef"),
              str(fn, ": f_alpha_divergence_coef = ", o.f_alpha_divergence_coef(),
                  " is read by f_divergence_type alpha_divergence only, got ",
                  prefopt::detail::name_of(o.f_divergence_type()), ": it is ignored"));
  }
  if (o.discopop_tau() != defaults.discopop_tau() &&
      !has_loss_type(types, DPOLossType::kDiscoPOP)) {
    warn_once(str(fn, "/unread_discopop_tau"),
              str(fn, ": discopop_tau = ", o.discopop_tau(), " is read by the discopop loss ",
                  "type only, and it is not among the loss types: it is ignored"));
  }
  if (o.ipo_normalization() != defaults.ipo_normalization() &&
      !has_loss_type(types, DPOLossType::kIPO)) {
    warn_once(str(fn, "/unread_ipo_normalization"),
              str(fn, ": ipo_normalization = IPONormalization::kNone is read by the ipo loss ",
                  "type only, and it is not among the loss types: it is ignored"));
  }
  if (o.nll_normalization() != defaults.nll_normalization()) {
    if (!has_loss_type(types, DPOLossType::kSFT) && o.rpo_alpha() == 0) {
      warn_once(str(fn, "/unread_nll_normalization"),
                str(fn, ": nll_normalization = NLLNormalization::kSequenceMean averages the NLL ",
                    "of sft and rpo_alpha, and there is none (no sft loss type, rpo_alpha = 0): ",
                    "it is ignored"));
    } else if (nll_given) {
      warn_once(str(fn, "/unread_nll_normalization/nll_loss"),
                str(fn, ": nll_normalization = NLLNormalization::kSequenceMean is not read when ",
                    "nll_loss is given (the NLL term is the host's): it is ignored"));
    }
  }
}

/// The score of a log-ratio under the f-divergence (TRL ≥ 1.10, constants included) and
/// d score / d ρ: reverse_kl ρ (1); forward_kl 1 − e^{−ρ} (e^{−ρ}); js_divergence log 2 + ℓ(ρ)
/// (σ(−ρ)); alpha_divergence (e^{(α−1)ρ} − 1)/(α−1) (e^{(α−1)ρ}), ρ when |α − 1| < 1e-6. The
/// exponentials are capped at 80 (float) / 700 (double), with a zero derivative above the cap;
/// e^x − 1 is formed with expm1, exact near x = 0.
template <typename T>
std::pair<T, T> f_score(T rho, const DPOLossOptions& o) {
  switch (o.f_divergence_type()) {
    case FDivergence::kReverseKL:
      return {rho, T(1)};
    case FDivergence::kForwardKL: {
      const auto de = capped_exp(-rho).second;
      return {-std::expm1(std::min(-rho, exp_cap<T>())), de};
    }
    case FDivergence::kJSDivergence:
      return {log_sigmoid(rho) + static_cast<T>(std::log(2.0)), log_sigmoid_grad(rho)};
    case FDivergence::kAlphaDivergence: {
      const double a1 = o.f_alpha_divergence_coef() - 1.0;
      if (std::abs(a1) < 1e-6) return {rho, T(1)};
      const T x = rho * static_cast<T>(a1);
      const auto de = capped_exp(x).second;
      const T inv = static_cast<T>(1.0 / a1);
      return {std::expm1(std::min(x, exp_cap<T>())) * inv, de * inv * static_cast<T>(a1)};
    }
  }
  return {rho, T(1)};
}

/// The permutation that sorts `v` ascending (stable; NaN last), as `at::sort` orders values.
template <typename T>
std::vector<Eigen::Index> argsort(const Vector<T>& v) {
  std::vector<Eigen::Index> idx(static_cast<size_t>(v.size()));
  std::iota(idx.begin(), idx.end(), Eigen::Index(0));
  std::stable_sort(idx.begin(), idx.end(), [&](Eigen::Index a, Eigen::Index b) {
    const T x = v(a), y = v(b);
    return std::isnan(y) ? !std::isnan(x) : x < y;
  });
  return idx;
}

/// `v` permuted by `perm`.
template <typename T>
Vector<T> permuted(const Vector<T>& v, const std::vector<Eigen::Index>& perm) {
  Vector<T> out(v.size());
  for (Eigen::Index k = 0; k < v.size(); ++k) out(k) = v(perm[static_cast<size_t>(k)]);
  return out;
}

/// The DPO family with its gradient; `bco_delta` is bco_pair's baseline δ or null.
template <typename T>
DPOLossResult<T> dpo_impl(const PairInputs<T>& in, const double* bco_delta,
                          const DPOLossOptions& o) {
  check_scalar<T>();
  const char* fn = kDPOFn;
  check_dpo_options(o);
  const bool ref_free = o.reference_free();
  const Eigen::Index B = check_pair_inputs(fn, in, !ref_free);
  const bool has_ref = in.reference_chosen_logps().has_value();
  if (ref_free && has_ref) {
    warn_once(
        str(fn, "/reference_free"),
        str(fn, ": reference_free(true) leaves the reference log-probs out of the loss; ",
            "they only feed the logged rewards beta*(policy - reference), as in TRL <= 0.28"));
  }
  const auto& types = o.loss_type();
  const bool aot =
      has_loss_type(types, DPOLossType::kAOT) || has_loss_type(types, DPOLossType::kAOTUnpaired);
  check(
      !(aot && in.weights().has_value()), fn,
      ": aot and aot_unpaired sort the batch, so per-pair weights (WPO) cannot apply; got weights");
  // What nothing would read is an error, not a loss without it.
  check(bco_delta == nullptr || has_loss_type(types, DPOLossType::kBCOPair), fn,
        ": bco_delta is read by bco_pair only, and bco_pair is not among the loss types");
  // A NaN or infinite baseline would make every bco_pair loss NaN or infinite, silently.
  check(bco_delta == nullptr || std::isfinite(*bco_delta), fn,
        ": expected a finite bco_delta, got ", bco_delta != nullptr ? *bco_delta : 0.0);
  check(bco_delta != nullptr || !o.bco_running_mean(), fn,
        ": bco_running_mean(true) needs the running baseline that the DPOLoss functor keeps; ",
        "the functional form takes the baseline's delta through its bco_delta overload");
  warn_unread_dpo_options(o, in.nll_loss().has_value());
  const T beta = static_cast<T>(o.beta());
  const double eps = o.label_smoothing();

  const FormLogps<T> lp = form_logps(fn, "dpo_loss", in, LogpsForm::kSum);
  const Vector<T>& pc = lp.policy_chosen;
  const Vector<T>& pr = lp.policy_rejected;
  const Vector<T>& rc = lp.reference_chosen;
  const Vector<T>& rr = lp.reference_rejected;
  const Vector<T> rho_c = ref_free ? pc : Vector<T>(pc - rc);
  const Vector<T> rho_r = ref_free ? pr : Vector<T>(pr - rr);

  // Scores s = f(ρ) and ds/dρ; z = β·(s_c − s_r).
  Vector<T> sc(B), sr(B), dsc(B), dsr(B);
  for (Eigen::Index b = 0; b < B; ++b) {
    std::tie(sc(b), dsc(b)) = f_score(rho_c(b), o);
    std::tie(sr(b), dsr(b)) = f_score(rho_r(b), o);
  }
  const Vector<T> z = (sc - sr) * beta;
  const auto lengths = [&](const char* type) {
    check(in.chosen_lengths().has_value() && in.rejected_lengths().has_value(), fn, ": ", type,
          " normalises by completion length and needs chosen_lengths and rejected_lengths, got ",
          in.chosen_lengths().has_value() ? "no rejected_lengths" : "no chosen_lengths");
    return std::make_pair(Vector<T>(in.chosen_lengths()->template cast<T>().cwiseMax(T(1))),
                          Vector<T>(in.rejected_lengths()->template cast<T>().cwiseMax(T(1))));
  };
  std::optional<NLL<T>> nll;
  const auto get_nll = [&]() -> const NLL<T>& {
    if (!nll) {
      nll = chosen_nll(fn, in, pc, LogpsForm::kSum, o.nll_normalization(), /*per_pair=*/true);
    }
    return *nll;
  };
  const auto nll_values = [&]() -> Vector<T> {  // the NLL term as a per-pair vector
    const NLL<T>& n = get_nll();
    return n.per_pair ? n.seq : Vector<T>::Constant(B, n.value);
  };

  // d loss / d total_b: the reduction's scale times the pair's weight.
  const T scale = reduction_scale<T>(o.reduction(), B);
  Vector<T> up = Vector<T>::Constant(B, scale);
  if (in.weights()) up = up.cwiseProduct(*in.weights());
  // Gradients with respect to z, the scores, the log-ratios, the consumed log-probs directly
  // (aot sorts those) and the NLL term.
  Vector<T> gz = Vector<T>::Zero(B), gsc = Vector<T>::Zero(B), gsr = Vector<T>::Zero(B);
  Vector<T> grho_c = Vector<T>::Zero(B), grho_r = Vector<T>::Zero(B);
  Vector<T> gpc = Vector<T>::Zero(B), gpr = Vector<T>::Zero(B);
  Vector<T> grc = Vector<T>::Zero(B), grr = Vector<T>::Zero(B);
  Vector<T> gnll = Vector<T>::Zero(B);  // d loss / d (the NLL term of pair b)

  Vector<T> total;
  for (size_t k = 0; k < types.size(); ++k) {
    const double w = o.loss_weights().empty() ? 1.0 : o.loss_weights()[k];
    const Vector<T> u = w == 1.0 ? up : Vector<T>(up * static_cast<T>(w));  // d loss / d l_b
    Vector<T> l(B);
    switch (types[k]) {
      case DPOLossType::kSigmoid: {  // −(1−ε)ℓ(z) − εℓ(−z), ε only under cdpo
        const double e = o.cdpo() ? eps : 0.0;
        for (Eigen::Index b = 0; b < B; ++b) {
          const auto [v, d] = smoothed_sigmoid(z(b), e);
          l(b) = v;
          gz(b) += u(b) * d;
        }
        break;
      }
      case DPOLossType::kHinge:  // relu(1 − z)
        for (Eigen::Index b = 0; b < B; ++b) {
          const auto [v, d] = relu(T(1) - z(b));
          l(b) = v;
          gz(b) -= u(b) * d;
        }
        break;
      case DPOLossType::kIPO: {  // (Δ̄ − 1/(2β))², Δ̄ = s_c/n_c − s_r/n_r (or s_c − s_r)
        const T target = static_cast<T>(1.0 / (2.0 * o.beta()));
        const bool per_token = o.ipo_normalization() == IPONormalization::kPerToken;
        Vector<T> nc = Vector<T>::Ones(B), nr = Vector<T>::Ones(B);
        if (per_token) std::tie(nc, nr) = lengths("ipo");
        for (Eigen::Index b = 0; b < B; ++b) {
          const T d = per_token ? sc(b) / nc(b) - sr(b) / nr(b) : sc(b) - sr(b);
          const T t = d - target;
          l(b) = t * t;
          gsc(b) += u(b) * T(2) * t / nc(b);
          gsr(b) -= u(b) * T(2) * t / nr(b);
        }
        break;
      }
      case DPOLossType::kRobust: {  // [−(1−ε)ℓ(z) + εℓ(−z)] / (1 − 2ε)
        const T em1 = static_cast<T>(eps - 1.0), e = static_cast<T>(eps);
        const T den = static_cast<T>(1.0 - 2.0 * eps);
        for (Eigen::Index b = 0; b < B; ++b) {
          l(b) = (log_sigmoid(z(b)) * em1 + log_sigmoid(-z(b)) * e) / den;
          gz(b) += u(b) * (log_sigmoid_grad(z(b)) * em1 - log_sigmoid_grad(-z(b)) * e) / den;
        }
        break;
      }
      case DPOLossType::kExoPair: {  // σ(z)[ℓ(z) − log(1−ε)] + σ(−z)[ℓ(−z) − log ε]
        const T c1 = static_cast<T>(std::log1p(-eps)), c2 = static_cast<T>(std::log(eps));
        for (Eigen::Index b = 0; b < B; ++b) {
          const T lq = log_sigmoid(z(b)), lqn = log_sigmoid(-z(b));
          const T q = std::exp(lq), qn = std::exp(lqn);
          l(b) = q * (lq - c1) + qn * (lqn - c2);
          // d/dℓ [e^ℓ (ℓ − c)] = e^ℓ (ℓ − c) + e^ℓ, times dℓ(±z)/dz = ±σ(∓z).
          gz(b) += u(b) * ((q * (lq - c1) + q) * log_sigmoid_grad(z(b)) -
                           (qn * (lqn - c2) + qn) * log_sigmoid_grad(-z(b)));
        }
        break;
      }
      // nca_pair, bco_pair, sppo_hard and apo_down take no f-divergence (check_dpo_options):
      // their scores s are the log-ratios ρ themselves.
      case DPOLossType::kNCAPair:  // −ℓ(βρ_c) − ½ℓ(−βρ_c) − ½ℓ(−βρ_r)
        for (Eigen::Index b = 0; b < B; ++b) {
          const T c = sc(b) * beta, r = sr(b) * beta;
          l(b) = -log_sigmoid(c) - T(0.5) * log_sigmoid(-c) - T(0.5) * log_sigmoid(-r);
          gsc(b) += u(b) * (-log_sigmoid_grad(c) + T(0.5) * log_sigmoid_grad(-c)) * beta;
          gsr(b) += u(b) * (T(0.5) * log_sigmoid_grad(-r)) * beta;
        }
        break;
      case DPOLossType::kBCOPair: {  // −ℓ(βρ_c − δ) − ℓ(−(βρ_r − δ))
        const T delta = bco_delta != nullptr ? static_cast<T>(*bco_delta) : T(0);
        for (Eigen::Index b = 0; b < B; ++b) {
          T c = sc(b) * beta, r = sr(b) * beta;
          if (bco_delta != nullptr) {
            c = c - delta;
            r = r - delta;
          }
          l(b) = -log_sigmoid(c) - log_sigmoid(-r);
          gsc(b) -= u(b) * log_sigmoid_grad(c) * beta;
          gsr(b) += u(b) * log_sigmoid_grad(-r) * beta;
        }
        break;
      }
      case DPOLossType::kSPPOHard: {  // (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²
        const T half = static_cast<T>(0.5 / o.beta());
        for (Eigen::Index b = 0; b < B; ++b) {
          const T c = sc(b) - half, r = sr(b) + half;
          l(b) = c * c + r * r;
          gsc(b) += u(b) * T(2) * c;
          gsr(b) += u(b) * T(2) * r;
        }
        break;
      }
      case DPOLossType::kAOT: {  // cDPO form on sort(π_c − π_r) − sort(ref_c − ref_r)
        const Vector<T> dpi = pc - pr;
        const auto pi_perm = argsort(dpi);
        std::vector<Eigen::Index> ref_perm;
        Vector<T> ref = Vector<T>::Zero(B);
        if (!ref_free) {
          const Vector<T> dref = rc - rr;
          ref_perm = argsort(dref);
          ref = permuted(dref, ref_perm);
        }
        const Vector<T> zz = (permuted(dpi, pi_perm) - ref) * beta;
        for (Eigen::Index k2 = 0; k2 < B; ++k2) {
          const auto [v, d] = smoothed_sigmoid(zz(k2), eps);
          l(k2) = v;
          const T g = u(k2) * d * beta;
          const auto i = pi_perm[static_cast<size_t>(k2)];
          gpc(i) += g;
          gpr(i) -= g;
          if (!ref_free) {
            const auto j = ref_perm[static_cast<size_t>(k2)];
            grc(j) -= g;
            grr(j) += g;
          }
        }
        break;
      }
      case DPOLossType::kAOTUnpaired: {  // cDPO form on sort(ρ_c) − sort(ρ_r)
        const auto c_perm = argsort(rho_c), r_perm = argsort(rho_r);
        const Vector<T> zz = (permuted(rho_c, c_perm) - permuted(rho_r, r_perm)) * beta;
        for (Eigen::Index k2 = 0; k2 < B; ++k2) {
          const auto [v, d] = smoothed_sigmoid(zz(k2), eps);
          l(k2) = v;
          const T g = u(k2) * d * beta;
          grho_c(c_perm[static_cast<size_t>(k2)]) += g;
          grho_r(r_perm[static_cast<size_t>(k2)]) -= g;
        }
        break;
      }
      case DPOLossType::kAPOZero:  // σ(−βρ_c) + σ(βρ_r)
        for (Eigen::Index b = 0; b < B; ++b) {
          l(b) = sigmoid(rho_c(b) * -beta) + sigmoid(rho_r(b) * beta);
          grho_c(b) -= u(b) * sigmoid_grad(rho_c(b) * -beta) * beta;
          grho_r(b) += u(b) * sigmoid_grad(rho_r(b) * beta) * beta;
        }
        break;
      case DPOLossType::kAPODown:  // σ(βρ_c) + σ(−β(ρ_c − ρ_r)), z = β(ρ_c − ρ_r) here
        for (Eigen::Index b = 0; b < B; ++b) {
          l(b) = sigmoid(rho_c(b) * beta) + sigmoid(-z(b));
          grho_c(b) += u(b) * sigmoid_grad(rho_c(b) * beta) * beta;
          gz(b) -= u(b) * sigmoid_grad(-z(b));
        }
        break;
      case DPOLossType::kDiscoPOP: {  // −ℓ(z)(1 − σ(z/τ)) + e^{−z}σ(z/τ), guarded
        // softplus(−z)·σ(−z/τ) + exp(ℓ(z/τ) − z): finite for every finite z, where TRL's
        // product overflows to inf·0 = NaN.
        const T tau = static_cast<T>(o.discopop_tau());
        for (Eigen::Index b = 0; b < B; ++b) {
          const T zz = z(b), zt = zz / tau;
          const T sp = softplus(-zz), m = sigmoid(-zt), ex = std::exp(log_sigmoid(zt) - zz);
          l(b) = sp * m + ex;
          gz(b) += u(b) * (-softplus_grad(-zz) * m - sp * sigmoid_grad(-zt) / tau +
                           ex * (log_sigmoid_grad(zt) / tau - T(1)));
        }
        break;
      }
      case DPOLossType::kSigmoidNorm: {  // −ℓ(β(s_c/n_c − s_r/n_r)), smoothed under cdpo
        const auto [nc, nr] = lengths("sigmoid_norm");
        const double e = o.cdpo() ? eps : 0.0;
        for (Eigen::Index b = 0; b < B; ++b) {
          const auto [v, d] = smoothed_sigmoid((sc(b) / nc(b) - sr(b) / nr(b)) * beta, e);
          l(b) = v;
          gsc(b) += u(b) * d * beta / nc(b);
          gsr(b) -= u(b) * d * beta / nr(b);
        }
        break;
      }
      case DPOLossType::kSFT:  // the chosen completions' NLL, for every pair
        l = nll_values();
        gnll += u;
        break;
    }
    if (w != 1.0) l = l * static_cast<T>(w);
    total = k == 0 ? l : Vector<T>(total + l);
  }
  if (o.rpo_alpha() != 0) {
    const T a = static_cast<T>(o.rpo_alpha());
    total = total + nll_values() * a;
    gnll += up * a;
  }
  if (in.weights()) total = total.cwiseProduct(*in.weights());

  // Chain rule back to the inputs: z → scores → log-ratios → consumed log-probs → given.
  gsc += gz * beta;
  gsr -= gz * beta;
  grho_c += gsc.cwiseProduct(dsc);
  grho_r += gsr.cwiseProduct(dsr);
  gpc += grho_c;
  gpr += grho_r;
  if (!ref_free) {
    grc -= grho_c;
    grr -= grho_r;
  }
  DPOLossResult<T> r;
  if (nll) {
    if (nll->per_pair) {
      gpc += gnll.cwiseProduct(nll->dlogps);
      r.nll_loss = mean_or_zero<T>(nll->seq);
    } else {
      gpc += nll->dlogps * gnll.sum();
      if (nll->given) r.grad_nll_loss = gnll.sum();
      r.nll_loss = nll->value;
    }
  } else if (in.nll_loss()) {  // a host's NLL that neither the loss nor the result takes
    warn_once(str(fn, "/unread_nll"), str(fn, ": nll_loss is given but no term reads it (no sft ",
                                          "loss type, rpo_alpha = 0): it is ignored"));
  }
  r.losses = total;
  r.loss = reduce<T>(total, o.reduction());
  // Rewards β·(π − ref), with the reference whenever one is given (reference_free drops it
  // from the loss only).
  double reward_scale = o.beta();
  if (o.weighted_rewards()) {
    reward_scale = 0;
    for (size_t k = 0; k < types.size(); ++k)
      reward_scale += o.beta() * (o.loss_weights().empty() ? 1.0 : o.loss_weights()[k]);
  }
  r.chosen_rewards = (has_ref ? Vector<T>(pc - rc) : pc) * static_cast<T>(reward_scale);
  r.rejected_rewards = (has_ref ? Vector<T>(pr - rr) : pr) * static_cast<T>(reward_scale);
  r.chosen_logps = pc;
  r.rejected_logps = pr;
  r.grad_policy_chosen = gpc.cwiseProduct(lp.jac_chosen);
  r.grad_policy_rejected = gpr.cwiseProduct(lp.jac_rejected);
  if (has_ref) {
    r.grad_reference_chosen = grc.cwiseProduct(lp.jac_chosen);
    r.grad_reference_rejected = grr.cwiseProduct(lp.jac_rejected);
  } else {
    r.grad_reference_chosen.resize(0);
    r.grad_reference_rejected.resize(0);
  }
  return r;
}

}  // namespace detail

/// DPO-family loss of B pairs and its gradient (arXiv:2305.18290 and the papers of each
/// `DPOLossType`), as `prefopt::functional::dpo_loss` computes it.
///
/// `loss = reduce(weights ⊙ (Σ_k w_k·losses_k + rpo_alpha·NLL))`, e.g. for `sigmoid`
/// `losses = −log σ(β[(π_c − π_r) − (ref_c − ref_r)])`.
///
/// - `policy_*_logps`: [B] completion log-probs (native form: sums; per-token means are
///   converted with the lengths).
/// - `reference_*_logps`: [B], same form; may be absent with `reference_free`. Unlike the
///   libtorch layer (which detaches them), the derivative with respect to them is returned too.
/// - `chosen_lengths`/`rejected_lengths` (IPO, `sigmoid_norm`, token-mean NLL, conversion),
///   WPO `weights` and an explicit `nll_loss`; the overload below adds bco_pair's baseline.
///
/// Returns the loss, per-pair losses, rewards, NLL and `grad_*`: d loss / d each input vector
/// (of Σ loss with Reduction::kNone), through f-divergence caps, sorting (aot), the NLL term and
/// the form conversion.
///
/// Example:
/// ```
/// namespace pe = prefopt::eigen;
/// auto r = pe::dpo_loss(pe::PairInputs<double>(policy, reference));  // sigmoid, β = 0.1
/// // chain r.grad_policy_chosen(b) into the per-token backward of chosen sequence b
/// ```
template <typename T>
DPOLossResult<T> dpo_loss(const PairInputs<T>& inputs, const DPOLossOptions& options = {}) {
  return detail::dpo_impl<T>(inputs, nullptr, options);
}

/// `dpo_loss` with `bco_pair`'s baseline δ (e.g. from `BCOBaseline::update`), the functional
/// form of what `DPOLoss` does with `bco_running_mean`: bco_pair sees βρ_c − δ and βρ_r − δ.
/// δ must be finite (std::invalid_argument otherwise: a NaN δ made every bco_pair loss NaN).
///
/// Example:
/// ```
/// auto r = prefopt::eigen::dpo_loss(in, baseline.mean(), opts);
/// ```
template <typename T>
DPOLossResult<T> dpo_loss(const PairInputs<T>& inputs, double bco_delta,
                          const DPOLossOptions& options) {
  return detail::dpo_impl<T>(inputs, &bco_delta, options);
}

/// `dpo_loss` on the four summed log-prob vectors alone.
///
/// Example:
/// ```
/// Eigen::VectorXd pc(2), pr(2), rc(2), rr(2);
/// pc << -12.5, -30.2; pr << -14.0, -28.5; rc << -13.0, -29.0; rr << -13.5, -29.5;
/// auto r = prefopt::eigen::dpo_loss<double>(pc, pr, rc, rr);
/// ```
template <typename T>
DPOLossResult<T> dpo_loss(const Vector<T>& policy_chosen_logps,
                          const Vector<T>& policy_rejected_logps,
                          const Vector<T>& reference_chosen_logps,
                          const Vector<T>& reference_rejected_logps,
                          const DPOLossOptions& options = {}) {
  return detail::dpo_impl<T>(PairInputs<T>()
                                 .policy_chosen_logps(policy_chosen_logps)
                                 .policy_rejected_logps(policy_rejected_logps)
                                 .reference_chosen_logps(reference_chosen_logps)
                                 .reference_rejected_logps(reference_rejected_logps)
                                 .logps_form(LogpsForm::kSum),
                             nullptr, options);
}

/// Functor form of `eigen::dpo_loss`. With `bco_running_mean` (and `bco_pair`) it holds
/// `bco_pair`'s running baseline and updates it on every call (before the loss uses it, as
/// TRL ≤ 0.28); copies share the baseline, and a call that throws leaves it unchanged. The
/// update is not synchronised: calls with a baseline must not run concurrently.
///
/// Example:
/// ```
/// const prefopt::eigen::DPOLoss dpo(prefopt::eigen::DPOLossOptions().beta(0.1));
/// auto r = dpo(prefopt::eigen::PairInputs<float>(policy, reference));
/// ```
class DPOLoss {
 public:
  /// Checks `options` for `bco_running_mean` (the rest is checked on each call).
  explicit DPOLoss(DPOLossOptions options = {}) : options_(std::move(options)) {
    if (options_.bco_running_mean()) {
      detail::check(detail::has_loss_type(options_.loss_type(), DPOLossType::kBCOPair),
                    "prefopt::eigen::DPOLoss", ": bco_running_mean(true) keeps bco_pair's ",
                    "baseline, and bco_pair is not among the loss types");
      baseline_ = std::make_shared<BCOBaseline>();
    }
  }
  /// The loss of `inputs` (and, with the running baseline, the baseline's update).
  template <typename T>
  DPOLossResult<T> operator()(const PairInputs<T>& inputs) const {
    if (baseline_ == nullptr) return dpo_loss(inputs, options_);
    detail::check_dpo_options(options_);
    detail::check_pair_inputs(detail::kDPOFn, inputs, !options_.reference_free());
    const auto lp = detail::form_logps(detail::kDPOFn, "dpo_loss", inputs, LogpsForm::kSum);
    const auto rho = [&](const Vector<T>& p, const Vector<T>& ref) -> Eigen::VectorXd {
      const Eigen::VectorXd d = p.template cast<double>();
      return options_.reference_free() ? d : Eigen::VectorXd(d - ref.template cast<double>());
    };
    const Eigen::VectorXd c = rho(lp.policy_chosen, lp.reference_chosen) * options_.beta();
    const Eigen::VectorXd r = rho(lp.policy_rejected, lp.reference_rejected) * options_.beta();
    BCOBaseline next = *baseline_;
    const double delta = next.update<double>(c, r);
    auto result = dpo_loss(inputs, delta, options_);
    *baseline_ = next;
    return result;
  }
  /// The four summed log-prob vectors.
  template <typename T>
  DPOLossResult<T> operator()(const Vector<T>& policy_chosen_logps,
                              const Vector<T>& policy_rejected_logps,
                              const Vector<T>& reference_chosen_logps,
                              const Vector<T>& reference_rejected_logps) const {
    return (*this)(PairInputs<T>()
                       .policy_chosen_logps(policy_chosen_logps)
                       .policy_rejected_logps(policy_rejected_logps)
                       .reference_chosen_logps(reference_chosen_logps)
                       .reference_rejected_logps(reference_rejected_logps)
                       .logps_form(LogpsForm::kSum));
  }
  /// The options.
  const DPOLossOptions& options() const noexcept { return options_; }
  /// The running baseline (only with `bco_running_mean`; std::invalid_argument otherwise).
  BCOBaseline& bco_baseline() const {
    detail::check(baseline_ != nullptr, "prefopt::eigen::DPOLoss::bco_baseline",
                  ": this loss keeps no baseline; construct it with bco_running_mean(true) and ",
                  "bco_pair");
    return *baseline_;
  }

 private:
  DPOLossOptions options_;
  std::shared_ptr<BCOBaseline> baseline_;  // only with bco_running_mean
};

}  // namespace eigen
PREFOPT_END_NAMESPACE
