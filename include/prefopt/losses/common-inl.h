// SPDX-License-Identifier: Apache-2.0
// What every pairwise loss shares: the input checks, sums vs means, and the NLL term.
#pragma once

#include <prefopt/detail/loss_math.h>
#include <prefopt/losses/common.h>

#include <cmath>
#include <string>

PREFOPT_BEGIN_NAMESPACE
namespace detail {

PREFOPT_INLINE void check_logps(const char* fn, const char* name, const at::Tensor& t,
                                int64_t batch, const at::Device& device) {
  TORCH_CHECK(t.defined(), fn, ": expected ", name, " to be a defined tensor, got undefined");
  TORCH_CHECK(t.dim() == 1, fn, ": expected ", name, " of shape [B] (1-D), got ", t.sizes());
  TORCH_CHECK(batch < 0 || t.size(0) == batch, fn, ": expected ", name, " of shape [", batch,
              "] like policy_chosen_logps, got ", t.sizes());
  TORCH_CHECK(t.device() == device, fn, ": expected ", name, " on ", device, " like ",
              "policy_chosen_logps, got ", t.device());
}

PREFOPT_INLINE void check_floating_logps(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": expected ", name,
              " to be floating point (fp64/fp32/bf16/fp16), got ", t.scalar_type());
}

PREFOPT_INLINE void check_counts(const char* fn, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK((at::isIntegralType(st, /*includeBool=*/false) || at::isFloatingType(st)), fn,
              ": expected ", name, " to be token counts (an integer or floating dtype), got ", st);
  // Checked on CPU only: reading the answer of a device tensor would synchronise with the
  // device on every step, which a training loop's inputs must not cost.
  if (!t.device().is_cpu() || t.numel() == 0) return;
  const auto bad = t.ge(0).logical_not();  // NaN counts fail too
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, fn, ": expected ", name, " to be token counts >= 0, got ",
                    t[i].item<double>(), " at index ", i);
}

/// Checks that per-pair weights (WPO's w_c·w_r > 0) are finite and >= 0: a NaN or negative
/// weight would silently give a NaN or sign-flipped loss. On CPU only, as `check_counts`.
PREFOPT_INLINE void check_weights(const char* fn, const at::Tensor& w) {
  if (!w.device().is_cpu() || w.numel() == 0) return;
  const auto wf = w.to(at::kDouble);
  const auto bad = (wf.ge(0) & at::isfinite(wf)).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, fn, ": expected weights to be finite and >= 0, got ",
                    wf[i].item<double>(), " at index ", i);
}

PREFOPT_INLINE int64_t check_pair_inputs(const char* fn, const PairInputs& in,
                                         bool needs_reference) {
  const auto& pc = in.policy_chosen_logps();
  TORCH_CHECK(pc.defined(), fn, ": expected policy_chosen_logps to be a defined tensor, got ",
              "undefined");
  TORCH_CHECK(pc.dim() == 1, fn, ": expected policy_chosen_logps of shape [B] (1-D), got ",
              pc.sizes());
  const int64_t B = pc.size(0);
  const auto dev = pc.device();
  check_floating_logps(fn, "policy_chosen_logps", pc);
  check_logps(fn, "policy_rejected_logps", in.policy_rejected_logps(), B, dev);
  check_floating_logps(fn, "policy_rejected_logps", in.policy_rejected_logps());
  // A reference that is given is checked even where the loss does not need it (it still
  // feeds the logged rewards of reference_free DPO).
  if (needs_reference || in.reference_chosen_logps().defined() ||
      in.reference_rejected_logps().defined()) {
    check_logps(fn, "reference_chosen_logps", in.reference_chosen_logps(), B, dev);
    check_logps(fn, "reference_rejected_logps", in.reference_rejected_logps(), B, dev);
    check_floating_logps(fn, "reference_chosen_logps", in.reference_chosen_logps());
    check_floating_logps(fn, "reference_rejected_logps", in.reference_rejected_logps());
  }
  if (in.chosen_lengths().defined()) {
    check_logps(fn, "chosen_lengths", in.chosen_lengths(), B, dev);
    check_counts(fn, "chosen_lengths", in.chosen_lengths());
  }
  if (in.rejected_lengths().defined()) {
    check_logps(fn, "rejected_lengths", in.rejected_lengths(), B, dev);
    check_counts(fn, "rejected_lengths", in.rejected_lengths());
  }
  if (in.weights().defined()) {
    check_logps(fn, "weights", in.weights(), B, dev);
    check_floating_logps(fn, "weights", in.weights());
    check_weights(fn, in.weights());
  }
  if (in.nll_loss().defined()) {
    TORCH_CHECK(in.nll_loss().numel() == 1, fn, ": expected nll_loss to be a scalar, got shape ",
                in.nll_loss().sizes());
    check_floating_logps(fn, "nll_loss", in.nll_loss());
  }
  return B;
}

PREFOPT_INLINE void warn_unsaid_form(const char* fn, const char* loss, LogpsForm native) {
  TORCH_WARN_ONCE(fn, ": PairInputs does not say whether its log-probs are sums or per-token ",
                  "means; taking them as ", native == LogpsForm::kMean ? "per-token means" : "sums",
                  ", the form ", loss,
                  " consumes. Build it with PairInputs(policy[, reference]) or ",
                  "PairInputs::averaged(policy), or set logps_form.");
}

PREFOPT_INLINE FormLogps form_logps(const char* fn, const char* loss, const PairInputs& in,
                                    LogpsForm native, at::ScalarType dtype) {
  FormLogps out;
  out.given = in.logps_form();
  const char* native_name = native == LogpsForm::kMean ? "per-token means" : "sums";
  if (out.given == LogpsForm::kUnspecified) {
    warn_unsaid_form(fn, loss, native);
    out.given = native;
  }
  const bool convert = out.given != native;
  const auto get = [&](const at::Tensor& t, const at::Tensor& n, const char* side) {
    if (!t.defined()) return t;
    const auto x = cast(t, dtype);
    if (!convert) return x;
    TORCH_CHECK(n.defined(), fn, ": ", loss, " consumes ", native_name, " of the log-probs; ",
                "got ", native == LogpsForm::kMean ? "sums" : "per-token means", " without ", side,
                "_lengths to convert them. Pass the token counts (PairInputs(policy) and ",
                "PairInputs::averaged(policy) carry them), or the log-probs as ", native_name);
    const auto nf = cast(n, dtype);
    return native == LogpsForm::kMean ? x / nf.clamp_min(1) : x * nf;
  };
  const auto& nc = in.chosen_lengths();
  const auto& nr = in.rejected_lengths();
  out.policy_chosen = get(in.policy_chosen_logps(), nc, "chosen");
  out.policy_rejected = get(in.policy_rejected_logps(), nr, "rejected");
  // The reference is a constant of the loss: no gradient reaches it, and a reference computed
  // with autograd on does not keep its graph alive through this loss.
  const auto detached = [](const at::Tensor& t) { return t.defined() ? t.detach() : t; };
  out.reference_chosen = get(detached(in.reference_chosen_logps()), nc, "chosen");
  out.reference_rejected = get(detached(in.reference_rejected_logps()), nr, "rejected");
  return out;
}

PREFOPT_INLINE at::Tensor chosen_nll(const char* fn, const PairInputs& in, const at::Tensor& chosen,
                                     LogpsForm form, NLLNormalization norm, at::ScalarType dtype,
                                     bool per_pair) {
  if (in.nll_loss().defined()) return cast(in.nll_loss().reshape({}), dtype);
  const auto logps = cast(chosen, dtype);
  const bool averaged = form == LogpsForm::kMean;
  const auto& n = in.chosen_lengths();
  if (norm == NLLNormalization::kSequenceMean) {
    at::Tensor seq;
    if (averaged) {
      seq = logps.neg();
    } else {
      TORCH_CHECK(n.defined(), fn, ": the sequence-mean NLL of summed log-probs needs ",
                  "chosen_lengths (or an explicit nll_loss), got none");
      seq = logps.neg() / cast(n, dtype).clamp_min(1);
    }
    return per_pair ? seq : reduce(seq, torch::kMean);
  }
  TORCH_CHECK(n.defined(), fn, ": the token-mean NLL needs chosen_lengths (token counts) or ",
              "an explicit nll_loss, got neither");
  // Σ over every chosen token / their number; an empty batch gives 0, not TRL's NaN. The
  // counts are summed in the loss's dtype: fp16 counts would overflow past 65504 tokens (an
  // NLL of 0) and fp64 counts would promote an fp32 loss to fp64.
  const auto nf = cast(n, dtype);  // same-dtype product: mixed dtypes take a slower path
  if (!averaged) return logps.sum().neg() / nf.sum().clamp_min(1);
  return (logps * nf).sum().neg() / nf.sum().clamp_min(1);
}

PREFOPT_INLINE void check_beta(const char* fn, double beta) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, fn, ": expected beta > 0, got ", beta);
}

PREFOPT_INLINE void check_smoothing(const char* fn, double eps) {
  TORCH_CHECK_VALUE(eps >= 0 && eps < 0.5, fn, ": expected label_smoothing in [0, 0.5), got ", eps);
}

/// The value of enum E that TRL calls `name`; a TORCH_CHECK_VALUE naming `fn` otherwise.
template <typename E>
E loss_type_from_name(const char* fn, const char* family, const std::string& name) {
  E value{};
  TORCH_CHECK_VALUE(value_of(name, &value), fn, ": unknown ", family, " loss type '", name,
                    "'; expected one of ", all_names<E>());
  return value;
}

}  // namespace detail
PREFOPT_END_NAMESPACE
