// SPDX-License-Identifier: Apache-2.0
// Vocabulary-parallel log-probs: the gathering op and the fused LM-head op, with a CrossRank
// hook that reduces their per-row results over the ranks of a c10d process group.
#pragma once

#include <prefopt/detail/rows.h>
#include <prefopt/distributed.h>
#include <prefopt/vocab_parallel.h>

#include <algorithm>
#include <array>
#include <exception>
#include <string>
#include <vector>

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
    if (lse.numel() == 0) return;  // the ranks agree (see `agree`): none anywhere
    at::Tensor global_max = lse.clone();
    all_reduce(global_max, group_.get(), c10d::ReduceOp::MAX, fn_);
    // Only the owner's z_y − M counts: elsewhere logp is that of column 0, which may be −inf
    // (−inf · 0 would be NaN, and the sum would spread it). A slice of −inf logits has
    // lse_r = −inf and logp_r NaN, but its z_y is −inf.
    const auto z_y = at::where(lse.isneginf(), lse, logp + (lse - global_max));
    at::Tensor packed =
        at::stack({(lse - global_max).exp(), at::where(owned, z_y, at::zeros_like(z_y)),
                   owned.to(lse.scalar_type())});
    all_reduce(packed, group_.get(), c10d::ReduceOp::SUM, fn_);
    check_owners(packed[2]);
    const auto log_sum = packed[0].log();
    logp = packed[1] - log_sum;
    lse = global_max + log_sum;
  }

  void sum(at::Tensor& t) override { all_reduce(t, group_.get(), c10d::ReduceOp::SUM, fn_); }

 private:
  // Every scored label has exactly one owner once `agree` and `check_label_range` passed, unless
  // the ranks' labels differ in a way the hash missed.
  void check_owners(const at::Tensor& owners) const {
    const auto bad = owners.ne(1);
    if (!bad.any().item<bool>()) return;
    const auto first = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, fn_, ": expected every label to fall in exactly one rank's vocabulary ",
                "slice; ", bad.sum().item<int64_t>(), " scored tokens do not (the first is owned ",
                "by ", owners[first].item<double>(), " ranks): the ranks' labels differ");
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

PREFOPT_INLINE void check_slice(const char* fn, const at::Tensor& x, int64_t dim, const char* what,
                                const VocabParallelOptions& o) {
  TORCH_CHECK(!x.defined() || x.dim() <= dim || x.size(dim) > 0, fn,
              ": expected every rank to hold at least 1 vocabulary id, got ", what, " of shape ",
              x.sizes());
  TORCH_CHECK(!x.defined() || x.dim() <= dim || o.vocab_start() <= (int64_t{1} << 62) - x.size(dim),
              fn,
              ": expected vocab_start + V_local below 2^62, got vocab_start = ", o.vocab_start());
}

/// An NCCL group takes CUDA tensors: checked before the ranks meet, since inside the
/// collectives this rank's error would strand the others.
PREFOPT_INLINE void check_group_device(const char* fn, const at::Tensor& x, const char* what,
                                       c10d::ProcessGroup* group) {
  TORCH_CHECK(!x.defined() || !cuda_only(group) || x.is_cuda(), fn, ": expected ", what,
              " on a CUDA device for this NCCL group, got ", x.device());
}

/// What this rank brings to `agree`.
struct Local {
  std::exception_ptr error;          ///< this rank's argument error, rethrown once the ranks met
  int64_t n = 0;                     ///< scored tokens
  int64_t labels = 0;                ///< hash of the scored positions and labels
  int64_t lowest = 0, highest = -1;  ///< the scored labels' range (empty: none)
  int64_t shape = 0;                 ///< hash of what `shape_text` says
  std::string shape_text;        ///< the batch shape, dtype (and whether backward sums over ranks)
  int64_t start = 0, end = 0;    ///< the vocabulary slice [start, end)
  at::Device device = at::kCPU;  ///< the inputs' device: where an NCCL group meets
};

constexpr int64_t kHashMask = (int64_t{1} << 62) - 1;  // keeps −hash in range

/// FNV-1a over `values`, cut to 62 bits.
PREFOPT_INLINE int64_t hash_values(std::initializer_list<int64_t> values) {
  uint64_t h = 14695981039346656037ull;
  for (const int64_t v : values)
    for (int i = 0; i < 8; ++i)
      h = (h ^ ((static_cast<uint64_t>(v) >> (8 * i)) & 0xffu)) * 1099511628211ull;
  return static_cast<int64_t>(h) & kHashMask;
}

/// A hash of the scored (position, label) pairs into `me.labels`, on their device, modulo the
/// prime 2³¹ − 1 (every product fits in int64), the results summed (< 2⁶³ for n < 2³²). The
/// position is mixed non-linearly before the label joins, and the last step is a cube: a
/// linear first mix would let (p, t) and (p + 1, t − 48271) collide, and a square maps x and
/// −x alike. The labels' range comes back in the same copy to the host (one sync on CUDA).
PREFOPT_INLINE void hash_labels(const Rows& rows, int64_t T, Local& me) {
  if (rows.target.numel() == 0) return;
  constexpr int64_t M = 2147483647;
  auto p = ((rows.b * T + rows.t).remainder(M) * 48271 + 12345).remainder(M);
  p = (p * p + 67890).remainder(M);
  auto x = (p * 16807 + rows.target.remainder(M)).remainder(M);
  x = ((x * x).remainder(M) * x + 1013904223).remainder(M);
  const auto host = at::stack({x.sum(), rows.target.min(), rows.target.max()}).cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  me.labels = v[0] & kHashMask;
  me.lowest = v[1];
  me.highest = v[2];
}

/// The check every rank runs before the per-token collectives, in one MAX all-reduce of
/// 6 + 3 · world int64s: [n, −n, labels, −labels, shape, −shape] (a value and its negation have
/// opposite maxima only when every rank has the same value) and, for each rank, its slot
/// [failed, start, end] (−1 from the other ranks). A rank whose own checks failed still joins,
/// then rethrows its error; the others name it. Every rank throws the same error otherwise,
/// so none is left waiting in a collective. Returns V, the vocabulary the slices tile.
PREFOPT_INLINE int64_t agree(const char* fn, c10d::ProcessGroup* group, const Local& me) {
  const int world = group == nullptr ? 1 : group->getSize();
  const int rank = group == nullptr ? 0 : group->getRank();
  std::vector<int64_t> v(6 + 3 * static_cast<size_t>(world), -1);
  const int64_t mine[3] = {me.n, me.labels, me.shape};
  for (int i = 0; i < 3; ++i) {
    v[2 * i] = mine[i];
    v[2 * i + 1] = -mine[i];
  }
  int64_t* slot = v.data() + 6 + 3 * rank;
  slot[0] = me.error ? 1 : 0;
  slot[1] = me.start;
  slot[2] = me.end;
  // NCCL meets on the inputs' device (a second communicator, or "duplicate GPU", otherwise).
  at::Tensor buffer = at::tensor(v, at::kLong);
  buffer = me.device.is_cuda() ? buffer.to(me.device) : on_group_device(buffer, group);
  try {
    all_reduce(buffer, group, c10d::ReduceOp::MAX, fn);
  } catch (...) {
    if (me.error) std::rethrow_exception(me.error);
    throw;
  }
  buffer = buffer.cpu();
  const int64_t* all = buffer.data_ptr<int64_t>();
  if (me.error) std::rethrow_exception(me.error);
  std::vector<int> failed;
  for (int r = 0; r < world; ++r)
    if (all[6 + 3 * r] == 1) failed.push_back(r);
  check_no_rank_failed(fn, failed);
  TORCH_CHECK(all[4] == -all[5], fn, ": expected the same batch shape and dtype on every rank, ",
              "but the ranks differ (this rank ", rank, ": ", me.shape_text, ")");
  TORCH_CHECK(all[0] == -all[1], fn, ": expected the same labels on every rank, but the ranks ",
              "score between ", -all[1], " and ", all[0], " tokens (this rank ", rank, ": ", me.n,
              ")");
  TORCH_CHECK(all[2] == -all[3], fn, ": expected the same labels on every rank, but the ranks' ",
              "scored labels differ (", me.n, " scored tokens on each, at different positions or ",
              "with different ids)");
  // The slices [start, end) must tile [0, V): sorted by start, each begins where the last ended.
  std::vector<std::array<int64_t, 3>> slices;  // start, end, rank
  for (int r = 0; r < world; ++r) slices.push_back({all[7 + 3 * r], all[8 + 3 * r], r});
  std::sort(slices.begin(), slices.end());
  const auto held = [](const std::array<int64_t, 3>& s) {
    return "rank " + std::to_string(s[2]) + " holds [" + std::to_string(s[0]) + ", " +
           std::to_string(s[1]) + ")";
  };
  TORCH_CHECK(slices[0][0] == 0, fn, ": expected the ranks' vocabulary slices [vocab_start, ",
              "vocab_start + V_local) to tile [0, V); no rank holds ids [0, ", slices[0][0],
              ") (the lowest slice: ", held(slices[0]), ")");
  for (size_t i = 1; i < slices.size(); ++i) {
    const auto &a = slices[i - 1], &b = slices[i];
    TORCH_CHECK(b[0] >= a[1], fn, ": expected the ranks' vocabulary slices [vocab_start, ",
                "vocab_start + V_local) to tile [0, V); they overlap: ", held(a), " and ", held(b));
    TORCH_CHECK(b[0] == a[1], fn, ": expected the ranks' vocabulary slices [vocab_start, ",
                "vocab_start + V_local) to tile [0, V); no rank holds ids [", a[1], ", ", b[0],
                ") (", held(a), " and ", held(b), ")");
  }
  return slices.back()[1];
}

/// Scored labels must be ids of the vocabulary [0, V) that the slices tile: the same check on
/// every rank (their labels agree), so every rank throws the same error. `k` is the causal
/// shift: the error names the label's own index.
PREFOPT_INLINE void check_label_range(const char* fn, const Rows& rows, int64_t V, int64_t k,
                                      const Local& me, int64_t ignore_index) {
  if (me.lowest >= 0 && me.highest < V) return;  // (none scored: lowest 0, highest −1)
  const auto bad = (rows.target < 0) | (rows.target >= V);
  if (!bad.any().item<bool>()) return;
  const auto i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(false, fn, ": expected labels in [0, V = ", V,
              ") or equal to ignore_index = ", ignore_index, ", got ",
              rows.target[i].item<int64_t>(), " at labels[", rows.b[i].item<int64_t>(), ", ",
              rows.t[i].item<int64_t>() + k,
              "]; V is the vocabulary that the ranks' slices tile (this rank holds [", me.start,
              ", ", me.end, "))");
}

/// Global labels → this rank's column indices (out of [0, V_local) where another rank owns
/// them).
PREFOPT_INLINE Selection local_selection(Selection sel, const VocabParallelOptions& o) {
  sel.rows.target = sel.rows.target - o.vocab_start();
  return sel;
}

/// This rank's checks (`check`, which selects the rows into `sel`), the ranks' agreement and
/// the labels' range; throws the same error on every rank where they fail.
template <typename Check>
Selection select_agreed(const char* fn, c10d::ProcessGroup* group, const VocabParallelOptions& o,
                        Check&& check) {
  Local me;
  Selection sel;
  try {
    sel = check(me);
    me.n = sel.rows.target.numel();
    hash_labels(sel.rows, sel.scored.size(1), me);
  } catch (...) {
    me.error = std::current_exception();
  }
  const int64_t V = agree(fn, group, me);
  check_label_range(fn, sel.rows, V, o.shift() ? 1 : 0, me, o.ignore_index());
  return local_selection(std::move(sel), o);
}

}  // namespace vp
}  // namespace detail

namespace functional {

PREFOPT_INLINE SequenceLogprobs vocab_parallel_gather_logprobs(const at::Tensor& logits,
                                                               const at::Tensor& labels,
                                                               c10d::ProcessGroup* group,
                                                               const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_gather_logprobs";
  namespace d = detail;
  const auto go = GatherLogprobsOptions()
                      .shift(o.shift())
                      .ignore_index(o.ignore_index())
                      .with_token_logps(o.with_token_logps())
                      .chunk_bytes(o.chunk_bytes());
  const auto sel = d::vp::select_agreed(fn, group, o, [&](d::vp::Local& me) {
    // The device first: a rank whose options fail still joins on its inputs' device (NCCL).
    if (logits.defined()) me.device = logits.device();
    d::vp::check_options(fn, o);
    d::vp::check_slice(fn, logits, 2, "logits", o);
    d::vp::check_group_device(fn, logits, "logits", group);
    d::gather::check_logits(fn, logits, 3, go);
    me.shape = d::vp::hash_values(
        {logits.size(0), logits.size(1), static_cast<int64_t>(logits.scalar_type())});
    me.shape_text = "logits [" + std::to_string(logits.size(0)) + ", " +
                    std::to_string(logits.size(1)) + ", V_local], " +
                    c10::toString(logits.scalar_type());
    me.start = o.vocab_start();
    me.end = o.vocab_start() + logits.size(2);
    return d::select_padded(fn, logits, "logits", logits.size(0), logits.size(1),
                            d::kVocabularyUnknown, labels, nullptr, o.shift(), o.ignore_index());
  });
  return d::gather::gather(fn, logits, sel, go, d::vp::cross_rank(group, fn));
}

PREFOPT_INLINE SequenceLogprobs vocab_parallel_fused_logprobs(const at::Tensor& hidden,
                                                              const at::Tensor& weight,
                                                              const at::Tensor& labels,
                                                              c10d::ProcessGroup* group,
                                                              const VocabParallelOptions& o) {
  constexpr const char* fn = "prefopt::functional::vocab_parallel_fused_logprobs";
  namespace d = detail;
  auto fo = FusedLogprobsOptions()
                .shift(o.shift())
                .ignore_index(o.ignore_index())
                .with_token_logps(o.with_token_logps());
  d::fused::HeadInputs in;
  const auto sel = d::vp::select_agreed(fn, group, o, [&](d::vp::Local& me) {
    // The device first: a rank whose options fail still joins on its inputs' device (NCCL).
    if (hidden.defined()) me.device = hidden.device();
    d::vp::check_options(fn, o);
    d::vp::check_slice(fn, weight, 0, "weight", o);
    d::vp::check_group_device(fn, hidden, "hidden states", group);
    in = d::fused::check_head(fn, hidden, weight, {}, /*packed=*/false, fo);
    // Backward sums the hidden states' gradient over the ranks: they must all take it.
    const bool sums = at::GradMode::is_enabled() && hidden.requires_grad();
    me.shape = d::vp::hash_values({hidden.size(0), hidden.size(1), hidden.size(2),
                                   static_cast<int64_t>(hidden.scalar_type()), sums});
    me.shape_text = "hidden states " + c10::str(hidden.sizes()) + ", " +
                    c10::toString(hidden.scalar_type()) +
                    (sums ? ", requiring grad" : ", not requiring grad");
    me.start = o.vocab_start();
    me.end = o.vocab_start() + weight.size(0);
    return d::select_padded(fn, hidden, "hidden states", hidden.size(0), hidden.size(1),
                            d::kVocabularyUnknown, labels, nullptr, o.shift(), o.ignore_index());
  });
  // The budget bounds the chunks, one row at least.
  fo.chunk_bytes(std::max(o.chunk_bytes(), d::fused::row_budget(in, fo)));
  return d::fused::run_head(fn, in, weight, {}, sel, fo, d::vp::cross_rank(group, fn));
}

}  // namespace functional
PREFOPT_END_NAMESPACE
