// SPDX-License-Identifier: Apache-2.0
// What every loss of the Eigen layer shares: vector types, the reduction, the pairwise inputs,
// the sums/means conversion and the NLL term, each with its derivative.
//
// Mirrors include/prefopt/losses/common.h and the detail:: functions of
// include/prefopt/losses/common-inl.h (check_pair_inputs, form_logps, chosen_nll) and
// include/prefopt/detail/loss_math.h; the libtorch layer is the reference this layer is tested
// against (tests/test_eigen.cpp). Needs Eigen3 and the standard library only.
#pragma once

#include <prefopt/config.h>
#include <prefopt/losses/types.h>
#include <prefopt/version.h>

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

/// Declares an option or input `name` of type `T` with a fluent setter `name(value)` returning
/// `*this` and a getter `name()`, as libtorch's TORCH_ARG does; the default follows the macro.
#define PREFOPT_EIGEN_ARG(T, name)                                      \
 public:                                                                \
  inline auto name(const T& new_##name)->decltype(*this) { /* NOLINT */ \
    this->name##_ = new_##name;                                         \
    return *this;                                                       \
  }                                                                     \
  inline const T& name() const noexcept { return this->name##_; }       \
                                                                        \
 private:                                                               \
  T name##_

PREFOPT_BEGIN_NAMESPACE

/// The preference losses, log-prob gathering and metrics for hosts without libtorch (trainers on
/// ggml, ONNX Runtime training, custom CUDA, ...): each loss returns its value and the
/// closed-form gradient with respect to each input vector, which the host multiplies into its
/// own backward pass. Templated on the scalar type (`float` or `double`); computes in that type,
/// as the libtorch layer computes fp32 inputs in fp32 and fp64 inputs in fp64.
///
/// Example:
/// ```
/// #include <prefopt/eigen.h>
/// namespace pe = prefopt::eigen;
/// auto r = pe::dpo_loss(pe::PairInputs<float>()
///                           .policy_chosen_logps(pc).policy_rejected_logps(pr)
///                           .reference_chosen_logps(rc).reference_rejected_logps(rr)
///                           .logps_form(prefopt::LogpsForm::kSum));
/// // r.loss(0), r.grad_policy_chosen, r.grad_policy_rejected: dL/d(sequence log-prob)
/// ```
namespace eigen {

/// A column vector of `T` (per-sequence log-probs, per-pair losses, gradients).
///
/// Example:
/// ```
/// prefopt::eigen::Vector<float> pc(2);
/// pc << -12.5f, -30.2f;
/// ```
template <typename T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// A column vector of int64 (labels, token counts, cu_seqlens).
///
/// Example:
/// ```
/// prefopt::eigen::IndexVector labels(4);
/// labels << -100, 5, 7, 2;
/// ```
using IndexVector = Eigen::Matrix<int64_t, Eigen::Dynamic, 1>;

/// A row-major matrix of `T`: logits [N, V], one row per position.
///
/// Example:
/// ```
/// prefopt::eigen::RowMatrix<float> logits = prefopt::eigen::RowMatrix<float>::Zero(7, 32);
/// ```
template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// How a loss reduces its per-pair (per-example for KTO) vector, as the libtorch layer's
/// `torch::kMean`, `torch::kSum` and `torch::kNone`.
///
/// With kNone the result's `loss` is the vector itself, and the gradients are those of the
/// sum of its entries (what `loss.backward(torch::ones_like(loss))` gives).
///
/// Example:
/// ```
/// auto o = prefopt::eigen::DPOLossOptions().reduction(prefopt::eigen::Reduction::kSum);
/// ```
enum class Reduction {
  kNone,  ///< no reduction: `loss` is the [B] vector
  kMean,  ///< mean over the vector (0 for an empty one)
  kSum,   ///< sum over the vector
};

/// Per-sequence log-probs of a batch, as `gather_packed_logprobs` returns them (the libtorch
/// layer's `SequenceLogprobs`).
///
/// Example:
/// ```
/// auto lp = prefopt::eigen::gather_packed_logprobs<float>(logits, labels, cu_seqlens);
/// float s0 = lp.sum(0);  int64_t n0 = lp.count(0);
/// ```
template <typename T>
struct SequenceLogprobs {
  Vector<T> sum;          ///< [S] Σ over scored tokens of log p(label)
  IndexVector count;      ///< [S] number of scored tokens
  Vector<T> mean;         ///< [S] sum / max(count, 1): an empty completion gives 0, never NaN
  Vector<T> token_logps;  ///< [N] per-position log-probs, 0 where not scored

  /// Number of sequences.
  Eigen::Index size() const { return sum.size(); }
};

/// A concatenated batch `[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]` split in two
/// (see `split_pairs`).
///
/// Example:
/// ```
/// prefopt::eigen::PairLogprobs<double> pair = prefopt::eigen::split_pairs(lp);
/// ```
template <typename T>
struct PairLogprobs {
  SequenceLogprobs<T> chosen;    ///< the first half of the sequences
  SequenceLogprobs<T> rejected;  ///< the second half
};

/// The [B] vectors a pairwise loss (DPO family, CPO/SimPO/AlphaPO, TPO, ORPO) consumes: the
/// Eigen form of the libtorch layer's `PairInputs`, with the same fields and semantics. Only
/// the policy log-probs are always needed; the rest depend on the loss and its options.
///
/// The log-probs say what they hold (`logps_form`): sums or per-token means. Each loss takes the
/// form its anchor uses (its *native form*: sums for the DPO family and CPO/TPO sigmoid/hinge,
/// means for SimPO, AlphaPO, CPO/TPO ipo, tpo-l and ORPO) and converts the other form with the
/// token counts (sum = mean·n, mean = sum / max(n, 1)), or refuses it when they are missing. The
/// reference log-probs are in the same form as the policy's. The gradients a loss returns are
/// with respect to the vectors as given (through the conversion).
///
/// Example:
/// ```
/// namespace pe = prefopt::eigen;
/// auto in = pe::PairInputs<double>(policy, reference);  // sums + counts, from split_pairs
/// auto avg = pe::PairInputs<double>::averaged(policy);  // means + counts
/// auto in2 = pe::PairInputs<float>().policy_chosen_logps(pc).policy_rejected_logps(pr)
///                .logps_form(prefopt::LogpsForm::kSum);
/// ```
template <typename T>
struct PairInputs {
  /// No inputs yet: set them field by field (and say `logps_form`).
  PairInputs() = default;
  /// Sums and token counts of the policy, and the reference's sums (the usual DPO batch after
  /// `split_pairs`).
  PairInputs(const PairLogprobs<T>& policy, const PairLogprobs<T>& reference) : PairInputs(policy) {
    reference_chosen_logps_ = reference.chosen.sum;
    reference_rejected_logps_ = reference.rejected.sum;
  }
  /// Sums and token counts of the policy only (reference-free losses).
  explicit PairInputs(const PairLogprobs<T>& policy)
      : policy_chosen_logps_(policy.chosen.sum),
        policy_rejected_logps_(policy.rejected.sum),
        chosen_lengths_(policy.chosen.count.template cast<double>()),
        rejected_lengths_(policy.rejected.count.template cast<double>()),
        logps_form_(LogpsForm::kSum) {}

  /// Per-token means of the policy and their token counts: the native form of SimPO, AlphaPO,
  /// CPO ipo and ORPO.
  static PairInputs averaged(const PairLogprobs<T>& policy) {
    return PairInputs()
        .policy_chosen_logps(policy.chosen.mean)
        .policy_rejected_logps(policy.rejected.mean)
        .chosen_lengths(Eigen::VectorXd(policy.chosen.count.template cast<double>()))
        .rejected_lengths(Eigen::VectorXd(policy.rejected.count.template cast<double>()))
        .logps_form(LogpsForm::kMean);
  }

  /// [B] policy log-probs of the chosen completions.
  PREFOPT_EIGEN_ARG(Vector<T>, policy_chosen_logps);
  /// [B] policy log-probs of the rejected completions.
  PREFOPT_EIGEN_ARG(Vector<T>, policy_rejected_logps);
  /// [B] reference log-probs of the chosen completions (optional; the DPO family needs them).
  PREFOPT_EIGEN_ARG(std::optional<Vector<T>>, reference_chosen_logps);
  /// [B] reference log-probs of the rejected completions.
  PREFOPT_EIGEN_ARG(std::optional<Vector<T>>, reference_rejected_logps);
  /// [B] scored completion tokens of each chosen completion (integers, held in double); needed
  /// by the form conversion, per-token normalised losses (IPO, `sigmoid_norm`) and the
  /// token-mean NLL.
  PREFOPT_EIGEN_ARG(std::optional<Eigen::VectorXd>, chosen_lengths);
  /// [B] scored completion tokens of each rejected completion.
  PREFOPT_EIGEN_ARG(std::optional<Eigen::VectorXd>, rejected_lengths);
  /// [B] per-pair weights multiplying each per-pair loss, e.g. WPO's (DPO family only).
  PREFOPT_EIGEN_ARG(std::optional<Vector<T>>, weights);
  /// The NLL term computed by the host, used instead of the one derived from the chosen
  /// log-probs (e.g. TRL ORPO's cross-entropy over prompt + completion); the result's
  /// `grad_nll_loss` is the loss's derivative with respect to it. A loss with no NLL term
  /// ignores it with a warning, as the libtorch layer does.
  PREFOPT_EIGEN_ARG(std::optional<T>, nll_loss);
  /// What the log-probs hold. Set by the constructors; kUnspecified for inputs built field by
  /// field (each loss then takes its native form and warns once). Default: kUnspecified.
  PREFOPT_EIGEN_ARG(LogpsForm, logps_form) = LogpsForm::kUnspecified;
};

/// Receives the layer's warnings, each at most once per process (the libtorch layer's
/// TORCH_WARN_ONCE). The default handler writes `prefopt warning: <message>` to std::cerr.
/// Returns a reference the host may assign a new handler to (an empty one silences them).
/// Assign it at start-up, before any thread calls into the layer: the assignment is not
/// synchronised with the calls that read it.
///
/// Example:
/// ```
/// prefopt::eigen::warning_handler() = [](const std::string& m) { my_log(m); };
/// ```
inline std::function<void(const std::string&)>& warning_handler() {
  static std::function<void(const std::string&)> handler = [](const std::string& message) {
    std::cerr << "prefopt warning: " << message << std::endl;
  };
  return handler;
}

namespace detail {

/// Writes `args` to a string with an ostream.
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

/// Throws std::invalid_argument("<fn>: <args...>").
template <typename... Args>
[[noreturn]] void fail(const char* fn, const Args&... args) {
  throw std::invalid_argument(str(fn, args...));
}

/// `fail` unless `cond`.
template <typename... Args>
void check(bool cond, const char* fn, const Args&... args) {
  if (!cond) fail(fn, args...);
}

/// The keys of the warnings this process has sent (see `warn_once`).
struct WarnedKeys {
  std::mutex mutex;
  std::set<std::string> seen;
};
inline WarnedKeys& warned_keys() {
  static WarnedKeys keys;
  return keys;
}

/// Lets `warn_once(key, ...)` fire again (for tests: which test of a process sees a
/// once-per-process warning first depends on their order).
inline void forget_warning(const std::string& key) {
  auto& keys = warned_keys();
  std::lock_guard<std::mutex> lock(keys.mutex);
  keys.seen.erase(key);
}

/// Sends `message` to the warning handler the first time `key` is seen in this process.
inline void warn_once(const std::string& key, const std::string& message) {
  auto& keys = warned_keys();
  {
    std::lock_guard<std::mutex> lock(keys.mutex);
    if (!keys.seen.insert(key).second) return;
  }
  if (warning_handler()) warning_handler()(message);
}

/// "[n]", as the libtorch layer prints a [B] tensor's shape.
inline std::string shape(Eigen::Index n) { return str("[", n, "]"); }

/// Only float and double are supported scalar types.
template <typename T>
constexpr void check_scalar() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "prefopt::eigen computes in float or double");
}

// ------------------------------------------------------------------------------ scalar math
// The elementwise pieces of include/prefopt/detail/loss_math.h and the ATen kernels the libtorch
// layer calls, each with its derivative, evaluated as ATen's CPU kernels evaluate them.

/// log σ(x) = min(x, 0) − log1p(e^{−|x|}) (ATen's log_sigmoid).
template <typename T>
T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

/// d log σ(x)/dx = σ(−x), as ATen's log_sigmoid_backward evaluates it.
template <typename T>
T log_sigmoid_grad(T x) {
  const T z = std::exp(-std::abs(x));
  return x < 0 ? T(1) - z / (T(1) + z) : z / (T(1) + z);
}

/// σ(x), without overflow for either sign.
template <typename T>
T sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

/// dσ(x)/dx = σ(x)·σ(−x).
template <typename T>
T sigmoid_grad(T x) {
  return sigmoid(x) * sigmoid(-x);
}

/// softplus(x) = log(1 + e^x), x itself above 20 (ATen's default threshold).
template <typename T>
T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

/// d softplus(x)/dx = e^x / (e^x + 1), 1 above the threshold (ATen's softplus_backward).
template <typename T>
T softplus_grad(T x) {
  if (x > T(20)) return T(1);
  const T z = std::exp(x);
  return z / (z + T(1));
}

/// The cap of `capped_exp`: 80 in float (TRL's bound), 700 in double.
template <typename T>
constexpr T exp_cap() {
  return std::is_same<T, double>::value ? T(700) : T(80);
}

/// exp(min(x, cap)) and its derivative e^x where x ≤ cap, 0 above (the clamp's gradient).
template <typename T>
std::pair<T, T> capped_exp(T x) {
  const T e = std::exp(std::min(x, exp_cap<T>()));
  return {e, x <= exp_cap<T>() ? e : T(0)};
}

/// −(1−ε)·log σ(z) − ε·log σ(−z), the label-smoothed (cDPO) sigmoid loss, and its derivative
/// −(1−ε)σ(−z) + εσ(z); −log σ(z) at ε = 0.
template <typename T>
std::pair<T, T> smoothed_sigmoid(T z, double eps) {
  if (eps == 0) return {-log_sigmoid(z), -log_sigmoid_grad(z)};
  const T e = static_cast<T>(eps);
  return {log_sigmoid(z) * (e - T(1)) - log_sigmoid(-z) * e,
          log_sigmoid_grad(z) * (e - T(1)) + log_sigmoid_grad(-z) * e};
}

/// relu(x) and its derivative: 0 and 0 where x ≤ 0, x and 1 elsewhere. A NaN stays NaN with
/// derivative 1, as ATen's relu and threshold_backward (x ≤ 0 ? 0 : grad) give it: a NaN
/// margin must not turn into a zero loss.
template <typename T>
std::pair<T, T> relu(T x) {
  return x <= 0 ? std::make_pair(T(0), T(0)) : std::make_pair(x, T(1));
}

// ------------------------------------------------------------------------------ reductions

/// The scale each per-pair loss gets in the reduced loss: 1/B for kMean, 1 otherwise (kNone
/// differentiates the sum).
template <typename T>
T reduction_scale(Reduction reduction, Eigen::Index n) {
  return reduction == Reduction::kMean && n > 0 ? T(1) / static_cast<T>(n) : T(1);
}

/// Mean of `v`; 0 for an empty vector (the libtorch layer's `reduce` with kMean).
template <typename T>
T mean_or_zero(const Vector<T>& v) {
  return v.size() == 0 ? T(0) : v.sum() / static_cast<T>(v.size());
}

/// The reduced loss: [1] with kMean/kSum, the vector itself with kNone.
template <typename T>
Vector<T> reduce(const Vector<T>& losses, Reduction reduction) {
  if (reduction == Reduction::kNone) return losses;
  Vector<T> out(1);
  out(0) = reduction == Reduction::kMean ? mean_or_zero(losses) : losses.sum();
  return out;
}

/// Checks that `reduction` is one of the enum's values.
inline void check_reduction(const char* fn, Reduction reduction) {
  const int r = static_cast<int>(reduction);
  check(r >= 0 && r <= 2, fn, ": reduction is not a Reduction value (got ", r, ")");
}

// ------------------------------------------------------------------------------ inputs

/// Checks a [B] input: of size `batch`, the size of policy_chosen_logps.
template <typename V>
void check_size(const char* fn, const char* name, const V& v, Eigen::Index batch) {
  if (v.size() != batch) {
    fail(fn, ": expected ", name, " of shape ", shape(batch), " like policy_chosen_logps, got ",
         shape(v.size()));
  }
}

/// Checks that the token counts `v` (lengths) are >= 0 (NaN fails too).
template <typename V>
void check_counts(const char* fn, const char* name, const V& v) {
  for (Eigen::Index i = 0; i < v.size(); ++i) {
    if (!(v(i) >= 0)) {
      fail(fn, ": expected ", name, " to be token counts >= 0, got ", v(i), " at index ", i);
    }
  }
}

/// Validates the vectors of `in` that a pairwise loss needs and returns the batch size.
/// `needs_reference`: the reference vectors must be present. A reference that is given is
/// checked even where the loss does not need it (it still feeds the logged rewards of
/// reference_free DPO).
template <typename T>
Eigen::Index check_pair_inputs(const char* fn, const PairInputs<T>& in, bool needs_reference) {
  const Eigen::Index B = in.policy_chosen_logps().size();
  check_size(fn, "policy_rejected_logps", in.policy_rejected_logps(), B);
  const bool any_ref =
      in.reference_chosen_logps().has_value() || in.reference_rejected_logps().has_value();
  if (needs_reference || any_ref) {
    check(in.reference_chosen_logps().has_value(), fn,
          ": expected reference_chosen_logps, got none");
    check(in.reference_rejected_logps().has_value(), fn,
          ": expected reference_rejected_logps, got none");
    check_size(fn, "reference_chosen_logps", *in.reference_chosen_logps(), B);
    check_size(fn, "reference_rejected_logps", *in.reference_rejected_logps(), B);
  }
  if (in.chosen_lengths()) {
    check_size(fn, "chosen_lengths", *in.chosen_lengths(), B);
    check_counts(fn, "chosen_lengths", *in.chosen_lengths());
  }
  if (in.rejected_lengths()) {
    check_size(fn, "rejected_lengths", *in.rejected_lengths(), B);
    check_counts(fn, "rejected_lengths", *in.rejected_lengths());
  }
  if (in.weights()) {
    check_size(fn, "weights", *in.weights(), B);
    // As the libtorch layer: a NaN or negative weight gives a NaN or sign-flipped loss.
    const auto& w = *in.weights();
    for (Eigen::Index i = 0; i < w.size(); ++i) {
      const double wi = static_cast<double>(w(i));
      if (!(wi >= 0 && std::isfinite(wi)))
        fail(fn, ": expected weights to be finite and >= 0, got ", wi, " at index ", i);
    }
  }
  const int form = static_cast<int>(in.logps_form());
  check(form >= 0 && form <= 2, fn, ": logps_form is not a LogpsForm value (got ", form, ")");
  return B;
}

/// `in`'s log-probs in the form a loss consumes, and d(consumed)/d(given) per element: 1, n
/// (means → sums) or 1/max(n, 1) (sums → means).
template <typename T>
struct FormLogps {
  Vector<T> policy_chosen, policy_rejected;
  Vector<T> reference_chosen, reference_rejected;  ///< empty when `in` has no reference
  bool has_reference = false;
  Vector<T> jac_chosen, jac_rejected;  ///< d consumed / d given, per pair
  LogpsForm given = LogpsForm::kSum;   ///< what `in` held (kUnspecified resolved)
};

/// `in`'s log-probs converted to `native` (kSum or kMean) with the token counts when `in` holds
/// the other form (the libtorch layer's `detail::form_logps`). `loss` names the loss in the
/// messages: an error when the counts needed are missing, a warning (once per process) when
/// `in` does not say its form.
template <typename T>
FormLogps<T> form_logps(const char* fn, const char* loss, const PairInputs<T>& in,
                        LogpsForm native) {
  FormLogps<T> out;
  out.given = in.logps_form();
  const char* native_name = native == LogpsForm::kMean ? "per-token means" : "sums";
  if (out.given == LogpsForm::kUnspecified) {
    warn_once(str(fn, "/form"),
              str(fn, ": PairInputs does not say whether its log-probs are sums or per-token ",
                  "means; taking them as ", native_name, ", the form ", loss,
                  " consumes. Build it with PairInputs(policy[, reference]) or ",
                  "PairInputs::averaged(policy), or set logps_form."));
    out.given = native;
  }
  const bool convert = out.given != native;
  const Eigen::Index B = in.policy_chosen_logps().size();
  const auto jacobian = [&](const std::optional<Eigen::VectorXd>& n, const char* side) {
    Vector<T> jac = Vector<T>::Ones(B);
    if (!convert) return jac;
    check(n.has_value(), fn, ": ", loss, " consumes ", native_name, " of the log-probs; got ",
          native == LogpsForm::kMean ? "sums" : "per-token means", " without ", side,
          "_lengths to convert them. Pass the token counts (PairInputs(policy) and ",
          "PairInputs::averaged(policy) carry them), or the log-probs as ", native_name);
    const Vector<T> nf = n->template cast<T>();
    for (Eigen::Index b = 0; b < B; ++b)
      jac(b) = native == LogpsForm::kMean ? T(1) / std::max(nf(b), T(1)) : nf(b);
    return jac;
  };
  out.jac_chosen = jacobian(in.chosen_lengths(), "chosen");
  out.jac_rejected = jacobian(in.rejected_lengths(), "rejected");
  // means → sums multiply by n; sums → means divide by max(n, 1) (a division, as ATen does it).
  const auto get = [&](const Vector<T>& x, const std::optional<Eigen::VectorXd>& n) -> Vector<T> {
    if (!convert) return x;
    const Vector<T> nf = n->template cast<T>();
    if (native == LogpsForm::kSum) return x.cwiseProduct(nf);
    return x.cwiseQuotient(nf.cwiseMax(T(1)));
  };
  out.policy_chosen = get(in.policy_chosen_logps(), in.chosen_lengths());
  out.policy_rejected = get(in.policy_rejected_logps(), in.rejected_lengths());
  out.has_reference = in.reference_chosen_logps().has_value();
  if (out.has_reference) {
    out.reference_chosen = get(*in.reference_chosen_logps(), in.chosen_lengths());
    out.reference_rejected = get(*in.reference_rejected_logps(), in.rejected_lengths());
  }
  return out;
}

/// The NLL term of the chosen completions and its derivative (the libtorch layer's
/// `detail::chosen_nll`).
template <typename T>
struct NLL {
  bool given = false;     ///< the host's `nll_loss`: a constant with respect to the log-probs
  bool per_pair = false;  ///< `seq` holds B per-pair values (kSequenceMean, per pair asked for)
  T value = T(0);         ///< the scalar NLL (when !per_pair)
  Vector<T> seq;          ///< the per-pair NLLs (when per_pair)
  /// d value / d chosen_b (scalar) or d seq_b / d chosen_b (per pair), w.r.t. the consumed form.
  Vector<T> dlogps;
};

/// NLL of the chosen completions from their log-probs `chosen` (in `form`), or the host's
/// `in.nll_loss()`:
/// - kTokenMean: −Σ_b s_b / max(Σ_b n_b, 1) (from means: −Σ_b ā_b·n_b / max(Σ_b n_b, 1));
/// - kSequenceMean: −mean_b(s_b / max(n_b, 1)) (from means: −mean_b(ā_b)), or the B
///   per-pair values when `per_pair`.
template <typename T>
NLL<T> chosen_nll(const char* fn, const PairInputs<T>& in, const Vector<T>& chosen, LogpsForm form,
                  NLLNormalization norm, bool per_pair) {
  NLL<T> out;
  const Eigen::Index B = chosen.size();
  if (in.nll_loss()) {
    out.given = true;
    out.value = *in.nll_loss();
    out.dlogps = Vector<T>::Zero(B);
    return out;
  }
  const bool averaged = form == LogpsForm::kMean;
  const auto& n = in.chosen_lengths();
  if (norm == NLLNormalization::kSequenceMean) {
    Vector<T> seq(B), d(B);
    if (averaged) {
      seq = -chosen;
      d.setConstant(T(-1));
    } else {
      check(n.has_value(), fn, ": the sequence-mean NLL of summed log-probs needs ",
            "chosen_lengths (or an explicit nll_loss), got none");
      const Vector<T> nf = n->template cast<T>().cwiseMax(T(1));
      seq = (-chosen).cwiseQuotient(nf);
      d = -nf.cwiseInverse();
    }
    if (per_pair) {
      out.per_pair = true;
      out.seq = seq;
      out.dlogps = d;
    } else {
      out.value = mean_or_zero<T>(seq);
      out.dlogps = d * reduction_scale<T>(Reduction::kMean, B);
    }
    return out;
  }
  check(n.has_value(), fn, ": the token-mean NLL needs chosen_lengths (token counts) or ",
        "an explicit nll_loss, got neither");
  // Σ over every chosen token / their number; an empty batch gives 0, not TRL's NaN.
  if (!averaged) {
    // Summed in double: exact (the libtorch layer sums them in the loss's dtype, exact in fp32
    // up to 2^24 tokens).
    const T total = static_cast<T>(std::max(n->sum(), 1.0));
    out.value = -chosen.sum() / total;
    out.dlogps = Vector<T>::Constant(B, T(-1) / total);
    return out;
  }
  const Vector<T> nf = n->template cast<T>();
  const T total = std::max(nf.sum(), T(1));
  out.value = -chosen.cwiseProduct(nf).sum() / total;
  out.dlogps = -nf / total;
  return out;
}

/// Checks a finite β > 0.
inline void check_beta(const char* fn, double beta) {
  check(std::isfinite(beta) && beta > 0, fn, ": expected beta > 0, got ", beta);
}

/// Checks ε ∈ [0, 0.5).
inline void check_smoothing(const char* fn, double eps) {
  check(eps >= 0 && eps < 0.5, fn, ": expected label_smoothing in [0, 0.5), got ", eps);
}

/// Checks that an NLLNormalization holds one of its values.
inline void check_nll_normalization(const char* fn, NLLNormalization norm) {
  const int v = static_cast<int>(norm);
  check(v == 0 || v == 1, fn, ": nll_normalization is not an NLLNormalization value (got ", v, ")");
}

/// The loss-kind word of each enum, for messages.
template <typename E>
struct EnumWord;
/// DPO loss types.
template <>
struct EnumWord<DPOLossType> {
  static constexpr const char* value = "DPO loss type";
};
/// f-divergences.
template <>
struct EnumWord<FDivergence> {
  static constexpr const char* value = "f_divergence_type";
};
/// CPO loss types.
template <>
struct EnumWord<CPOLossType> {
  static constexpr const char* value = "CPO loss type";
};
/// TPO loss types.
template <>
struct EnumWord<TPOLossType> {
  static constexpr const char* value = "TPO loss type";
};
/// KTO loss types.
template <>
struct EnumWord<KTOLossType> {
  static constexpr const char* value = "KTO loss type";
};

}  // namespace detail

/// TRL's name of a loss type or f-divergence (`"sigmoid"`, `"exo_pair"`, `"reverse_kl"`,
/// `"tpo-l"`, ...), "?" for a value outside the enum.
///
/// Example:
/// ```
/// const char* n = prefopt::eigen::name_of(prefopt::DPOLossType::kIPO);  // "ipo"
/// ```
template <typename E>
const char* name_of(E value) {
  return prefopt::detail::name_of(value);
}

/// The value TRL calls `name` of enum `E` (DPOLossType, FDivergence, CPOLossType, TPOLossType,
/// KTOLossType); std::invalid_argument listing the names for anything else.
///
/// Example:
/// ```
/// auto t = prefopt::eigen::value_of<prefopt::DPOLossType>("exo_pair");
/// ```
template <typename E>
E value_of(const std::string& name) {
  E value{};
  detail::check(prefopt::detail::value_of(name, &value), "prefopt::eigen::value_of", ": unknown ",
                detail::EnumWord<E>::value, " '", name, "'; expected one of ",
                prefopt::detail::all_names<E>());
  return value;
}

}  // namespace eigen

PREFOPT_END_NAMESPACE
