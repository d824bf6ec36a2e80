// SPDX-License-Identifier: Apache-2.0
// Vocabulary-parallel log-probs (Megatron's tensor-parallel LM head): each rank holds a slice of
// the vocabulary. They run on the single-device ops' machinery (the gathering op's row kernels,
// the fused LM-head op's chunks and tiles); the reduction over the ranks is the only addition.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_VOCAB_PARALLEL
#endif

#include <prefopt/config.h>
#include <prefopt/detail/compat.h>
#include <prefopt/logprobs.h>

#include <cstdint>

namespace c10d {
class ProcessGroup;
}

PREFOPT_BEGIN_NAMESPACE

/// Options of the vocabulary-parallel gathering functions.
struct VocabParallelOptions {
  /// First vocabulary id this rank's shard holds: its logits (or weight rows) are ids
  /// [vocab_start, vocab_start + V_local), V_local >= 1. The shards of all ranks must tile
  /// [0, V) without gaps or overlaps, and V is their union (checked: an error on every rank).
  TORCH_ARG(int64_t, vocab_start) = 0;
  /// Causal shift, as in `GatherLogprobsOptions`. Default: true.
  TORCH_ARG(bool, shift) = true;
  /// Label value of unscored positions. Default: -100.
  TORCH_ARG(int64_t, ignore_index) = -100;
  /// Also return `token_logps` and `token_mask`. Default: false.
  TORCH_ARG(bool, with_token_logps) = false;
  /// Most bytes of logits buffers per chunk: the hidden-state form's (in the input dtype, as
  /// `FusedLogprobsOptions::chunk_bytes` counts them; at least one row) and the logits form's
  /// chunked ATen path's, where no row kernel runs. Default: 64 MiB.
  TORCH_ARG(int64_t, chunk_bytes) = int64_t{64} << 20;
};

namespace functional {

/// Sequence log-probs when each rank holds a slice of the vocabulary (Megatron's
/// tensor-parallel LM head): `logits` [B, T, V_local] are this rank's columns, `labels` [B, T]
/// are global ids and the same on every rank.
///
/// `log p(y) = z_y − (M + log Σ_r exp(lse_r − M))`, `lse_r` the logsumexp over rank r's
/// columns (the gathering op's row kernels) and `M = max_r lse_r`: one all-reduce (max) of the
/// per-token `lse_r` and one (sum) of the packed rescaled sums and owned target logits. The
/// results (fp32, fp64 for fp64 logits) are identical on every rank, so a loss built from them
/// is too; backward is local and exact: each rank's logits receive `g · (1[v = y] − softmax_v)`
/// over its columns. Only per-token logsumexps are saved. −inf logits (banned or padded ids),
/// up to a whole rank's slice of a row, give the unsharded op's values.
///
/// Before those, one small all-reduce (max, 6 + 3·world int64s) checks that the ranks agree:
/// every rank throws the same named error, at once, where their labels differ (the number of
/// scored tokens, or a hash of their positions and ids), their batch shape or dtype differs,
/// their slices do not tile [0, V), or a scored label lies outside [0, V). A rank whose own
/// arguments fail their checks (options, shapes, an empty slice) joins this all-reduce before
/// it throws, and the other ranks name it, so that no rank waits in a collective for it.
///
/// Example:
/// ```
/// auto lp = F::vocab_parallel_gather_logprobs(local_logits, labels, dist.group.get(),
///               prefopt::VocabParallelOptions().vocab_start(rank * V_local));
/// ```
PREFOPT_API SequenceLogprobs vocab_parallel_gather_logprobs(const at::Tensor& logits,
                                                            const at::Tensor& labels,
                                                            c10d::ProcessGroup* group,
                                                            const VocabParallelOptions& options);

/// The same from hidden states and this rank's rows of the LM head: `hidden` [B, T, H] (the
/// same on every rank), `weight` [V_local, H]. Logits are made in chunks and never whole.
/// Backward gives `weight` its exact gradient locally and `hidden` the full gradient, summed
/// over ranks with one all-reduce (16-bit partials summed in fp32 and rounded after the sum; a
/// CPU on the rounded 16-bit GEMM path rounds each vocabulary block's product first, as the
/// single-device op does): do not also
/// route `hidden` through a region that all-reduces its gradient (Megatron's
/// `copy_to_tensor_model_parallel_region`). The ranks' check also covers the hidden size and
/// whether `hidden` requires grad, on which that all-reduce depends; backward itself must then
/// run on every rank alike (a rank that asks only for the weight's gradient, through
/// `autograd::grad`, skips the all-reduce the others wait in).
///
/// Example:
/// ```
/// auto lp = F::vocab_parallel_fused_logprobs(hidden, weight_shard, labels, dist.group.get(),
///               prefopt::VocabParallelOptions().vocab_start(rank * V_local));
/// ```
PREFOPT_API SequenceLogprobs vocab_parallel_fused_logprobs(const at::Tensor& hidden,
                                                           const at::Tensor& weight,
                                                           const at::Tensor& labels,
                                                           c10d::ProcessGroup* group,
                                                           const VocabParallelOptions& options);

}  // namespace functional

PREFOPT_END_NAMESPACE

#ifdef PREFOPT_OUTERMOST_VOCAB_PARALLEL
#undef PREFOPT_OUTERMOST_VOCAB_PARALLEL
#include <prefopt/detail/header_only.h>
#endif
