// SPDX-License-Identifier: Apache-2.0
// Fused LM-head log-prob gathering: per-sequence log-probs straight from the final hidden
// states and the LM-head weight, without materialising the [N, V] logits.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_FUSED_LOGPROBS
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>
#include <prefopt/logprobs.h>

#include <cstdint>

PREFOPT_BEGIN_NAMESPACE

/// How the backward pass walks the logits it recomputes: row chunks × vocabulary blocks
/// (tiles) of one reused buffer. Each row chunk reads W twice and updates dW once; each
/// vocabulary block adds to the chunk's `dh`.
enum class FusedBackward {
  /// kTiles for fp32/fp64 inputs (the least memory: no accumulator beyond the returned
  /// gradients). For 16-bit inputs, kVocabBlocks when the scored tokens are at most the
  /// vocabulary size (and a column fits the budget), else kTokenChunks: whichever needs the
  /// smaller fp32 accumulator.
  kAuto,
  /// Chunks of tokens, as the forward pass: `dh` is exact per chunk; the weight gradient
  /// accumulates across chunks in place (fp32/fp64) or in an fp32 [V, H] buffer (16-bit; cast
  /// at the end within that buffer's own storage, so no second [V, H] buffer).
  kTokenChunks,
  /// Blocks of vocabulary columns over all scored tokens: each block's weight gradient is one
  /// GEMM over every token (fp32 accumulation inside it, one rounding, no [V, H] accumulator);
  /// `dh` accumulates across blocks in an [N, H] buffer (fp32 for 16-bit inputs). Falls back
  /// to kTokenChunks when one column of N tokens does not fit `chunk_bytes`.
  kVocabBlocks,
  /// Tiles of c tokens × c' columns within the tile budget (see `chunk_bytes`): c as large as
  /// fits beside blocks of 512 columns. The weight gradient accumulates across row chunks as
  /// for kTokenChunks and `dh` across blocks in a [c, H] buffer, so for fp32 weights the
  /// backward holds the returned gradients and a few MiB.
  kTiles,
};

/// Options of `functional::fused_logprobs` and `functional::fused_packed_logprobs`.
///
/// Example:
/// ```
/// auto opts = prefopt::FusedLogprobsOptions().chunk_bytes(64 << 20).softcap(30.0);
/// ```
struct FusedLogprobsOptions {
  /// Causal shift, as in `GatherLogprobsOptions::shift`. Default: true.
  TORCH_ARG(bool, shift) = true;
  /// Label value of unscored positions (labels form only). Default: -100.
  TORCH_ARG(int64_t, ignore_index) = -100;
  /// Logits are divided by this before the softmax, after the scale and the softcap (sampling
  /// temperature, as TRL's `temperature` for on-policy log-probs). Default: 1.
  TORCH_ARG(double, temperature) = 1.0;
  /// Final-logit softcapping `cap · tanh(z / cap)` (Gemma-2), applied after the logit scale and
  /// before the temperature, as the model's forward and TRL do; 0 turns it off. Default: 0.
  TORCH_ARG(double, softcap) = 0.0;
  /// Multiplier of the head's logits `h · Wᵀ + b`, applied first: models whose forward scales
  /// them take it from their config (Cohere's `logit_scale`, 1 / Granite's `logits_scaling`,
  /// Falcon-H1's `lm_head_multiplier`), as TRL ≥ 1.15's fused head does. Without it the fused
  /// op would score such a model's unscaled logits. Default: 1.
  TORCH_ARG(double, logit_scale) = 1.0;
  /// Also return per-token log-probs and their mask (see `SequenceLogprobs`). Default: false.
  TORCH_ARG(bool, with_token_logps) = false;
  /// Also return `logits_sum` (vocabulary mean of the final logits, summed over scored
  /// tokens: TRL's `logits/*`). Default: false.
  TORCH_ARG(bool, with_logits_mean) = false;
  /// Also return `correct` (argmax == label over scored tokens). Default: false.
  TORCH_ARG(bool, with_token_accuracy) = false;
  /// Also return `entropy_sum`, differentiable (see `GatherLogprobsOptions::with_entropy`): its
  /// gradient joins the log-probs' in every chunk of the backward, at no extra GEMM.
  /// Default: false.
  TORCH_ARG(bool, with_entropy) = false;
  /// Also return `wpo_weights` (see `GatherLogprobsOptions::with_wpo_weights`); the one-pass
  /// `fused_dpo_loss` also weights each pair's loss by them (TRL's `use_weighting`; the other
  /// fused losses only return them). Default: false.
  TORCH_ARG(bool, with_wpo_weights) = false;
  /// Memory budget, in bytes, for the reused buffers: forward, one [c, V] logits buffer in the
  /// input dtype (and c gathered hidden rows); backward, that buffer, an [N, c'] vocabulary
  /// block or a kTiles tile with its [c, H] row buffers, and a second one with softcapping.
  /// Every GEMM runs in the input dtype (16-bit ones accumulate in fp32), except on CPUs
  /// without AVX-512 and where libtorch's 16-bit GEMM runs below 0.8× its fp32 rate, where
  /// fp32 copies of blocks of at most 16 MiB serve (README, "Fused LM-head log-probs"); no
  /// whole operand is copied to fp32. On CPU every buffer row starts on a 64-byte line
  /// (V = 50,257 in fp32: rows 50,272 entries apart; the padding, under 64 bytes a row per
  /// buffer, is not counted in the budget) and vocabulary blocks narrower than V are whole
  /// lines: MKL writes logits rows with an odd stride markedly slower. Chunks are the largest
  /// that fit; an explicit budget below one row is an error. 0 (the default) is automatic:
  /// chunks and vocabulary blocks get 1/16 of the scored tokens' logits in the input dtype (at
  /// most 256 MiB, at least one row); tiles get 1/128 of them in fp32 (fp64 for fp64), from
  /// 4 MiB to 64 MiB. A softcap on 16-bit inputs adds two fp32 blocks of 2 MiB (CPU) or
  /// 16 MiB (CUDA), or of one row where a row is larger, for its transform.
  TORCH_ARG(int64_t, chunk_bytes) = 0;
  /// Row kernels or the ATen path for the per-chunk log-softmax (as for gathering).
  /// Default: kAuto.
  TORCH_ARG(GatherBackend, backend) = GatherBackend::kAuto;
  /// Blocking of the backward pass (see `FusedBackward`). Default: kAuto.
  TORCH_ARG(FusedBackward, backward) = FusedBackward::kAuto;
};

namespace functional {

/// The options of the functional form (`FusedLogprobsOptions`, as libtorch names them).
using FusedLogprobsFuncOptions = FusedLogprobsOptions;

/// Sequence log-probs of `labels` under the LM head `logits = hidden · weightᵀ + bias`, without
/// materialising the logits.
///
/// `sum_b = Σ_t 1[y_{b,t+1} ≠ ignore] · log_softmax(f(h_{b,t} · Wᵀ + bias))[y_{b,t+1}]`, where
/// f(x) = cap · tanh(s · x / cap) / T (s · x / T without a softcap): the logit scale s, the
/// softcap, the temperature T, in that order. For 16-bit inputs f(x) is computed in fp32 and
/// rounded once into the chunk's 16-bit buffer, whose fp32 statistics follow.
///
/// - `hidden`: [B, T, H] final hidden states; `weight`: [V, H]; `bias`: [V] or an undefined tensor.
///   One floating dtype (fp64/fp32/bf16/fp16) and one device for all three.
/// - `labels`: [B, T] as for `gather_logprobs` (int64/int32, `ignore_index` where unscored).
///
/// How: only the scored tokens reach a matmul (prompt and padding rows never do): chunks of c
/// scored rows are gathered into a reused buffer, and each chunk's logits buffer is allocated
/// once and reused. The log-softmax is computed in fp32 (fp64 for fp64 inputs). Backward
/// saves the inputs and one logsumexp per token (and one entropy with `with_entropy`; no copy
/// of the hidden states), recomputes the logits tile by tile (see `FusedBackward`), forms the
/// logits gradient in place (on CUDA, a gradient through the entropies goes through two fp32
/// row buffers within `chunk_bytes`), and
/// returns gradients for `hidden`, `weight` (skipped when it does not require grad, e.g. a
/// frozen head under LoRA) and `bias`. The weight and bias gradients are accumulated in fp32
/// (fp64 for fp64), or formed by one GEMM with fp32 accumulation per vocabulary block, and
/// cast to the parameter dtype once at the end. Without grad mode, or when nothing requires
/// grad (a reference model), nothing is saved. Double backward (`create_graph`) is refused:
/// the gradients are formed outside autograd.
///
/// Returns the same `SequenceLogprobs` as `gather_logprobs`, so losses and metrics do not care
/// which path produced them.
///
/// Example:
/// ```
/// auto h = model.hidden(input_ids);  // [2B, T, H]
/// auto lp = F::fused_logprobs(h, lm_head.weight, {}, labels);
/// auto [chosen, rejected] = F::split_pairs(lp);
/// ```
PREFOPT_API SequenceLogprobs fused_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& labels,
                                            const FusedLogprobsFuncOptions& options = {});

/// Completion-mask form: `input_ids` [B, T] are the labels, `completion_mask` [B, T] selects.
PREFOPT_API SequenceLogprobs fused_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& input_ids,
                                            const at::Tensor& completion_mask,
                                            const FusedLogprobsFuncOptions& options = {});

/// Packed sequences: `hidden` [N, H] or [1, N, H], `labels` [N] or [1, N], boundaries in
/// `cu_seqlens` [S + 1] (as for `gather_packed_logprobs`).
PREFOPT_API SequenceLogprobs fused_packed_logprobs(const at::Tensor& hidden,
                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& labels,
                                                   const at::Tensor& cu_seqlens,
                                                   const FusedLogprobsFuncOptions& options = {});

/// Packed sequences in the completion-mask form.
PREFOPT_API SequenceLogprobs fused_packed_logprobs(const at::Tensor& hidden,
                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& input_ids,
                                                   const at::Tensor& completion_mask,
                                                   const at::Tensor& cu_seqlens,
                                                   const FusedLogprobsFuncOptions& options = {});

}  // namespace functional

/// Functor form of `functional::fused_logprobs`, holding its options.
///
/// Example:
/// ```
/// prefopt::FusedLogprobs head_logps(prefopt::FusedLogprobsOptions().chunk_bytes(64 << 20));
/// auto lp = head_logps(hidden, lm_head_weight, {}, labels);
/// ```
class FusedLogprobs {
 public:
  /// The fused op with `options`.
  explicit FusedLogprobs(FusedLogprobsOptions options = {}) : options_(std::move(options)) {}
  /// `functional::fused_logprobs(hidden, weight, bias, labels, options())`.
  SequenceLogprobs operator()(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& labels) const {
    return functional::fused_logprobs(hidden, weight, bias, labels, options_);
  }
  /// The completion-mask form.
  SequenceLogprobs operator()(const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& input_ids,
                              const at::Tensor& completion_mask) const {
    return functional::fused_logprobs(hidden, weight, bias, input_ids, completion_mask, options_);
  }
  /// The options the functor was made with.
  const FusedLogprobsOptions& options() const { return options_; }

 private:
  FusedLogprobsOptions options_;
};

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_FUSED_LOGPROBS
#undef PREFOPT_OUTERMOST_FUSED_LOGPROBS
#include <prefopt/detail/header_only.h>
#endif
