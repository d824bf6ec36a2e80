// SPDX-License-Identifier: Apache-2.0
// Float64 naive reference for log-prob gathering, written from the formulas
// (reference/losses.md §2): upcast, full log_softmax, gather, masked sums. Autograd through it
// is the gradient oracle.
#pragma once

#include <ATen/ATen.h>

namespace prefopt_ref {

struct Logprobs {
  at::Tensor sum, count, mean, token_logps, mask;
  at::Tensor logits_sum, logits_sum_all, correct, entropy_sum, wpo_weights;
};

/// `logits` [B, T, V]; `labels` [B, T]; `mask` [B, T] bool, scored positions *of the labels*
/// (unshifted, as a collator builds it). All arithmetic in fp64 on the logits as given.
inline Logprobs gather(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mask,
                       bool shift = true) {
  const auto z_all = logits.to(at::kDouble);
  const int64_t T = logits.size(1);
  const int64_t k = shift && T > 0 ? 1 : 0;
  const auto z = z_all.slice(1, 0, T - k);
  const auto y = labels.slice(1, k).to(at::kLong);
  const auto m = mask.slice(1, k).to(at::kBool);
  const auto lp = at::log_softmax(z, -1);
  const auto safe_y = y.masked_fill(~m, 0);
  Logprobs r;
  r.mask = m;
  r.token_logps = lp.gather(-1, safe_y.unsqueeze(-1)).squeeze(-1).masked_fill(~m, 0);
  r.sum = r.token_logps.sum(1);
  r.count = m.sum(1);
  r.mean = r.sum / r.count.clamp_min(1).to(at::kDouble);
  const auto md = m.to(at::kDouble);
  r.logits_sum = (z.mean(-1) * md).sum(1).detach();
  r.logits_sum_all = z_all.mean(-1).sum(1).detach();
  r.correct = ((z.argmax(-1) == y) & m).sum(1);
  const auto p = lp.exp();
  // p·log p → 0 where p = 0 (a −inf logit), as the entropy's limit. Differentiable, as the
  // op's entropy is.
  r.entropy_sum = (-(p * lp.masked_fill(p == 0, 0)).sum(-1) * md).sum(1);
  const auto adjusted = (r.token_logps - at::logsumexp(2 * lp, -1)) * md;
  r.wpo_weights = (adjusted.sum(1) / r.count.clamp_min(1).to(at::kDouble)).exp().detach();
  return r;
}

}  // namespace prefopt_ref
