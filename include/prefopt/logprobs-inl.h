// SPDX-License-Identifier: Apache-2.0
// Log-prob gathering from logits: the custom autograd function and the public functions.
// Row selection, the row kernels and the reduction live in detail/rows-inl.h.
#pragma once
#include <prefopt/detail/check_enum.h>
#include <prefopt/logprobs.h>

#include <torch/csrc/autograd/custom_function.h>

#include <limits>

#include <prefopt/detail/row_common.h>
#include <prefopt/detail/rows.h>

PREFOPT_BEGIN_NAMESPACE
namespace detail {
namespace gather {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The row kernels give a row of −inf logits a NaN logsumexp, as they give rows with a NaN or
// +inf logit. In a rank's vocabulary slice such a row holds no probability (a banned or padded
// range of ids): its logsumexp is −inf, which the sum over the ranks leaves out.
PREFOPT_INLINE void empty_slice_rows(const at::Tensor& logits, const Rows& rows, at::Tensor& lse) {
  const auto nan = lse.isnan();
  if (!nan.any().item<bool>()) return;
  const auto i = nan.nonzero().squeeze(1);
  const auto z = logits.index({rows.b.index_select(0, i), rows.t.index_select(0, i)});
  lse.index_fill_(0, i.masked_select(z.isneginf().all(1)),
                  -std::numeric_limits<double>::infinity());
}

// Saves the logits (an input, so no copy) and one logsumexp (and entropy, when asked for: its
// gradient flows back too) per scored row. With `cross` (the
// vocabulary-parallel form) the logits are this rank's slice and the per-row results are
// reduced over the ranks before anything is saved or returned.
struct TokenLogpsFunction : public torch::autograd::Function<TokenLogpsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& b,
                               const at::Tensor& t, const at::Tensor& target, int64_t flags,
                               int64_t chunk_bytes, int64_t backend, const CrossRankPtr& cross,
                               const char* fn) {
    RowResults r;
    at::Tensor saved_target = target;
    if (cross) {
      // Per-shard entropies would be wrong, and so would their gradient: never asked for.
      TORCH_INTERNAL_ASSERT(!(flags & kEntropy), "vocabulary-parallel entropies");
      const auto st = slice_targets(target, logits.size(2));
      r = rows_forward(logits, Rows{b, t, st.forward, {}}, static_cast<unsigned>(flags),
                       static_cast<GatherBackend>(backend), chunk_bytes);
      empty_slice_rows(logits, Rows{b, t, st.forward, {}}, r.lse);
      cross->reduce_rows(r.lse, r.logp, st.owned);
      saved_target = st.backward;
    } else {
      r = rows_forward(logits, Rows{b, t, target, {}}, static_cast<unsigned>(flags),
                       static_cast<GatherBackend>(backend), chunk_bytes);
    }
    ctx->save_for_backward({logits, b, t, saved_target, r.lse, r.entropy});
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["fn"] = std::string(fn);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(detached_statistics(r, static_cast<unsigned>(flags)));
    return {r.logp, r.logit_mean, r.correct, r.entropy, r.log_sum_p2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const auto up = row_upstream(grads[0], grads[3], saved[4]);
    at::Tensor grad;
    if (up.g.defined()) {
      // The row kernels write the gradient outside autograd: a graph of it would be silently
      // empty (kKernel) or fail inside ATen without our name (kATen).
      TORCH_CHECK(!at::GradMode::is_enabled(), ctx->saved_data["fn"].toStringRef(),
                  ": double backward (create_graph) is not supported: the gradient is computed "
                  "outside autograd");
      grad =
          at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
      advise_huge_pages(grad);
      rows_backward(logits, Rows{saved[1], saved[2], saved[3], {}}, saved[4], up.g, up.g_ent,
                    saved[5], static_cast<GatherBackend>(ctx->saved_data["backend"].toInt()),
                    ctx->saved_data["chunk_bytes"].toInt(), grad);
    }
    return {grad, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

PREFOPT_INLINE void check_logits(const char* fn, const at::Tensor& logits, int64_t dim,
                                 const GatherLogprobsOptions& o) {
  TORCH_CHECK(logits.defined(), fn, ": expected logits, got an undefined tensor");
  TORCH_CHECK(logits.dim() == dim, fn, ": expected logits of rank ", dim,
              dim == 3 ? " [B, T, V]" : " [N, V]", ", got shape ", logits.sizes());
  check_floating(fn, "logits", logits);
  TORCH_CHECK(logits.size(-1) > 0, fn, ": expected a vocabulary of at least 1 entry, got V = 0");
  check_enum(fn, "backend", "a GatherBackend", o.backend(), GatherBackend::kATen);
  TORCH_CHECK(
      o.backend() != GatherBackend::kKernel || logits.is_cpu() ||
          (logits.is_cuda() && has_cuda_kernels()),
      fn, ": backend kKernel needs CPU logits, or CUDA logits and a build with CUDA kernels, got ",
      logits.device());
  TORCH_CHECK(o.chunk_bytes() > 0, fn, ": expected chunk_bytes > 0, got ", o.chunk_bytes());
}

PREFOPT_INLINE SequenceLogprobs gather(const char* fn, const at::Tensor& logits,
                                       const Selection& sel, const GatherLogprobsOptions& o,
                                       const CrossRankPtr& cross) {
  const unsigned flags = stat_flags(o.with_logits_mean(), o.with_token_accuracy(), o.with_entropy(),
                                    o.with_wpo_weights());
  const auto& rows = sel.rows;
  at::Tensor logp;
  RowResults stats;
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    const auto out =
        TokenLogpsFunction::apply(logits, rows.b, rows.t, rows.target, static_cast<int64_t>(flags),
                                  o.chunk_bytes(), static_cast<int64_t>(o.backend()), cross, fn);
    logp = out[0];
    stats.logit_mean = out[1], stats.correct = out[2], stats.entropy = out[3];
    stats.log_sum_p2 = out[4];
  } else {  // no graph, nothing saved (reference models, evaluation)
    c10::NoGradGuard no_grad;
    if (cross) {
      const auto st = slice_targets(rows.target, logits.size(2));
      stats = rows_forward(logits, Rows{rows.b, rows.t, st.forward, rows.seq}, flags, o.backend(),
                           o.chunk_bytes());
      empty_slice_rows(logits, rows, stats.lse);
      cross->reduce_rows(stats.lse, stats.logp, st.owned);
    } else {
      stats = rows_forward(logits, rows, flags, o.backend(), o.chunk_bytes());
    }
    logp = stats.logp;
  }
  return assemble(sel, logp, stats, flags, o.with_token_logps(), acc_type(logits.scalar_type()));
}

PREFOPT_INLINE SequenceLogprobs gather_padded(const char* fn, const at::Tensor& logits,
                                              const at::Tensor& labels, const at::Tensor* mask,
                                              const GatherLogprobsOptions& o) {
  check_logits(fn, logits, 3, o);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto sel =
      select_padded(fn, logits, "logits", B, T, V, labels, mask, o.shift(), o.ignore_index());
  SequenceLogprobs res = gather(fn, logits, sel, o, {});
  if (o.with_logits_mean_unmasked()) {
    c10::NoGradGuard no_grad;
    res.logits_sum_all = all_row_means(logits, o.backend(), o.chunk_bytes()).sum(1);
    res.positions = at::full({B}, T, logits.options().dtype(at::kLong));
  }
  return res;
}

PREFOPT_INLINE SequenceLogprobs gather_packed(const char* fn, const at::Tensor& logits_in,
                                              const at::Tensor& labels, const at::Tensor* mask,
                                              const at::Tensor& cu_seqlens,
                                              const GatherLogprobsOptions& o) {
  TORCH_CHECK(logits_in.defined(), fn, ": expected logits, got an undefined tensor");
  // Accept [1, N, V]: the layout packed batches have when they come out of a [B, T] model call.
  const bool batched = logits_in.dim() == 3;
  TORCH_CHECK(!batched || logits_in.size(0) == 1, fn,
              ": expected packed logits of shape [N, V] or [1, N, V], got ", logits_in.sizes());
  check_logits(fn, logits_in, batched ? 3 : 2, o);
  const at::Tensor logits = batched ? logits_in : logits_in.unsqueeze(0);
  const int64_t N = logits.size(1), V = logits.size(2);
  const auto sel = select_packed(fn, logits, "logits", N, V, labels, mask, cu_seqlens, o.shift(),
                                 o.ignore_index());
  SequenceLogprobs res = gather(fn, logits, sel, o, {});
  if (o.with_logits_mean_unmasked()) {
    c10::NoGradGuard no_grad;
    const auto means = all_row_means(logits, o.backend(), o.chunk_bytes()).squeeze(0);
    res.logits_sum_all = at::zeros({sel.S}, means.options()).index_add_(0, sel.seq_of, means);
    res.positions = sel.lengths;
  }
  return res;
}

}  // namespace gather
}  // namespace detail

namespace functional {

PREFOPT_INLINE SequenceLogprobs gather_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                                const GatherLogprobsFuncOptions& options) {
  return detail::gather::gather_padded("prefopt::gather_logprobs", logits, labels, nullptr,
                                       options);
}

PREFOPT_INLINE SequenceLogprobs gather_logprobs(const at::Tensor& logits,
                                                const at::Tensor& input_ids,
                                                const at::Tensor& completion_mask,
                                                const GatherLogprobsFuncOptions& options) {
  return detail::gather::gather_padded("prefopt::gather_logprobs", logits, input_ids,
                                       &completion_mask, options);
}

PREFOPT_INLINE SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits,
                                                       const at::Tensor& labels,
                                                       const at::Tensor& cu_seqlens,
                                                       const GatherLogprobsFuncOptions& options) {
  return detail::gather::gather_packed("prefopt::gather_packed_logprobs", logits, labels, nullptr,
                                       cu_seqlens, options);
}

PREFOPT_INLINE SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits,
                                                       const at::Tensor& input_ids,
                                                       const at::Tensor& completion_mask,
                                                       const at::Tensor& cu_seqlens,
                                                       const GatherLogprobsFuncOptions& options) {
  return detail::gather::gather_packed("prefopt::gather_packed_logprobs", logits, input_ids,
                                       &completion_mask, cu_seqlens, options);
}

PREFOPT_INLINE PairLogprobs split_pairs(const SequenceLogprobs& all) {
  TORCH_CHECK(all.sum.defined(), "prefopt::split_pairs: expected gathered results, got empty ones");
  const int64_t n = all.sum.size(0);
  TORCH_CHECK(n % 2 == 0, "prefopt::split_pairs: expected an even number of sequences ",
              "[chosen..., rejected...], got ", n);
  const int64_t B = n / 2;
  auto half = [&](const at::Tensor& x, int64_t start) {
    return x.defined() ? x.narrow(0, start, B) : x;
  };
  auto side = [&](int64_t start) {
    SequenceLogprobs s;
    s.sum = half(all.sum, start);
    s.count = half(all.count, start);
    s.mean = half(all.mean, start);
    // Packed token layouts are not split by sequence; they are kept whole on both sides.
    const bool padded = all.token_logps.defined() && all.token_logps.dim() == 2;
    s.token_logps = padded ? half(all.token_logps, start) : all.token_logps;
    s.token_mask = padded ? half(all.token_mask, start) : all.token_mask;
    s.logits_sum = half(all.logits_sum, start);
    s.logits_sum_all = half(all.logits_sum_all, start);
    s.positions = half(all.positions, start);
    s.correct = half(all.correct, start);
    s.entropy_sum = half(all.entropy_sum, start);
    s.wpo_weights = half(all.wpo_weights, start);
    return s;
  };
  return {side(0), side(B)};
}

PREFOPT_INLINE PairSums ld_logps(const PairLogprobs& pair, double ld_alpha) {
  const char* fn = "prefopt::ld_logps";
  TORCH_CHECK(ld_alpha >= 0.0 && ld_alpha <= 1.0, fn, ": expected ld_alpha in [0, 1], got ",
              ld_alpha);
  const auto& c = pair.chosen;
  const auto& r = pair.rejected;
  TORCH_CHECK(c.token_logps.defined() && r.token_logps.defined(), fn,
              ": expected per-token log-probs (gather with with_token_logps(true))");
  TORCH_CHECK(c.token_logps.dim() == 2 && r.token_logps.dim() == 2, fn,
              ": expected the padded layout [B, T'], got token_logps of shapes ",
              c.token_logps.sizes(), " and ", r.token_logps.sizes());
  TORCH_CHECK(c.token_logps.size(0) == r.token_logps.size(0), fn,
              ": expected as many chosen as rejected sequences, got ", c.token_logps.size(0),
              " and ", r.token_logps.size(0));
  const auto shared = at::minimum(c.count, r.count).unsqueeze(1);
  auto weighted = [&](const SequenceLogprobs& s) {
    const auto pos = s.token_mask.to(at::kLong).cumsum(1);  // 1-based within the completion
    const auto w = at::where(pos <= shared, at::ones_like(s.token_logps),
                             at::full_like(s.token_logps, ld_alpha));
    return (s.token_logps * w).sum(1);  // token_logps are 0 where not scored
  };
  return {weighted(c), weighted(r)};
}

PREFOPT_INLINE at::Tensor wpo_pair_weights(const PairLogprobs& pair, bool clamp_max_one) {
  TORCH_CHECK(
      pair.chosen.wpo_weights.defined() && pair.rejected.wpo_weights.defined(),
      "prefopt::wpo_pair_weights: expected WPO weights (gather with with_wpo_weights(true))");
  auto w = pair.chosen.wpo_weights * pair.rejected.wpo_weights;
  return clamp_max_one ? w.clamp_max(1.0) : w;
}

}  // namespace functional
PREFOPT_END_NAMESPACE
