// SPDX-License-Identifier: Apache-2.0
// One-pass fused preference losses: per chunk of whole pairs, logits once, the loss's gradient
// with respect to the chunk's sequence log-probs, then dh and dW from the same logits.
#pragma once
#include <prefopt/detail/check_enum.h>
#include <prefopt/fused_loss.h>

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include <prefopt/detail/rows.h>
#include <prefopt/losses/common.h>

PREFOPT_BEGIN_NAMESPACE
namespace detail {
namespace fused_loss {

using fused::HeadInputs;
using fused::HeadSpec;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// How the S sequences group into the units a chunk never splits: pairs (b, B + b) or single
/// examples (KTO).
enum class Groups { kPairs, kSingles };

/// The batch's loss as a function of every sequence's summed log-prob [S] (differentiable)
/// and, where `Job::apply_wpo`, the sequences' WPO weights [S] (constants; else undefined).
using SumsLoss = std::function<at::Tensor(const at::Tensor& sums, const at::Tensor& wpo)>;
/// The final loss on the pass's per-sequence results (no grad); returns the 0-dim loss value.
using Finish = std::function<at::Tensor(const SequenceLogprobs& all)>;

/// One pass over the batch: forward statistics always; dh, dW, db where `need_*`.
struct Job {
  const char* fn = nullptr;
  HeadInputs in;
  at::Tensor weight, bias;  // bias undefined when the head has none
  Selection sel;
  FusedLogprobsOptions o;
  Groups groups = Groups::kPairs;
  SumsLoss loss;
  Finish finish;
  bool need_h = false, need_w = false, need_b = false;
  /// Weight each group's loss by its WPO weights, computed in the pass (needs kLogSumP2):
  /// a chunk's rows are all forwarded before its gradient, so its weights are complete then.
  bool apply_wpo = false;
  // Results.
  at::Tensor dh, dw, db, value;
  // The sequences' WPO weights where `apply_wpo`: 1 until a sequence's chunk is done.
  at::Tensor wpo;

  /// dL/d(sums) at the sequences `ids`: the loss is evaluated on `cur` (the batch's sums so far,
  /// placeholders for sequences not yet seen), differentiated with respect to those entries
  /// only. For a per-pair loss the result does not depend on the placeholders.
  at::Tensor seq_grad(const at::Tensor& cur, const at::Tensor& ids) const {
    at::AutoGradMode enable(true);
    auto leaf = cur.index_select(0, ids).detach().requires_grad_(true);
    const auto full = cur.detach().index_copy(0, ids, leaf);
    const auto l = loss(full, wpo);
    auto g = torch::autograd::grad({l}, {leaf}, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true)[0];
    return g.defined() ? g : at::zeros_like(leaf);
  }

  void run() {
    const auto st = in.hidden.scalar_type();
    const auto acc = acc_type(st);
    const int64_t V = in.V, H = in.H, S = sel.S;
    const auto h = in.hidden.reshape({-1, H});
    const auto& rows = sel.rows;
    const auto flat = rows.b * in.hidden.size(1) + rows.t;
    const int64_t n = flat.size(0);
    const HeadSpec spec = fused::head_spec(fn, in, n, o);
    const unsigned flags = stat_flags(o.with_logits_mean(), o.with_token_accuracy(),
                                      o.with_entropy(), o.with_wpo_weights());
    const auto acc_opts = h.options().dtype(acc);
    const auto long_opts = h.options().dtype(at::kLong);

    // Scored rows per sequence, on the host (one copy): rows are ordered by sequence, so the
    // rows of sequence s are [offs[s], offs[s + 1]).
    const auto counts = at::zeros({S}, long_opts).index_add_(0, rows.seq, at::ones_like(rows.seq));
    const auto counts_h = counts.cpu();
    const int64_t* cnt = counts_h.data_ptr<int64_t>();
    std::vector<int64_t> offs(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) offs[s + 1] = offs[s] + cnt[s];
    const int64_t G = groups == Groups::kPairs ? S / 2 : S;
    const auto group_rows = [&](int64_t g) {
      return cnt[g] + (groups == Groups::kPairs ? cnt[G + g] : 0);
    };
    // Chunks of whole groups within the limit's rows. Automatic: at least the widest group,
    // unless its logits outgrow max(256 MiB, 1/4 of the scored tokens' logits); explicit
    // chunk_bytes: a hard bound. A group over the limit gets a chunk of its own that keeps the
    // logits of its last c rows and streams the rest twice (statistics, then gradients): one
    // more GEMM on the streamed rows only.
    int64_t widest_group = 0;
    for (int64_t g = 0; g < G; ++g) widest_group = std::max(widest_group, group_rows(g));
    const int64_t per_row = fused::row_budget(in, o);
    const int64_t big = std::max<int64_t>((int64_t{256} << 20) / per_row, n / 4);
    int64_t limit = o.chunk_bytes() > 0 ? spec.chunk_rows
                                        : std::max(spec.chunk_rows, std::min(widest_group, big));
    std::vector<std::pair<int64_t, int64_t>> chunks;
    int64_t widest = 0;
    const auto make_chunks = [&] {
      chunks.clear();
      widest = 0;
      for (int64_t g0 = 0; g0 < G;) {
        int64_t g1 = g0, m = 0;
        while (g1 < G && (g1 == g0 || m + group_rows(g1) <= limit)) m += group_rows(g1++);
        chunks.emplace_back(g0, g1);
        widest = std::max(widest, m);
        g0 = g1;
      }
    };
    make_chunks();
    // Automatic, a 16-bit weight with a gradient: more than one GEMM needs the fp32 [V, H]
    // accumulator of dW (4·V·H bytes, read and written by each chunk; the result is cast into
    // its storage), one chunk only the 16-bit dW itself (es·V·H). So one chunk where its
    // logits cost no more than the chunk above plus that difference (in doubles: V·H of an
    // expanded weight may exceed int64).
    const double es = static_cast<double>(c10::elementSize(st));
    if (o.chunk_bytes() == 0 && need_w && st != acc && (chunks.size() > 1 || widest > limit) &&
        static_cast<double>(n - std::min(widest, limit)) * static_cast<double>(per_row) <=
            (4.0 - es) * static_cast<double>(V) * static_cast<double>(H)) {
      limit = std::max<int64_t>(n, 1);
      make_chunks();
    }
    const bool split = widest > limit;
    const bool grad = need_h || need_w || need_b;
    // Without gradients every row streams once: nothing is computed twice, nothing to warn of.
    if (split && grad && o.chunk_bytes() > 0) {
      TORCH_WARN_ONCE(fn, ": a ", groups == Groups::kPairs ? "pair" : "example", " has ", widest,
                      " scored rows, more than the ", limit,
                      " that chunk_bytes = ", o.chunk_bytes(),
                      " allows: the logits of the rows beyond the budget are ",
                      "computed twice (one more GEMM on them); raise chunk_bytes to keep whole ",
                      groups == Groups::kPairs ? "pairs" : "examples");
    }

    RowResults r = alloc_row_results(n, flags, acc_opts);
    // 16-bit weights: dW accumulates in fp32 over the GEMMs (cast in its own storage at the
    // end), unless one GEMM covers the batch (automatic chunking prefers that where cheaper).
    const bool one_gemm = chunks.size() <= 1 && !split;
    if (need_h) dh = at::zeros({h.size(0), H}, h.options());
    std::optional<fused::DwAccumulator> dw_acc;
    if (need_w && !one_gemm && st != acc) {
      dw_acc.emplace(V, H, weight.options().dtype(acc));
    } else if (need_w) {
      dw = at::zeros({V, H}, weight.options());
    }
    if (need_b) db = at::zeros({V}, acc_opts);
    const int64_t c = std::max<int64_t>(std::min(widest, limit), 1);
    const int64_t ld = fused::buffer_stride(V, st, h.device());
    at::Tensor buffer = at::empty({c * ld}, h.options());
    at::Tensor h_buffer = at::empty({c, H}, h.options());
    at::Tensor cap_buffer = grad && spec.softcap > 0 ? at::empty_like(buffer) : at::Tensor();
    // The sums so far: placeholders (a mean log-prob of −1 per scored token) until a
    // sequence's chunk is done.
    at::Tensor cur = counts.neg().to(acc);
    at::Tensor sums64 = at::zeros({S}, acc_opts.dtype(at::kDouble));
    // WPO: Σ (log p − log Σ_v p_v²) per sequence, and exp of its mean over the scored rows as
    // `assemble` forms it (an empty sequence weighs exp(0) = 1, as in TRL).
    at::Tensor wpo64 = apply_wpo ? at::zeros({S}, acc_opts.dtype(at::kDouble)) : at::Tensor();
    const auto wpo_of = [&](const at::Tensor& ids) {
      return (wpo64.index_select(0, ids).to(acc) / counts.index_select(0, ids).clamp_min(1).to(acc))
          .exp();
    };
    if (apply_wpo) wpo = at::ones({S}, acc_opts);

    // Rows `idx` (positions among the scored rows) at the top of the buffers: their logits and
    // per-row statistics, kept with the sums (`record`); or, for rows streamed a second time,
    // the logits only, beside the log-sum-exp kept the first time (all the gradient needs).
    struct Part {
      at::Tensor rows, target, seq, h, z, dydx;
      RowResults out;
    };
    // `for_grad`: the part's gradients follow (the softcap's f'(x) is formed with the logits).
    const auto forward = [&](const at::Tensor& idx, bool record, bool for_grad) {
      Part p;
      const int64_t m = idx.size(0);
      p.rows = flat.index_select(0, idx);
      p.target = rows.target.index_select(0, idx);
      p.seq = rows.seq.index_select(0, idx);
      p.h = h_buffer.narrow(0, 0, m);
      at::index_select_out(p.h, h, 0, p.rows);
      p.z = fused::buffer_rows(buffer, 0, m, V, ld);
      p.dydx = for_grad && cap_buffer.defined() ? fused::buffer_rows(cap_buffer, 0, m, V, ld)
                                                : at::Tensor();
      fused::chunk_logits(p.h, weight, bias, spec, p.z, p.dydx);
      if (!record) {
        p.out.lse = r.lse.index_select(0, idx);
        return p;
      }
      p.out = alloc_row_results(m, flags, acc_opts);
      // The ATen path's fp32 temporaries within the budget (the row kernels need none).
      rows_forward_into(p.z.unsqueeze(0), fused::identity_rows(p.target), flags, spec.backend,
                        spec.chunk_bytes, p.out);
      const std::pair<at::Tensor*, const at::Tensor*> fields[] = {
          {&r.logp, &p.out.logp},
          {&r.lse, &p.out.lse},
          {&r.logit_mean, &p.out.logit_mean},
          {&r.correct, &p.out.correct},
          {&r.entropy, &p.out.entropy},
          {&r.log_sum_p2, &p.out.log_sum_p2}};
      for (const auto& [dst, src] : fields) {
        if (dst->defined() && dst->numel() > 0) dst->index_copy_(0, idx, *src);
      }
      sums64.index_add_(0, p.seq, p.out.logp.to(at::kDouble));
      if (apply_wpo) wpo64.index_add_(0, p.seq, (p.out.logp - p.out.log_sum_p2).to(at::kDouble));
      return p;
    };
    // The gradients of a part whose logits are in the buffer, for dL/d(sums) `g_all` [S].
    const auto backward = [&](Part& p, const at::Tensor& g_all) {
      const auto g_rows = g_all.index_select(0, p.seq);
      fused::logits_grad(p.z, p.target, p.out.lse, g_rows, {}, {}, spec, p.dydx);  // z ← dL/dz
      if (need_b) db.add_(p.z.sum(0, /*keepdim=*/false, acc));
      if (need_w) {
        if (one_gemm) {
          fused::set_mm(dw, p.z, /*trans_a=*/true, p.h);  // 16-bit: fp32 accumulation, once
        } else if (dw_acc) {
          dw_acc->add(0, p.z, p.h);
        } else {
          dw.addmm_(p.z.t(), p.h);
        }
      }
      if (need_h) {
        // Into the gathered hidden rows (no buffer of its own): so only after dW's product.
        fused::set_mm(p.h, p.z, /*trans_a=*/false, weight);  // spans V (CUDA: see .h)
        dh.index_copy_(0, p.rows, p.h);
      }
    };

    for (const auto& [g0, g1] : chunks) {
      auto range = [&](int64_t a, int64_t b) { return at::arange(a, b, long_opts); };
      at::Tensor idx, ids;
      if (groups == Groups::kPairs) {
        idx = at::cat({range(offs[g0], offs[g1]), range(offs[G + g0], offs[G + g1])});
        ids = at::cat({range(g0, g1), range(G + g0, G + g1)});
      } else {
        idx = range(offs[g0], offs[g1]);
        ids = range(g0, g1);
      }
      const int64_t m = idx.size(0);
      if (m == 0) {  // nothing scored: the sums are 0 and nothing reaches a GEMM
        cur.index_fill_(0, ids, 0);
        continue;
      }
      // Statistics: a chunk within the limit keeps all its logits. A split one streams its
      // first m − c rows through the whole buffer, then keeps the last c rows' logits: only
      // m − c rows are computed twice, in GEMMs as tall as the buffer allows (each GEMM reads,
      // and on CPU packs, all of W; each dW update writes all of it). Without grad, all
      // stream.
      const int64_t streamed = grad ? m - std::min(m, c) : m;
      for (int64_t a = 0; a < streamed; a += c)
        (void)forward(idx.narrow(0, a, std::min(c, streamed - a)), true, false);
      if (!grad) continue;
      Part last = forward(idx.narrow(0, streamed, m - streamed), true, true);

      cur.index_copy_(0, ids, sums64.index_select(0, ids).to(acc));
      if (apply_wpo) wpo.index_copy_(0, ids, wpo_of(ids));  // every row of the chunk is in
      const auto g_all = at::zeros({S}, acc_opts).index_copy_(0, ids, seq_grad(cur, ids));
      backward(last, g_all);
      for (int64_t a = 0; a < streamed; a += c) {  // the streamed rows' logits again
        auto p = forward(idx.narrow(0, a, std::min(c, streamed - a)), false, true);
        backward(p, g_all);
      }
    }
    buffer = h_buffer = cap_buffer = at::Tensor();
    if (dw_acc) dw = dw_acc->finish(st);
    if (need_b) db = db.to(bias.scalar_type());
    auto all = assemble(sel, r.logp, r, flags, o.with_token_logps(), acc);
    // The loss's value with the very weights its gradient used (the same sums, in pass order).
    if (apply_wpo) all.wpo_weights = wpo = wpo_of(at::arange(S, long_opts));
    value = finish(all);
  }
};

// The pass runs in forward; backward scales the gradients it produced by the incoming one.
struct OnePassFunction : public torch::autograd::Function<OnePassFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden,
                               const at::Tensor& weight, const at::Tensor& bias, Job* job) {
    (void)weight, (void)bias;
    job->run();
    ctx->saved_data["dh"] = job->dh.defined() ? job->dh.view(hidden.sizes()) : job->dh;
    ctx->saved_data["dw"] = job->dw;
    ctx->saved_data["db"] = job->db;
    ctx->saved_data["fn"] = std::string(job->fn);
    ctx->saved_data["used"] = false;
    job->dh = job->dw = job->db = at::Tensor();  // the graph holds them from here on
    return {job->value};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::string fn = ctx->saved_data["fn"].toStringRef();
    TORCH_CHECK(!ctx->saved_data["used"].toBool(), fn,
                ": a second backward through the same loss (retain_graph); the one-pass op ",
                "computes its gradients in the forward pass and hands them over once, so ",
                "compute the loss again");
    TORCH_CHECK(!at::GradMode::is_enabled(), fn,
                ": double backward (create_graph) is not supported: the gradients were computed ",
                "in the forward pass; use fused_logprobs and the loss (two passes)");
    ctx->saved_data["used"] = true;
    const auto& g = grads[0];
    // The incoming gradient as a scalar: the scaling runs in fp32 and rounds 16-bit gradients
    // once (a 16-bit copy of e.g. 1/3 would bias them); exactly 1, the usual case, costs nothing.
    const double scale = g.defined() ? g.item<double>() : 0.0;
    auto take = [&](const char* name) {
      at::Tensor t = ctx->saved_data[name].toTensor();
      ctx->saved_data[name] = at::Tensor();  // backward runs once: free as soon as handed over
      if (!t.defined() || !g.defined()) return at::Tensor();
      if (scale == 1.0) return t;
      if (t.element_size() >= 4) return t.mul_(scale);
      // 16-bit: in fp32 (libtorch 1.x would round the scalar to 16 bits first), 8 MiB of
      // fp32 at a time.
      auto flat = t.view({-1});
      const int64_t step = int64_t{2} << 20;
      for (int64_t i = 0; i < flat.numel(); i += step) {
        auto part = flat.narrow(0, i, std::min(step, flat.numel() - i));
        part.copy_(part.to(at::kFloat).mul_(scale));
      }
      return t;
    };
    return {take("dh"), take("dw"), take("db"), at::Tensor()};
  }
};

/// The sequences `idx` of `all` (KTO's desirable or undesirable examples). Packed token
/// layouts are kept whole, as `functional::split_pairs` keeps them.
PREFOPT_INLINE SequenceLogprobs select_sequences(const SequenceLogprobs& all,
                                                 const at::Tensor& idx) {
  const auto pick = [&](const at::Tensor& x) { return x.defined() ? x.index_select(0, idx) : x; };
  SequenceLogprobs s;
  s.sum = pick(all.sum);
  s.count = pick(all.count);
  s.mean = pick(all.mean);
  const bool padded = all.token_logps.defined() && all.token_logps.dim() == 2;
  s.token_logps = padded ? pick(all.token_logps) : all.token_logps;
  s.token_mask = padded ? pick(all.token_mask) : all.token_mask;
  s.logits_sum = pick(all.logits_sum);
  s.logits_sum_all = pick(all.logits_sum_all);
  s.positions = pick(all.positions);
  s.correct = pick(all.correct);
  s.entropy_sum = pick(all.entropy_sum);
  s.wpo_weights = pick(all.wpo_weights);
  return s;
}

/// Checks shared by every fused loss, and the batch's selection.
struct Prepared {
  HeadInputs in;
  Selection sel;
};

PREFOPT_INLINE Prepared prepare(const char* fn, const HeadBatch& b, const FusedLogprobsOptions& o) {
  const char* blocking[] = {"kAuto", "kTokenChunks", "kVocabBlocks", "kTiles"};
  detail::check_enum(fn, "backward", "a FusedBackward", o.backward(), FusedBackward::kTiles);
  TORCH_CHECK(o.backward() == FusedBackward::kAuto, fn,
              ": expected FusedBackward::kAuto (the one-pass op has no separate backward pass ",
              "to block; the option applies to fused_logprobs), got FusedBackward::",
              blocking[static_cast<int>(o.backward())]);
  const bool packed = b.cu_seqlens().defined();
  const auto in =
      fused::check_head(fn, b.hidden(), b.weight(), b.bias(), packed, FusedLogprobsOptions(o));
  TORCH_CHECK(b.labels().defined(), fn,
              ": expected labels (or input ids), got an undefined tensor");
  const at::Tensor* mask = b.completion_mask().defined() ? &b.completion_mask() : nullptr;
  Prepared p{in, {}};
  if (packed) {
    p.sel = select_packed(fn, in.hidden, "hidden states", in.hidden.size(1), in.V, b.labels(), mask,
                          b.cu_seqlens(), o.shift(), o.ignore_index());
  } else {
    p.sel = select_padded(fn, b.hidden(), "hidden states", b.hidden().size(0), b.hidden().size(1),
                          in.V, b.labels(), mask, o.shift(), o.ignore_index());
  }
  return p;
}

/// Runs `job` with autograd when anything needs a gradient, else the forward part alone.
/// Returns the loss, differentiable when the pass produced gradients.
PREFOPT_INLINE at::Tensor launch(Job& job, const HeadBatch& b) {
  const bool grad_mode = at::GradMode::is_enabled();
  job.need_h = grad_mode && b.hidden().requires_grad();
  job.need_w = grad_mode && b.weight().requires_grad();
  job.need_b = grad_mode && b.bias().defined() && b.bias().requires_grad();
  job.weight = b.weight();
  job.bias = b.bias();
  if (!(job.need_h || job.need_w || job.need_b)) {
    c10::NoGradGuard no_grad;
    job.run();
    return job.value;
  }
  // Autograd inputs must be defined: a [0] placeholder stands for a missing bias.
  const auto bias = b.bias().defined() ? b.bias() : at::empty({0}, b.weight().options());
  return OnePassFunction::apply(b.hidden(), b.weight(), bias, &job)[0];
}

/// The pairwise sums → the loss's log-probs in `form` (sums, or means over the counts).
PREFOPT_INLINE at::Tensor in_form(const at::Tensor& sums, const at::Tensor& counts,
                                  LogpsForm form) {
  return form == LogpsForm::kMean ? sums / counts.clamp_min(1).to(sums.scalar_type()) : sums;
}

/// The chosen/rejected halves of [S] per-sequence results.
PREFOPT_INLINE std::pair<at::Tensor, at::Tensor> halves(const at::Tensor& x) {
  const int64_t B = x.size(0) / 2;
  return {x.narrow(0, 0, B), x.narrow(0, B, B)};
}

PREFOPT_INLINE void check_even(const char* fn, const Selection& sel) {
  TORCH_CHECK(sel.S % 2 == 0, fn, ": expected an even number of sequences [chosen..., ",
              "rejected...], got ", sel.S);
}

PREFOPT_INLINE void refuse_none(const char* fn, const LossReduction& r) {
  TORCH_CHECK(!std::holds_alternative<torch::enumtype::kNone>(r), fn,
              ": the one-pass op differentiates a scalar loss; reduction torch::kNone leaves ",
              "the reduction to the host, so use fused_logprobs and the loss (two passes)");
}

/// A pairwise loss in one pass: `call(inputs)` evaluates the loss (its `.loss` is used).
/// `apply_wpo`: the pass's WPO pair weights w_c·w_r become the inputs' `weights`.
template <typename Result, typename Call>
FusedLossOutput<Result, PairInputs> pairwise(const char* fn, const HeadBatch& b,
                                             const PairInputs& given, const FusedLogprobsOptions& o,
                                             const Call& call, bool apply_wpo = false) {
  TORCH_CHECK(!given.policy_chosen_logps().defined() && !given.policy_rejected_logps().defined(),
              fn, ": the policy log-probs come from the pass; got policy_*_logps in the inputs");
  TORCH_CHECK(!given.chosen_lengths().defined() && !given.rejected_lengths().defined(), fn,
              ": the lengths come from the pass; got chosen_lengths or rejected_lengths in the ",
              "inputs");
  TORCH_CHECK(!given.nll_loss().defined(), fn,
              ": the one-pass op computes the NLL from the chosen completions; an explicit ",
              "nll_loss needs fused_logprobs and the loss (two passes)");
  auto prep = prepare(fn, b, o);
  check_even(fn, prep.sel);
  const bool has_ref =
      given.reference_chosen_logps().defined() || given.reference_rejected_logps().defined();
  const LogpsForm form =
      has_ref && given.logps_form() == LogpsForm::kMean ? LogpsForm::kMean : LogpsForm::kSum;
  const auto acc = acc_type(prep.in.hidden.scalar_type());
  const auto counts = at::zeros({prep.sel.S}, prep.sel.rows.seq.options())
                          .index_add_(0, prep.sel.rows.seq, at::ones_like(prep.sel.rows.seq));
  // Not a structured binding: C++17 lambdas cannot capture those (clang rejects it).
  const auto count_halves = halves(counts);
  const at::Tensor& nc = count_halves.first;
  const at::Tensor& nr = count_halves.second;
  auto base = given;
  if (base.weights().defined()) base.weights(base.weights().detach());
  base.chosen_lengths(nc).rejected_lengths(nr).logps_form(form);
  // `wpo`: the sequences' WPO weights [S], or undefined.
  const auto with_sums = [&](const at::Tensor& sums, const at::Tensor& wpo) {
    const auto [c, r] = halves(sums);
    auto in = base;
    if (wpo.defined()) {
      const auto [wc, wr] = halves(wpo);
      in.weights(wc * wr);
    }
    return in.policy_chosen_logps(in_form(c, nc, form)).policy_rejected_logps(in_form(r, nr, form));
  };
  // Everything the loss checks (options, shapes of the reference and weights) fails here,
  // before the pass: on placeholder sums of a mean log-prob of −1 per token.
  {
    c10::NoGradGuard no_grad;
    const auto placeholder = counts.neg().to(acc);
    (void)call(with_sums(placeholder, apply_wpo ? at::ones_like(placeholder) : at::Tensor()));
  }
  // As the two-pass losses: a reference of unsaid form is taken as sums, with a warning.
  if (has_ref && given.logps_form() == LogpsForm::kUnspecified) {
    const char* name = std::strrchr(fn, ':');
    warn_unsaid_form(fn, name != nullptr ? name + 1 : fn, LogpsForm::kSum);
  }
  FusedLossOutput<Result, PairInputs> out;
  Job job;
  job.fn = fn;
  job.in = prep.in;
  job.sel = prep.sel;
  job.o = o;
  job.groups = Groups::kPairs;
  job.apply_wpo = apply_wpo;
  job.loss = [&](const at::Tensor& sums, const at::Tensor& wpo) {
    return call(with_sums(sums, wpo)).loss;
  };
  job.finish = [&](const SequenceLogprobs& all) {
    c10::NoGradGuard no_grad;
    out.policy = functional::split_pairs(all);
    out.inputs = with_sums(all.sum, apply_wpo ? all.wpo_weights : at::Tensor());
    out.result = call(out.inputs);
    return out.result.loss;
  };
  out.result.loss = launch(job, b);
  return out;
}

}  // namespace fused_loss
}  // namespace detail

namespace functional {

PREFOPT_INLINE FusedDPOOutput fused_dpo_loss(const HeadBatch& batch, const PairInputs& inputs,
                                             const DPOLossOptions& loss,
                                             const FusedLogprobsOptions& options) {
  constexpr const char* fn = "prefopt::fused_dpo_loss";
  for (DPOLossType t : loss.loss_type()) {
    TORCH_CHECK(t != DPOLossType::kAOT && t != DPOLossType::kAOTUnpaired, fn, ": ",
                dpo_loss_type_name(t), " sorts the log-ratios over the batch, so a pair's ",
                "gradient depends on every other pair; use fused_logprobs and dpo_loss ",
                "(two passes)");
  }
  TORCH_CHECK(!loss.bco_running_mean(), fn,
              ": bco_running_mean's baseline folds in the whole batch's rewards before the ",
              "loss; use fused_logprobs and the DPOLoss functor (two passes)");
  detail::fused_loss::refuse_none(fn, loss.reduction());
  const bool wpo = options.with_wpo_weights();
  // The pass's WPO weights replace `weights`: both at once would weight every pair twice (the
  // earlier recipe passed w_c·w_r from a first pass).
  TORCH_CHECK(!(wpo && inputs.weights().defined()), fn,
              ": with_wpo_weights weights each pair by the pass's WPO weights w_c·w_r; got ",
              "inputs.weights too (they would multiply): pass one of the two");
  // A token-mean NLL is one term of the whole batch: weighted per pair, its gradient at every
  // chosen token scales with the mean of all pairs' weights, known only after the last chunk.
  bool sft = false;
  for (DPOLossType t : loss.loss_type()) sft = sft || t == DPOLossType::kSFT;
  TORCH_CHECK(!(wpo && (sft || loss.rpo_alpha() != 0) &&
                loss.nll_normalization() == NLLNormalization::kTokenMean),
              fn, ": with_wpo_weights and a token-mean NLL term (", sft ? "sft" : "rpo_alpha",
              "): the weighted NLL's gradient at every chosen token needs the mean of all pairs' ",
              "WPO weights, known only after the last chunk; use NLLNormalization::kSequenceMean ",
              "(a per-pair NLL), or fused_logprobs + wpo_pair_weights + dpo_loss (two passes)");
  return detail::fused_loss::pairwise<DPOLossResult>(
      fn, batch, inputs, options, [&](const PairInputs& in) { return dpo_loss(in, loss); }, wpo);
}

PREFOPT_INLINE FusedCPOOutput fused_cpo_loss(const HeadBatch& batch, const CPOLossOptions& loss,
                                             const FusedLogprobsOptions& options) {
  constexpr const char* fn = "prefopt::fused_cpo_loss";
  detail::fused_loss::refuse_none(fn, loss.reduction());
  return detail::fused_loss::pairwise<CPOLossResult>(
      fn, batch, PairInputs(), options, [&](const PairInputs& in) { return cpo_loss(in, loss); });
}

PREFOPT_INLINE FusedCPOOutput fused_simpo_loss(const HeadBatch& batch, const SimPOLossOptions& loss,
                                               const FusedLogprobsOptions& options) {
  constexpr const char* fn = "prefopt::fused_simpo_loss";
  detail::fused_loss::refuse_none(fn, loss.reduction());
  return detail::fused_loss::pairwise<CPOLossResult>(
      fn, batch, PairInputs(), options, [&](const PairInputs& in) { return simpo_loss(in, loss); });
}

PREFOPT_INLINE FusedORPOOutput fused_orpo_loss(const HeadBatch& batch, const ORPOLossOptions& loss,
                                               const FusedLogprobsOptions& options) {
  constexpr const char* fn = "prefopt::fused_orpo_loss";
  detail::fused_loss::refuse_none(fn, loss.reduction());
  return detail::fused_loss::pairwise<ORPOLossResult>(
      fn, batch, PairInputs(), options, [&](const PairInputs& in) { return orpo_loss(in, loss); });
}

PREFOPT_INLINE FusedKTOOutput fused_kto_loss(const HeadBatch& batch, const FusedKTOInputs& inputs,
                                             const KTOLossOptions& loss,
                                             const FusedLogprobsOptions& options) {
  namespace fl = detail::fused_loss;
  constexpr const char* fn = "prefopt::fused_kto_loss";
  fl::refuse_none(fn, loss.reduction());
  auto prep = fl::prepare(fn, batch, options);
  const int64_t S = prep.sel.S;
  const auto dev = prep.in.hidden.device();
  const auto& d = inputs.desirable();
  TORCH_CHECK(d.defined(), fn, ": expected desirable flags [", S, "], got an undefined tensor");
  TORCH_CHECK(d.dim() == 1 && d.size(0) == S, fn, ": expected desirable of shape [", S,
              "] (one flag per example), got ", d.sizes());
  TORCH_CHECK(d.scalar_type() == at::kBool ||
                  (!at::isFloatingType(d.scalar_type()) && !at::isComplexType(d.scalar_type())),
              fn, ": expected desirable flags of dtype bool (or an integer 0/1), got ",
              d.scalar_type());
  TORCH_CHECK(d.scalar_type() == at::kBool || d.eq(0).logical_or(d.eq(1)).all().item<bool>(), fn,
              ": expected desirable flags of 0 or 1, got other values");
  TORCH_CHECK(d.device() == dev, fn, ": expected desirable on ", dev,
              " like the hidden states, got ", d.device());
  const auto& ref = inputs.reference_logps();
  TORCH_CHECK(ref.defined(), fn, ": expected reference_logps [", S, "], got an undefined tensor");
  detail::check_logps(fn, "reference_logps", ref, S, dev);
  TORCH_CHECK(at::isFloatingType(ref.scalar_type()), fn,
              ": expected reference_logps to be floating point, got ", ref.scalar_type());
  const auto flags = d.to(at::kBool);
  const auto d_idx = flags.nonzero().flatten();
  const auto u_idx = flags.logical_not().nonzero().flatten();
  const auto acc = detail::acc_type(prep.in.hidden.scalar_type());
  const auto ref_d = ref.detach();
  auto with_sums = [&](const at::Tensor& sums) {
    auto in = KTOInputs()
                  .policy_chosen_logps(sums.index_select(0, d_idx))
                  .policy_rejected_logps(sums.index_select(0, u_idx))
                  .reference_chosen_logps(ref_d.index_select(0, d_idx))
                  .reference_rejected_logps(ref_d.index_select(0, u_idx));
    if (inputs.kl().defined()) in.kl(inputs.kl().detach());
    if (inputs.policy_KL_logps().defined()) in.policy_KL_logps(inputs.policy_KL_logps().detach());
    if (inputs.reference_KL_logps().defined())
      in.reference_KL_logps(inputs.reference_KL_logps().detach());
    return in;
  };
  const auto counts = at::zeros({S}, prep.sel.rows.seq.options())
                          .index_add_(0, prep.sel.rows.seq, at::ones_like(prep.sel.rows.seq));
  {
    c10::NoGradGuard no_grad;
    (void)kto_loss(with_sums(counts.neg().to(acc)), loss);
  }
  FusedKTOOutput out;
  fl::Job job;
  job.fn = fn;
  job.in = prep.in;
  job.sel = prep.sel;
  job.o = options;
  job.groups = fl::Groups::kSingles;
  job.loss = [&](const at::Tensor& sums, const at::Tensor&) {
    return kto_loss(with_sums(sums), loss).loss;
  };
  job.finish = [&](const SequenceLogprobs& all) {
    c10::NoGradGuard no_grad;
    out.policy.chosen = fl::select_sequences(all, d_idx);
    out.policy.rejected = fl::select_sequences(all, u_idx);
    out.inputs = with_sums(all.sum);
    out.result = kto_loss(out.inputs, loss);
    return out.result.loss;
  };
  out.result.loss = fl::launch(job, batch);
  return out;
}

}  // namespace functional
PREFOPT_END_NAMESPACE
