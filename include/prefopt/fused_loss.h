// SPDX-License-Identifier: Apache-2.0
// One-pass fused preference losses: the loss and every LM-head gradient in one pass over
// chunks of whole pairs (or examples), three GEMM-equivalents in all.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_FUSED_LOSS
#endif

#include <prefopt/config.h>
#include <prefopt/fused_logprobs.h>
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>

PREFOPT_BEGIN_NAMESPACE

/// The LM-head side of a fused loss: final hidden states, the head, and the scored tokens, in
/// one of the three layouts of `functional::fused_logprobs`:
/// - padded, labels form: `hidden` [S, T, H], `labels` [S, T] (`ignore_index` unscored);
/// - padded, completion-mask form: also `completion_mask` [S, T] (`labels` are the input ids);
/// - packed: `hidden` [N, H] or [1, N, H], `labels` [N] or [1, N] and `cu_seqlens` [S + 1]
///   (with or without `completion_mask`).
///
/// For pairwise losses the S sequences are the chosen completions, then the rejected ones
/// (`[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`, as `functional::split_pairs`
/// reads them); for KTO they are the B examples.
///
/// Example:
/// ```
/// auto batch = prefopt::HeadBatch(hidden, lm_head->weight, {}, labels);
/// auto packed = prefopt::HeadBatch(h, w, {}, ids).completion_mask(mask).cu_seqlens(cu);
/// ```
struct HeadBatch {
  /// An empty batch: set every field through the setters.
  HeadBatch() = default;
  /// The padded labels form (set `completion_mask` / `cu_seqlens` for the others).
  HeadBatch(at::Tensor hidden, at::Tensor weight, at::Tensor bias, at::Tensor labels)
      : hidden_(std::move(hidden)),
        weight_(std::move(weight)),
        bias_(std::move(bias)),
        labels_(std::move(labels)) {}

  /// Final hidden states (differentiable).
  TORCH_ARG(at::Tensor, hidden);
  /// LM-head weight [V, H] (differentiable; frozen when it does not require grad).
  TORCH_ARG(at::Tensor, weight);
  /// LM-head bias [V], or an undefined tensor.
  TORCH_ARG(at::Tensor, bias);
  /// Labels, or the input ids in the completion-mask form.
  TORCH_ARG(at::Tensor, labels);
  /// Completion mask (bool or 0/1), or undefined for the labels form.
  TORCH_ARG(at::Tensor, completion_mask);
  /// Packed boundaries [S + 1] (int32/int64), or undefined for a padded batch.
  TORCH_ARG(at::Tensor, cu_seqlens);
};

/// What a fused loss returns: the loss's own result, with `result.loss` differentiable with
/// respect to the hidden states, the weight and the bias (every other field detached); the
/// inputs the loss consumed; and the policy's per-sequence log-probs with the token statistics
/// that `FusedLogprobsOptions` asked for. Hand them to `MetricAccumulator::add` exactly as the
/// two-pass path's: `metrics.add(out.result, out.inputs, out.policy)` (KTO:
/// `metrics.add(out.result, out.inputs, out.policy.chosen, out.policy.rejected)`).
template <typename Result, typename Inputs>
struct FusedLossOutput {
  Result result;        ///< the loss's result; `loss` carries the gradients
  Inputs inputs;        ///< the loss's inputs, policy log-probs detached
  PairLogprobs policy;  ///< chosen / rejected (KTO: desirable / undesirable), detached
};

/// `functional::fused_dpo_loss`'s output.
using FusedDPOOutput = FusedLossOutput<DPOLossResult, PairInputs>;
/// `functional::fused_cpo_loss`'s output.
using FusedCPOOutput = FusedLossOutput<CPOLossResult, PairInputs>;
/// `functional::fused_orpo_loss`'s output.
using FusedORPOOutput = FusedLossOutput<ORPOLossResult, PairInputs>;
/// `functional::fused_kto_loss`'s output.
using FusedKTOOutput = FusedLossOutput<KTOLossResult, KTOInputs>;

/// The per-example inputs of `functional::fused_kto_loss` besides the LM head.
///
/// Example:
/// ```
/// auto in = prefopt::FusedKTOInputs().desirable(labels_bool).reference_logps(ref.sum)
///               .kl(kl_estimate);
/// ```
struct FusedKTOInputs {
  /// [B] bool (or 0/1): whether each example is desirable.
  TORCH_ARG(at::Tensor, desirable);
  /// [B] reference log-probs (sums) of the examples, in batch order.
  TORCH_ARG(at::Tensor, reference_logps);
  /// [M] policy log-probs of the KL estimate's mismatched pairs (detached by the loss).
  TORCH_ARG(at::Tensor, policy_KL_logps);
  /// [M] reference log-probs of the same mismatched pairs.
  TORCH_ARG(at::Tensor, reference_KL_logps);
  /// The KL estimate itself (0-dim), instead of the KL log-probs (e.g. the ranks' mean).
  TORCH_ARG(at::Tensor, kl);
};

namespace functional {

/// DPO-family loss straight from the LM head, in one pass (arXiv:2305.18290 and the papers of
/// each `DPOLossType`; the same loss as `fused_logprobs` + `split_pairs` + `dpo_loss`).
///
/// How: the scored tokens are walked in chunks of whole pairs. For each chunk: its logits
/// `h_c · Wᵀ` once (GEMM 1), per-token log-probs and the statistics in fp32, the pair sums,
/// the loss's gradient with respect to them (autograd on the loss over the batch's [B]
/// vectors, so batch-level normalisers such as B and the chosen token count of the
/// token-mean NLL are exact), the logits gradient in place, then `dh = dz · W` (GEMM 2) and
/// `dW += dzᵀ · h_c` (GEMM 3). Backward only scales what the pass produced: three GEMMs in all
/// against four for the two-pass op, in the input dtype (16-bit GEMMs accumulate in fp32; on
/// CUDA, see below).
///
/// Memory: one reused chunk of logits, the returned gradients, and for 16-bit weights over
/// more than one chunk one fp32 [V, H] accumulator of dW (4·V·H bytes, e.g. 1.2 GB for
/// V = 151936, H = 2048). The cast at the end writes the result into that buffer's own storage
/// (peak 4·V·H bytes, where a second buffer for the cast would take 6·V·H).
/// Where that matters more than time, use the two-pass
/// `fused_logprobs` with `FusedBackward::kVocabBlocks`, which has none. The chunk: by default
/// whole pairs, as many as fit in 1/16 of the scored tokens' logits (at most 256 MiB) and at
/// least the longest pair unless that pair's logits exceed max(256 MiB, 1/4 of all); but for a
/// 16-bit weight that needs a gradient, one chunk of the whole batch where its logits (×2 with
/// a softcap) and the 16-bit dW it then writes directly (2·V·H) cost no more than that chunk
/// and the accumulator together (e.g. 1024 tokens at V = 151936, H = 2048: 0.31 GB of bf16
/// logits and 0.62 GB of dW, against 0.16 GB for a pair of 512 and 1.24 GB of accumulator),
/// which also spares each chunk a pass over the accumulator. An
/// explicit `FusedLogprobsOptions::chunk_bytes` is a hard bound. A pair over the bound streams
/// its first rows twice (statistics, then gradients) and keeps the logits of the last rows
/// that fit, so only the rows beyond the bound cost one more GEMM; an explicit budget that
/// does this warns once. Beside the budget: with `GatherBackend::kATen` (or on CUDA without
/// the row kernels), fp32 row temporaries of at most one budget more; on CPUs whose 16-bit
/// GEMMs take the fp32-block fallback (`cpu_mm16_fast` or `cpu_mm16_serves` false: see the
/// README), fp32 copies of operand and result blocks, at most 16 MiB each, three at a time.
///
/// On CUDA, the GEMMs with a 16-bit result (each chunk's logits, `dh = dz · W` over V, and
/// `dW` when one chunk covers the batch) are libtorch's `mm`. Under libtorch's defaults
/// (`allowBF16ReductionCuBLAS`, `allowFP16ReductionCuBLAS`: reduced-precision split-K allowed)
/// cuBLAS may sum split-K partial results in bf16/fp16, so those results can be rounded more
/// than once. `at::globalContext().setAllowBF16ReductionCuBLAS(false)` (libtorch 2.x) and
/// `setAllowFP16ReductionCuBLAS(false)` keep the reductions in fp32; the fp32 accumulator's
/// GEMMs are unaffected. Not yet measured on a GPU.
///
/// Which losses qualify: every per-pair loss. `aot` and `aot_unpaired` (which sort the batch),
/// `DPOLoss`'s running bco baseline and `torch::kNone` reduction are refused with an error that
/// points to the two-pass path. `inputs` carries the reference log-probs (sums, unless its
/// `logps_form` says kMean; the policy's are then given to the loss in the same form; an unsaid
/// form is taken as sums with a one-time warning, as `dpo_loss` does) and optional WPO
/// `weights`; the policy log-probs, the lengths and `nll_loss` come from the pass
/// and must not be set.
///
/// Gradients reach `batch.hidden`, `batch.weight` and `batch.bias` when they require grad and
/// grad mode is on; otherwise only the forward part runs (e.g. evaluation). They are computed
/// in the forward pass at the loss's own scale; backward multiplies them by the incoming
/// gradient (a scalar, in fp32). So an fp16 loss scale (GradScaler) comes too late to keep
/// fp16 gradients from underflowing: rely on it with the two-pass path, or use bf16. A second
/// backward through the same loss (`retain_graph`) and double backward are refused. WPO
/// `weights` are detached, as TRL computes them.
///
/// WPO (TRL's `use_weighting`, arXiv:2406.11827): `FusedLogprobsOptions::with_wpo_weights`
/// weights each pair's loss by the pass's own `w_c · w_r`, with
/// `w = exp(mean over the completion's scored tokens of log p(y_t) − log Σ_v p_v²)` (1 for an
/// empty completion), detached: `loss = reduce(w_c·w_r ⊙ (Σ_k w_k · losses_k + rpo_alpha ·
/// NLL))`, the same loss and gradients as `fused_logprobs` + `wpo_pair_weights` + `dpo_loss`
/// with those `weights`. A chunk's rows are all forwarded before its gradient, so its weights
/// are complete then; `policy` returns the sequences' weights and `inputs.weights` the pairs'.
/// Refused: `inputs.weights` as well (the two would multiply), and a token-mean NLL term (`sft`
/// or `rpo_alpha` with `NLLNormalization::kTokenMean`), whose weighted gradient at each chosen
/// token needs the mean of every pair's weight, known only after the last chunk (use
/// `kSequenceMean`, or the two-pass path).
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto ref = F::split_pairs(F::fused_logprobs(ref_hidden, ref_head, {}, labels));  // no grad
/// auto out = F::fused_dpo_loss(prefopt::HeadBatch(hidden, head, {}, labels),
///                              prefopt::PairInputs::reference_only(ref));
/// out.result.loss.backward();
/// metrics.add(out.result, out.inputs, out.policy);
/// ```
PREFOPT_API FusedDPOOutput fused_dpo_loss(const HeadBatch& batch, const PairInputs& inputs,
                                          const DPOLossOptions& loss = {},
                                          const FusedLogprobsOptions& options = {});

/// CPO / SimPO / AlphaPO straight from the LM head, in one pass (see `fused_dpo_loss` for how;
/// the same loss as `fused_logprobs` + `cpo_loss` on `PairInputs(policy)`). Every CPO loss
/// type qualifies; `torch::kNone` reduction is refused.
///
/// Example:
/// ```
/// auto out = prefopt::functional::fused_cpo_loss(
///     prefopt::HeadBatch(hidden, head, {}, labels),
///     prefopt::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO).beta(2.0));
/// ```
PREFOPT_API FusedCPOOutput fused_cpo_loss(const HeadBatch& batch, const CPOLossOptions& loss = {},
                                          const FusedLogprobsOptions& options = {});

/// SimPO (and AlphaPO with `alpha`) with `SimPOLossOptions` (the paper's defaults: β 2, no
/// NLL) straight from the LM head, in one pass: the same loss as `fused_logprobs` +
/// `simpo_loss` on `PairInputs(policy)`, and as `fused_cpo_loss` with `CPOLossType::kSimPO` and
/// the same fields. `torch::kNone` reduction is refused.
///
/// Example:
/// ```
/// auto out = prefopt::functional::fused_simpo_loss(
///     prefopt::HeadBatch(hidden, head, {}, labels),
///     prefopt::SimPOLossOptions().beta(2.5).simpo_gamma(1.4));
/// ```
PREFOPT_API FusedCPOOutput fused_simpo_loss(const HeadBatch& batch,
                                            const SimPOLossOptions& loss = {},
                                            const FusedLogprobsOptions& options = {});

/// ORPO straight from the LM head, in one pass (see `fused_dpo_loss` for how; the same loss as
/// `fused_logprobs` + `orpo_loss` on `PairInputs(policy)`, the NLL over the chosen completion
/// tokens). `torch::kNone` reduction is refused; an NLL over prompt + completion (TRL's) needs
/// the two-pass path, which takes it as `PairInputs::nll_loss`.
///
/// Example:
/// ```
/// auto out = prefopt::functional::fused_orpo_loss(prefopt::HeadBatch(hidden, head, {}, labels));
/// ```
PREFOPT_API FusedORPOOutput fused_orpo_loss(const HeadBatch& batch,
                                            const ORPOLossOptions& loss = {},
                                            const FusedLogprobsOptions& options = {});

/// KTO / apo_zero_unpaired straight from the LM head, in one pass over chunks of examples (see
/// `fused_dpo_loss` for how; the same loss as `fused_logprobs` + `kto_loss` with the examples
/// split by `inputs.desirable`). The KL estimate is a detached input, computed beforehand from
/// the mismatched pairs (e.g. `fused_logprobs` under no grad). `torch::kNone` is refused.
///
/// Example:
/// ```
/// auto out = prefopt::functional::fused_kto_loss(
///     prefopt::HeadBatch(hidden, head, {}, labels),
///     prefopt::FusedKTOInputs().desirable(flags).reference_logps(ref.sum).kl(kl));
/// ```
PREFOPT_API FusedKTOOutput fused_kto_loss(const HeadBatch& batch, const FusedKTOInputs& inputs,
                                          const KTOLossOptions& loss = {},
                                          const FusedLogprobsOptions& options = {});

}  // namespace functional

/// Functor form of `functional::fused_dpo_loss`, holding the loss and head options.
///
/// Example:
/// ```
/// const prefopt::FusedDPOLoss dpo(prefopt::DPOLossOptions().beta(0.1));
/// auto out = dpo(prefopt::HeadBatch(hidden, head, {}, labels),
///                prefopt::PairInputs::reference_only(ref));
/// ```
class FusedDPOLoss {
 public:
  /// The fused DPO loss with `loss` and `options`.
  explicit FusedDPOLoss(DPOLossOptions loss = {}, FusedLogprobsOptions options = {})
      : loss_(std::move(loss)), options_(std::move(options)) {}
  /// `functional::fused_dpo_loss(batch, inputs, loss(), options())`.
  FusedDPOOutput operator()(const HeadBatch& batch, const PairInputs& inputs) const {
    return functional::fused_dpo_loss(batch, inputs, loss_, options_);
  }
  /// The loss options.
  const DPOLossOptions& loss() const noexcept { return loss_; }
  /// The head options.
  const FusedLogprobsOptions& options() const noexcept { return options_; }

 private:
  DPOLossOptions loss_;
  FusedLogprobsOptions options_;
};

/// Functor form of `functional::fused_cpo_loss`.
///
/// Example:
/// ```
/// const prefopt::FusedCPOLoss simpo(
///     prefopt::CPOLossOptions().loss_type(prefopt::CPOLossType::kSimPO));
/// auto out = simpo(prefopt::HeadBatch(hidden, head, {}, labels));
/// ```
class FusedCPOLoss {
 public:
  /// The fused CPO loss with `loss` and `options`.
  explicit FusedCPOLoss(CPOLossOptions loss = {}, FusedLogprobsOptions options = {})
      : loss_(std::move(loss)), options_(std::move(options)) {}
  /// `functional::fused_cpo_loss(batch, loss(), options())`.
  FusedCPOOutput operator()(const HeadBatch& batch) const {
    return functional::fused_cpo_loss(batch, loss_, options_);
  }
  /// The loss options.
  const CPOLossOptions& loss() const noexcept { return loss_; }
  /// The head options.
  const FusedLogprobsOptions& options() const noexcept { return options_; }

 private:
  CPOLossOptions loss_;
  FusedLogprobsOptions options_;
};

/// Functor form of `functional::fused_simpo_loss`.
///
/// Example:
/// ```
/// const prefopt::FusedSimPOLoss simpo(prefopt::SimPOLossOptions().beta(2.5));
/// auto out = simpo(prefopt::HeadBatch(hidden, head, {}, labels));
/// ```
class FusedSimPOLoss {
 public:
  /// The fused SimPO loss with `loss` and `options`.
  explicit FusedSimPOLoss(SimPOLossOptions loss = {}, FusedLogprobsOptions options = {})
      : loss_(std::move(loss)), options_(std::move(options)) {}
  /// `functional::fused_simpo_loss(batch, loss(), options())`.
  FusedCPOOutput operator()(const HeadBatch& batch) const {
    return functional::fused_simpo_loss(batch, loss_, options_);
  }
  /// The loss options.
  const SimPOLossOptions& loss() const noexcept { return loss_; }
  /// The head options.
  const FusedLogprobsOptions& options() const noexcept { return options_; }

 private:
  SimPOLossOptions loss_;
  FusedLogprobsOptions options_;
};

/// Functor form of `functional::fused_orpo_loss`.
///
/// Example:
/// ```
/// const prefopt::FusedORPOLoss orpo(prefopt::ORPOLossOptions().beta(0.2));
/// auto out = orpo(prefopt::HeadBatch(hidden, head, {}, labels));
/// ```
class FusedORPOLoss {
 public:
  /// The fused ORPO loss with `loss` and `options`.
  explicit FusedORPOLoss(ORPOLossOptions loss = {}, FusedLogprobsOptions options = {})
      : loss_(std::move(loss)), options_(std::move(options)) {}
  /// `functional::fused_orpo_loss(batch, loss(), options())`.
  FusedORPOOutput operator()(const HeadBatch& batch) const {
    return functional::fused_orpo_loss(batch, loss_, options_);
  }
  /// The loss options.
  const ORPOLossOptions& loss() const noexcept { return loss_; }
  /// The head options.
  const FusedLogprobsOptions& options() const noexcept { return options_; }

 private:
  ORPOLossOptions loss_;
  FusedLogprobsOptions options_;
};

/// Functor form of `functional::fused_kto_loss`.
///
/// Example:
/// ```
/// const prefopt::FusedKTOLoss kto(prefopt::KTOLossOptions().beta(0.1));
/// auto out = kto(prefopt::HeadBatch(hidden, head, {}, labels),
///                prefopt::FusedKTOInputs().desirable(flags).reference_logps(ref.sum).kl(kl));
/// ```
class FusedKTOLoss {
 public:
  /// The fused KTO loss with `loss` and `options`.
  explicit FusedKTOLoss(KTOLossOptions loss = {}, FusedLogprobsOptions options = {})
      : loss_(std::move(loss)), options_(std::move(options)) {}
  /// `functional::fused_kto_loss(batch, inputs, loss(), options())`.
  FusedKTOOutput operator()(const HeadBatch& batch, const FusedKTOInputs& inputs) const {
    return functional::fused_kto_loss(batch, inputs, loss_, options_);
  }
  /// The loss options.
  const KTOLossOptions& loss() const noexcept { return loss_; }
  /// The head options.
  const FusedLogprobsOptions& options() const noexcept { return options_; }

 private:
  KTOLossOptions loss_;
  FusedLogprobsOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_FUSED_LOSS
#undef PREFOPT_OUTERMOST_FUSED_LOSS
#include <prefopt/detail/header_only.h>
#endif
