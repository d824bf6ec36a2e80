// SPDX-License-Identifier: Apache-2.0
// Vocabulary-parallel log-probs: the gathering op and the fused LM-head op, with a CrossRank
// hook that reduces their per-row results over the ranks of a c10d process group.
#pragma once

#include <prefopt/detail/rows.h>
#include <prefopt/distributed.h>
#include <prefopt/vocab_parallel.h>

#include <algorithm>
#include <limits>

PREFOPT_BEGIN_NAMESPACE
namespace detail {
namespace vp {

/// The cross-rank reduction of the vocabulary-parallel ops. Each rank's logsumexp over its
/// columns (lse_r) plays the role of a max: M = max_r lse_r, LSE = M + log Σ_r exp(lse_r − M),
/// log p(y) = (z_y − M) − log Σ_r exp(lse_r − M), with z_y − M = logp_r + lse_r − M on the rank
/// that owns y. One MAX and one packed SUM all-reduce. Holds the group for as long as the
/// autograd graph holds it, so backward never reaches a released group.
struct GroupCrossRank : CrossRank {
  GroupCrossRank(c10::intrusive_ptr<c10d::ProcessGroup> group, const char* fn)
      : group_(std::move(group)), fn_(fn) {}

  void reduce_rows(at::Tensor& lse, at::Tensor& logp, const at::Tensor& owned) override {
    if (lse.numel() == 0) return;  // labels agree across ranks: none anywhere
    at::Tensor global_max = lse.clone();
    all_reduce(global_max, group_.get(), c10d::ReduceOp::MAX, fn_);
    const auto own = owned.to(lse.scalar_type());
    at::Tensor packed =
        at::stack({(lse - global_max).exp(), (logp + (lse - global_max)) * own, own});
    all_reduce(packed, group_.get(), c10d::ReduceOp::SUM, fn_);
    check_owners(packed[2]);
    const auto log_sum = packed[0].log();
    logp = packed[1] - log_sum;
    lse = global_max + log_sum;
  }

  void sum(at::Tensor& t) override { all_reduce(t, group_.get(), c10d::ReduceOp::SUM, fn_); }

 private:
  // Every scored label must be owned by exactly one rank.
  void check_owners(const at::Tensor& owners) const {
    const auto bad = owners.ne(1);
    if (!bad.any().item<bool>()) return;
    const auto first = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, fn_, ": expected every label to fall in exactly one rank's vocabulary ",
                "slice; ", bad.sum().item<int64_t>(), " scored tokens do not (the first is owned ",
                "by ", owners[first].item<double>(), " ranks): labels >= V, or vocab_start values ",
                "that overlap or leave gaps");
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;  // null: this process alone
  const char* fn_;
};

/// A strong reference to the caller's group (owned by an intrusive_ptr, as every c10d group is).
PREFOPT_INLINE CrossRankPtr cross_rank(c10d::ProcessGroup* group, const char* fn) {
  auto held = group == nullptr
                  ? c10::intrusive_ptr<c10d::ProcessGroup>()
                  : c10::intrusive_ptr<c10d::ProcessGroup>::unsafe_reclaim_from_nonowning(group);
  return c10::make_intrusive<GroupCrossRank>(std::move(held), fn);
}

PREFOPT_INLINE void check_options(const char* fn, const VocabParallelOptions& o) {
  TORCH_CHECK(o.vocab_start() >= 0, fn, ": expected vocab_start >= 0, got ", o.vocab_start());
  TORCH_CHECK(o.chunk_bytes() > 0, fn, ": expected chunk_bytes > 0, got ", o.chunk_bytes());
}

/// Global labels → this rank's column indices (out of [0, V_local) where another rank owns
/// them). Labels need only be >= 0 here: the owners check catches those >= V.
PREFOPT_INLINE Selection local_selection(Selection sel, const VocabParallelOptions& o) {
  sel.rows.target = sel.rows.target - o.vocab_start();
  return sel;
}

constexpr int64_t kAnyVocabulary = std::numeric_limits<int64_t>::max();

}  // namespace vp
}  // namespace detail

namespace functional {

PREFOPT_INLINE SequenceLogprobs vocab_parallel_gather_logprobs(const at::Tensor& logits,
                                                               const at::Tensor& labels,
                                                               c10d::ProcessGroup* group,
                                                               const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_gather_logprobs";
  namespace d = detail;
  d::vp::check_options(fn, o);
  const auto go = GatherLogprobsOptions()
                      .shift(o.shift())
                      .ignore_index(o.ignore_index())
                      .with_token_logps(o.with_token_logps())
                      .chunk_bytes(o.chunk_bytes());
  d::gather::check_logits(fn, logits, 3, go);
  const auto sel = d::vp::local_selection(
      d::select_padded(fn, logits, "logits", logits.size(0), logits.size(1), d::vp::kAnyVocabulary,
                       labels, nullptr, o.shift(), o.ignore_index()),
      o);
  return d::gather::gather(logits, sel, go, d::vp::cross_rank(group, fn));
}

PREFOPT_INLINE SequenceLogprobs vocab_parallel_fused_logprobs(const at::Tensor& hidden,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& labels,
                                                              c10d::ProcessGroup* group,
                                                              const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_fused_logprobs";
  namespace d = detail;
  d::vp::check_options(fn, o);
  auto fo = FusedLogprobsOptions()
                .shift(o.shift())
                .ignore_index(o.ignore_index())
                .with_token_logps(o.with_token_logps());
  const auto in = d::fused::check_head(fn, hidden, weight, {}, /*packed=*/false, fo);
  // The budget bounds the chunks, one row at least.
  fo.chunk_bytes(std::max(o.chunk_bytes(), d::fused::row_budget(in, fo)));
  const auto sel = d::vp::local_selection(
      d::select_padded(fn, hidden, "hidden states", hidden.size(0), hidden.size(1),
                       d::vp::kAnyVocabulary, labels, nullptr, o.shift(), o.ignore_index()),
      o);
  return d::fused::run_head(fn, in, weight, {}, sel, fo, d::vp::cross_rank(group, fn));
}

}  // namespace functional
PREFOPT_END_NAMESPACE
