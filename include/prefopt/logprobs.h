// SPDX-License-Identifier: Apache-2.0
// Batched log-prob gathering from logits: per-token and per-sequence log-probs, packed
// sequences, chosen/rejected pair splitting, LD-DPO and WPO weights.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_LOGPROBS
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>

#include <cstdint>

PREFOPT_BEGIN_NAMESPACE

/// Which implementation gathers the log-probs.
enum class GatherBackend {
  kAuto,    ///< Row kernels where built for the device (CPU always, CUDA when
            ///< `has_cuda_kernels()`), the chunked ATen path elsewhere.
  kKernel,  ///< Row kernels (CPU, or CUDA when built): no logits-sized temporaries.
  kATen,    ///< Chunked ATen ops on any device; the oracle the kernels are tested against.
};

/// Whether this build of prefopt has the CUDA row kernels (built when the libtorch it was
/// compiled against has CUDA). Without them CUDA tensors take the chunked ATen path.
PREFOPT_API bool has_cuda_kernels();

/// Options of `functional::gather_logprobs` and `functional::gather_packed_logprobs`.
///
/// Example:
/// ```
/// auto opts = prefopt::GatherLogprobsOptions().ignore_index(-100).with_logits_mean(true);
/// ```
struct GatherLogprobsOptions {
  /// Causal shift: logits at position t score the label at t + 1 (decoder LMs, as in TRL,
  /// LLaMA-Factory, torchtune, OpenRLHF). With `false` logits at t score the label at t.
  /// Default: true.
  TORCH_ARG(bool, shift) = true;
  /// Label value that marks a position as not scored (prompt, padding). Only used by the
  /// labels form; the completion-mask form scores exactly the masked-in positions. Default: -100.
  TORCH_ARG(int64_t, ignore_index) = -100;
  /// Also return the per-token log-probs (`token_logps`, differentiable) and `token_mask`.
  /// Default: false.
  TORCH_ARG(bool, with_token_logps) = false;
  /// Also return `logits_sum`: the sum over scored tokens of the vocabulary-mean logit (TRL's
  /// `logits/chosen` is Σ logits_sum / Σ count). Default: false.
  TORCH_ARG(bool, with_logits_mean) = false;
  /// Also return `logits_sum_all` and `positions`: the same statistic over every position of
  /// the logits, prompt and padding included, as LLaMA-Factory and torchtune log
  /// `logits/chosen` (`logits.mean()`). Reads every row, scored or not. Default: false.
  TORCH_ARG(bool, with_logits_mean_unmasked) = false;
  /// Also return `correct`: how many scored tokens have argmax(logits) == label (first maximum
  /// wins ties, as torch.argmax). A row holding a NaN or whose maximum is ±inf never counts
  /// (torch.argmax would pick the NaN, or index 0 of an all −inf row). Default: false.
  TORCH_ARG(bool, with_token_accuracy) = false;
  /// Also return `entropy_sum`: the sum over scored tokens of the softmax entropy
  /// H = −Σ_v p_v log p_v. Differentiable: a loss term in it (an entropy bonus) sends
  /// ∂H/∂z_v = −p_v (log p_v + H) back to the logits, as TRL's fused head does (the CPU row
  /// kernels; on CUDA, the chunked ATen path).
  /// Default: false.
  TORCH_ARG(bool, with_entropy) = false;
  /// Also return `wpo_weights`: exp(mean over scored tokens of log p(y_t) − log Σ_v p_v²),
  /// the WPO sequence weight (arXiv:2406.11827, as TRL computes it; no gradient). Default: false.
  TORCH_ARG(bool, with_wpo_weights) = false;
  /// Most bytes of temporary logits the op may allocate at once. The CPU kernels need none
  /// unless the vocabulary dimension is strided; the ATen path copies rows in chunks of this
  /// size (at least one row). Default: 16 MiB.
  TORCH_ARG(int64_t, chunk_bytes) = int64_t{16} << 20;
  /// Implementation choice. Default: kAuto.
  TORCH_ARG(GatherBackend, backend) = GatherBackend::kAuto;
};

/// Per-sequence log-probs of a batch, as returned by the gathering functions.
///
/// `sum`, `mean`, `token_logps` and `entropy_sum` are differentiable with respect to the
/// logits (or, from the fused op, the hidden states and the head); everything else is
/// detached. Floating results are fp32, or fp64 for fp64 logits. Optional fields are
/// undefined tensors unless the matching `with_*` option was set.
struct SequenceLogprobs {
  at::Tensor sum;    ///< [S] Σ over scored tokens of log p(label)
  at::Tensor count;  ///< [S] int64, number of scored tokens
  at::Tensor mean;   ///< [S] sum / max(count, 1): an empty completion gives 0, never NaN
  /// Per-token log-probs, 0 where not scored: [B, T'] for a padded batch (T' = T − 1 with the
  /// shift), [N] for a packed one (the last position of each sequence is never scored).
  at::Tensor token_logps;
  at::Tensor token_mask;      ///< bool, same shape as token_logps: the scored positions
  at::Tensor logits_sum;      ///< [S] Σ over scored tokens of mean_v logits
  at::Tensor logits_sum_all;  ///< [S] Σ over all positions of mean_v logits
  at::Tensor positions;       ///< [S] int64, positions in logits_sum_all
  at::Tensor correct;         ///< [S] int64, scored tokens whose argmax is the label
  at::Tensor entropy_sum;     ///< [S] Σ over scored tokens of the softmax entropy
  at::Tensor wpo_weights;     ///< [S] WPO sequence weights

  /// Number of sequences.
  int64_t size() const { return sum.defined() ? sum.size(0) : 0; }
};

/// A concatenated batch `[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]` split in two.
struct PairLogprobs {
  SequenceLogprobs chosen;    ///< the first half: the chosen completions
  SequenceLogprobs rejected;  ///< the second half: the rejected completions
};

/// Chosen and rejected sequence log-probs of B pairs.
struct PairSums {
  at::Tensor chosen;    ///< [B]
  at::Tensor rejected;  ///< [B]
};

namespace functional {

/// The options of the functional form (`GatherLogprobsOptions`, as libtorch names them).
using GatherLogprobsFuncOptions = GatherLogprobsOptions;

/// Sequence log-probs of `labels` under `logits`, positions excluded by `ignore_index`.
///
/// `sum_b = Σ_t 1[y_{b,t+1} ≠ ignore] · (z_{b,t,y_{b,t+1}} − logsumexp_v z_{b,t,v})` (shift on).
///
/// - `logits`: [B, T, V], fp64/fp32/bf16/fp16, any strides, CPU or CUDA. Never copied whole and
///   never upcast whole: bf16 rows are read as bf16 and accumulated in fp32.
/// - `labels`: [B, T], int64 (int32 accepted), values in [0, V) or `ignore_index`.
///
/// Gradients reach the logits exactly as through log_softmax + gather + masked sum, but only
/// the per-token logsumexp (and, with `with_entropy`, the per-token entropy) is saved for
/// backward. Double backward (`create_graph`) is refused, for every gathering function: the
/// gradient is formed outside autograd.
///
/// Example:
/// ```
/// namespace F = prefopt::functional;
/// auto lp = F::gather_logprobs(logits, labels);  // labels: -100 on prompt and padding
/// auto pair = F::split_pairs(lp);                // pair.chosen.sum, pair.rejected.sum
/// ```
PREFOPT_API SequenceLogprobs gather_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                             const GatherLogprobsFuncOptions& options = {});

/// The completion-mask form (TRL's collator): `input_ids` [B, T] are the labels, and
/// `completion_mask` [B, T] (bool or 0/1 integers) selects the scored positions; with the shift,
/// position t is scored when `completion_mask[b, t + 1]` is set. `ignore_index` is not used.
///
/// Example:
/// ```
/// auto lp = F::gather_logprobs(logits, input_ids, completion_mask);
/// ```
PREFOPT_API SequenceLogprobs gather_logprobs(const at::Tensor& logits, const at::Tensor& input_ids,
                                             const at::Tensor& completion_mask,
                                             const GatherLogprobsFuncOptions& options = {});

/// Packed (padding-free) batches: `logits` [N, V] or [1, N, V] and `labels` [N] or [1, N] hold
/// S sequences back to back, sequence s spanning `[cu_seqlens[s], cu_seqlens[s+1])`
/// (`cu_seqlens`: [S + 1] integers, starting at 0, non-decreasing, ending at N). The shift
/// never crosses a boundary, so each sequence gets exactly what the padded batch gives it.
///
/// Example:
/// ```
/// auto lp = F::gather_packed_logprobs(logits, labels, cu_seqlens);  // lp.sum: [S]
/// ```
PREFOPT_API SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& cu_seqlens,
                                                    const GatherLogprobsFuncOptions& options = {});

/// Packed batches in the completion-mask form: `completion_mask` [N] or [1, N].
PREFOPT_API SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits,
                                                    const at::Tensor& input_ids,
                                                    const at::Tensor& completion_mask,
                                                    const at::Tensor& cu_seqlens,
                                                    const GatherLogprobsFuncOptions& options = {});

/// Splits the results of a concatenated batch `[chosen..., rejected...]` (TRL, LLaMA-Factory,
/// torchtune and OpenRLHF all order it so) into its two halves. Needs an even batch. The
/// per-sequence fields are split; a packed batch's `token_logps` and `token_mask` ([N], not
/// per sequence) stay whole on both sides.
///
/// Example:
/// ```
/// auto [chosen, rejected] = F::split_pairs(F::gather_logprobs(logits, labels));
/// ```
PREFOPT_API PairLogprobs split_pairs(const SequenceLogprobs& all);

/// LD-DPO sequence log-probs (arXiv:2409.06411): in each pair the first min(n_c, n_r) scored
/// tokens of each side count fully, later ones are scaled by `ld_alpha` ∈ [0, 1]; positions
/// are counted within the completion (TRL ≥ 0.29 and LLaMA-Factory). TRL applies this to the
/// policy and the reference alike; LLaMA-Factory to the policy only. `ld_alpha = 1` gives the
/// plain sums. Needs `with_token_logps` and the padded layout. Differentiable.
///
/// `ld_c = Σ_t [pos_t ≤ min(n_c, n_r)] · lp_t + ld_alpha · Σ_t [pos_t > min(n_c, n_r)] · lp_t`
///
/// Example:
/// ```
/// auto pair = F::split_pairs(F::gather_logprobs(logits, labels,
///                                               prefopt::GatherLogprobsOptions().with_token_logps(true)));
/// auto ld = F::ld_logps(pair, 0.5);  // ld.chosen, ld.rejected: [B]
/// ```
PREFOPT_API PairSums ld_logps(const PairLogprobs& pair, double ld_alpha);

/// WPO pair weights `w_c · w_r` (TRL ≥ 0.29 leaves them unclamped; `clamp_max_one = true`
/// gives TRL ≤ 0.28's `min(1, w_c · w_r)`). Needs `with_wpo_weights`. No gradient.
///
/// Example:
/// ```
/// auto w = F::wpo_pair_weights(pair);  // [B], multiplies each per-pair loss
/// ```
PREFOPT_API at::Tensor wpo_pair_weights(const PairLogprobs& pair, bool clamp_max_one = false);

}  // namespace functional

/// Functor form of `functional::gather_logprobs`, holding its options.
///
/// Example:
/// ```
/// prefopt::GatherLogprobs gather(prefopt::GatherLogprobsOptions().with_entropy(true));
/// auto lp = gather(logits, labels);
/// ```
class GatherLogprobs {
 public:
  /// The gathering op with `options`.
  explicit GatherLogprobs(GatherLogprobsOptions options = {}) : options_(std::move(options)) {}
  /// `functional::gather_logprobs(logits, labels, options())`.
  SequenceLogprobs operator()(const at::Tensor& logits, const at::Tensor& labels) const {
    return functional::gather_logprobs(logits, labels, options_);
  }
  /// The completion-mask form.
  SequenceLogprobs operator()(const at::Tensor& logits, const at::Tensor& input_ids,
                              const at::Tensor& completion_mask) const {
    return functional::gather_logprobs(logits, input_ids, completion_mask, options_);
  }
  /// The options the functor was made with.
  const GatherLogprobsOptions& options() const { return options_; }

 private:
  GatherLogprobsOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_LOGPROBS
#undef PREFOPT_OUTERMOST_LOGPROBS
#include <prefopt/detail/header_only.h>
#endif
