// SPDX-License-Identifier: Apache-2.0
// The loss types and conventions every layer shares (libtorch and Eigen), with their TRL names.
// Needs no libtorch: prefopt/eigen.h uses it too.
#pragma once

#include <prefopt/config.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

PREFOPT_BEGIN_NAMESPACE

/// How the NLL term of a loss (DPO's `sft` and `rpo_alpha`, CPO/SimPO's `cpo_alpha`, ORPO's
/// λ-free part) averages the chosen completions' negative log-likelihood.
enum class NLLNormalization {
  /// Σ_b −logp(chosen_b) / Σ_b n_b: cross-entropy averaged over every chosen completion token
  /// of the batch (TRL's `sft` and CPO, Liger's `alpha` term, HF `cross_entropy`).
  kTokenMean,
  /// mean_b(−logp(chosen_b) / n_b): the per-sequence mean, averaged over pairs (LLaMA-Factory's
  /// `pref_ftx` and ORPO, OpenRLHF's `nll_loss_coef`).
  kSequenceMean,
};

/// What the per-sequence log-probs of `PairInputs` hold.
enum class LogpsForm {
  /// Not said (a `PairInputs` built field by field): each loss takes them to be the form its
  /// anchor consumes (`native form` in each loss's docs) and warns once per process.
  kUnspecified,
  /// Σ over each completion's scored tokens (`SequenceLogprobs::sum`).
  kSum,
  /// Per-token means Σ / max(n, 1) (`SequenceLogprobs::mean`).
  kMean,
};

/// The DPO-family losses, named as TRL's `loss_type` values. In the formulas, z = β·Δ with
/// Δ = score_c − score_r, the scores s being the log-ratios ρ = logp_policy − logp_reference
/// mapped by the f-divergence (ρ itself by default), ℓ = log σ and ε = label_smoothing. Only
/// the types built on Δ (and sigmoid_norm/ipo's per-token scores) take an f-divergence other
/// than reverse_kl (`dpo_takes_f_divergence`); the others read ρ.
enum class DPOLossType {
  kSigmoid,  ///< `sigmoid`: −ℓ(z); with `cdpo`, −(1−ε)ℓ(z) − εℓ(−z) (cDPO, arXiv:2305.18290)
  kHinge,  ///< `hinge`: relu(1 − z) (SLiC, RSO; arXiv:2309.06657)
  kIPO,    ///< `ipo`: (Δ̄ − 1/(2β))², Δ̄ per-token normalised by default (arXiv:2310.12036)
  kRobust,  ///< `robust`: [−(1−ε)ℓ(z) + εℓ(−z)] / (1 − 2ε) (rDPO, arXiv:2403.00409)
  kExoPair,  ///< `exo_pair`: σ(z)[ℓ(z) − log(1−ε)] + σ(−z)[ℓ(−z) − log ε] (arXiv:2402.00856)
  kNCAPair,  ///< `nca_pair`: −ℓ(βρ_c) − ½ℓ(−βρ_c) − ½ℓ(−βρ_r) (arXiv:2402.05369)
  kBCOPair,  ///< `bco_pair`: −ℓ(βρ_c − δ) − ℓ(−(βρ_r − δ)), δ = baseline or 0 (arXiv:2404.04656)
  kSPPOHard,  ///< `sppo_hard`: (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))² (arXiv:2405.00675)
  kAOT,  ///< `aot`: cDPO form on sort(π_c − π_r) − sort(ref_c − ref_r) (arXiv:2406.05882)
  kAOTUnpaired,  ///< `aot_unpaired`: cDPO form on sort(ρ_c) − sort(ρ_r)
  kAPOZero,      ///< `apo_zero`: σ(−βρ_c) + σ(βρ_r) (arXiv:2408.06266)
  kAPODown,      ///< `apo_down`: σ(βρ_c) + σ(−β(ρ_c − ρ_r))
  kDiscoPOP,     ///< `discopop`: −ℓ(z)(1 − σ(z/τ)) + e^{−z}σ(z/τ) (arXiv:2406.08414)
  kSigmoidNorm,  ///< `sigmoid_norm`: −ℓ(β(s_c/n_c − s_r/n_r)) (Tulu 3); smoothed under `cdpo`
  kSFT,          ///< `sft`: the chosen completions' NLL, the same scalar for every pair
};

/// The f-divergence that maps each log-ratio ρ to a score f′(e^ρ) (TRL's `f_divergence_type`,
/// arXiv:2309.16240), with TRL ≥ 1.10's constants (trl#6559): they cancel in Δ but not in the
/// per-token scores of `ipo` and `sigmoid_norm`.
enum class FDivergence {
  kReverseKL,     ///< `reverse_kl`: ρ (standard DPO)
  kForwardKL,     ///< `forward_kl`: 1 − e^{−ρ}
  kJSDivergence,  ///< `js_divergence`: log 2 + ℓ(ρ)
  kAlphaDivergence,  ///< `alpha_divergence`: (e^{(α−1)ρ} − 1) / (α−1); ρ when |α − 1| < 1e-6
};

/// Whether IPO divides each side's score by its completion length.
enum class IPONormalization {
  kPerToken,  ///< Δ̄ = s_c/max(n_c,1) − s_r/max(n_r,1): TRL, LLaMA-Factory, the IPO authors
  kNone,      ///< Δ̄ = Δ on summed log-probs: torchtune's removed `IPOLoss`, OpenRLHF `ipo=True`
};

/// The losses of TRL's `CPOTrainer` (`loss_type`). m = s_c − s_r is the margin of the policy
/// log-probs (sums for sigmoid/hinge, per-token means for ipo/simpo/alphapo), or of AlphaPO's
/// rewards r = (1 − p^{−α})/α when α ≠ 0; ε = label_smoothing.
enum class CPOLossType {
  kSigmoid,  ///< `sigmoid` (CPO, arXiv:2401.08417): −(1−ε)ℓ(βm) − εℓ(−βm)
  kHinge,    ///< `hinge`: relu(1 − βm)
  kIPO,      ///< `ipo`: (m − 1/(2β))²
  kSimPO,  ///< `simpo` (arXiv:2405.14734): sigmoid form on m − γ/β, i.e. −ℓ(βm − γ) at ε = 0
  kAlphaPO,  ///< `alphapo` (arXiv:2501.03884): kSimPO with α ≠ 0 and no NLL term, as TRL sets it
};

/// TRL `KTOTrainer`'s `loss_type`.
enum class KTOLossType {
  kKTO,  ///< `kto`: desirable 1 − σ(β(ρ − z)), undesirable 1 − σ(β(z − ρ))
  kAPOZeroUnpaired,  ///< `apo_zero_unpaired`: desirable 1 − σ(βρ), undesirable σ(βρ); no KL
};
/// TRL `TPOConfig.loss_type`. Δ = s_c − s_r is the margin of the policy log-probs: sums for
/// sigmoid and hinge, per-token means for ipo and tpo-l; ℓ = log σ, ε = label_smoothing.
enum class TPOLossType {
  kSigmoid,  ///< `sigmoid`: −(1−ε)ℓ(βΔ) − εℓ(−βΔ)
  kHinge,    ///< `hinge`: relu(1 − βΔ)
  kIPO,      ///< `ipo`: (Δ − 1/(2β))²
  kTPOL,  ///< `tpo-l`: −(1−ε)ℓ(βΔ − γ) − εℓ(γ − βΔ), the SimPO form with γ = `tpo_l_gamma`
};

namespace detail {

/// A loss type's value and its TRL name.
template <typename E>
struct NamedValue {
  E value;
  const char* name;
};

/// Every name, in declaration order.
template <typename E>
struct Names;

template <>
struct Names<DPOLossType> {
  static constexpr NamedValue<DPOLossType> table[] = {
      {DPOLossType::kSigmoid, "sigmoid"},   {DPOLossType::kHinge, "hinge"},
      {DPOLossType::kIPO, "ipo"},           {DPOLossType::kRobust, "robust"},
      {DPOLossType::kExoPair, "exo_pair"},  {DPOLossType::kNCAPair, "nca_pair"},
      {DPOLossType::kBCOPair, "bco_pair"},  {DPOLossType::kSPPOHard, "sppo_hard"},
      {DPOLossType::kAOT, "aot"},           {DPOLossType::kAOTUnpaired, "aot_unpaired"},
      {DPOLossType::kAPOZero, "apo_zero"},  {DPOLossType::kAPODown, "apo_down"},
      {DPOLossType::kDiscoPOP, "discopop"}, {DPOLossType::kSigmoidNorm, "sigmoid_norm"},
      {DPOLossType::kSFT, "sft"},
  };
};
template <>
struct Names<FDivergence> {
  static constexpr NamedValue<FDivergence> table[] = {
      {FDivergence::kReverseKL, "reverse_kl"},
      {FDivergence::kForwardKL, "forward_kl"},
      {FDivergence::kJSDivergence, "js_divergence"},
      {FDivergence::kAlphaDivergence, "alpha_divergence"},
  };
};
template <>
struct Names<CPOLossType> {
  static constexpr NamedValue<CPOLossType> table[] = {
      {CPOLossType::kSigmoid, "sigmoid"}, {CPOLossType::kHinge, "hinge"},
      {CPOLossType::kIPO, "ipo"},         {CPOLossType::kSimPO, "simpo"},
      {CPOLossType::kAlphaPO, "alphapo"},
  };
};
template <>
struct Names<TPOLossType> {
  static constexpr NamedValue<TPOLossType> table[] = {
      {TPOLossType::kSigmoid, "sigmoid"},
      {TPOLossType::kHinge, "hinge"},
      {TPOLossType::kIPO, "ipo"},
      {TPOLossType::kTPOL, "tpo-l"},
  };
};
template <>
struct Names<KTOLossType> {
  static constexpr NamedValue<KTOLossType> table[] = {
      {KTOLossType::kKTO, "kto"},
      {KTOLossType::kAPOZeroUnpaired, "apo_zero_unpaired"},
  };
};

/// TRL's name of `value`, or "?" for a value outside the enum.
template <typename E>
const char* name_of(E value) {
  for (const auto& nv : Names<E>::table)
    if (nv.value == value) return nv.name;
  return "?";
}

/// Whether `value` is one of the enum's values (a cast from an integer may not be).
template <typename E>
bool is_valid(E value) {
  for (const auto& nv : Names<E>::table)
    if (nv.value == value) return true;
  return false;
}

/// The value TRL calls `name`; false when there is none.
template <typename E>
bool value_of(const std::string& name, E* value) {
  for (const auto& nv : Names<E>::table) {
    if (name == nv.name) {
      *value = nv.value;
      return true;
    }
  }
  return false;
}

/// The names, comma-separated, for error messages.
template <typename E>
std::string all_names() {
  std::string out;
  for (const auto& nv : Names<E>::table) out += (out.empty() ? "" : ", ") + std::string(nv.name);
  return out;
}

// Rules both layers apply (losses/*-inl.h and eigen/*.h), kept here so that a change in TRL
// changes them once.

/// The DPO types that read ε (`label_smoothing`): as in TRL ≥ 0.29, plus sigmoid and
/// sigmoid_norm under cdpo.
inline bool dpo_reads_label_smoothing(DPOLossType t, bool cdpo) {
  switch (t) {
    case DPOLossType::kSigmoid:
    case DPOLossType::kSigmoidNorm:
      return cdpo;
    case DPOLossType::kRobust:
    case DPOLossType::kExoPair:
    case DPOLossType::kAOT:
    case DPOLossType::kAOTUnpaired:
      return true;
    default:
      return false;
  }
}

/// Whether a DPO type takes an f-divergence other than reverse_kl. As in TRL ≥ 1.10
/// (trl#6559): the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the
/// chosen − rejected difference, so the types that read each side's log-ratio alone (nca_pair,
/// bco_pair, sppo_hard, apo_zero, apo_down, aot, aot_unpaired) have no f-divergence form.
inline bool dpo_takes_f_divergence(DPOLossType t) {
  switch (t) {
    case DPOLossType::kSigmoid:
    case DPOLossType::kSigmoidNorm:
    case DPOLossType::kHinge:
    case DPOLossType::kIPO:
    case DPOLossType::kExoPair:
    case DPOLossType::kRobust:
    case DPOLossType::kDiscoPOP:
    case DPOLossType::kSFT:
      return true;
    default:
      return false;
  }
}

/// Whether a DPO type reads the f-divergence's scores: those that take one (above) but `sft`,
/// which takes one in a list of types and reads no log-ratio.
inline bool dpo_reads_f_divergence(DPOLossType t) {
  return t != DPOLossType::kSFT && dpo_takes_f_divergence(t);
}

/// Whether a CPO type reads `simpo_gamma` (TPO's `tpo_l_gamma`, tpo-l being simpo there).
inline bool cpo_reads_gamma(CPOLossType t) {
  return t == CPOLossType::kSimPO || t == CPOLossType::kAlphaPO;
}

/// Whether `types` holds `t`.
inline bool has_loss_type(const std::vector<DPOLossType>& types, DPOLossType t) {
  return std::find(types.begin(), types.end(), t) != types.end();
}

/// TPO is CPO's machinery with its own names: sigmoid/hinge/ipo as CPO's, tpo-l as SimPO's.
/// False for a value outside TPOLossType (a cast from an integer).
inline bool tpo_as_cpo(TPOLossType t, CPOLossType* out) {
  switch (t) {
    case TPOLossType::kSigmoid:
      *out = CPOLossType::kSigmoid;
      return true;
    case TPOLossType::kHinge:
      *out = CPOLossType::kHinge;
      return true;
    case TPOLossType::kIPO:
      *out = CPOLossType::kIPO;
      return true;
    case TPOLossType::kTPOL:
      *out = CPOLossType::kSimPO;
      return true;
  }
  return false;
}

}  // namespace detail

PREFOPT_END_NAMESPACE
