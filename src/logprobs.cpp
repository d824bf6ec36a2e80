// SPDX-License-Identifier: Apache-2.0
// Log-prob gathering: input checks, scored-row selection, the custom autograd function, and
// the two implementations (CPU row kernels, chunked ATen).
#include <prefopt/logprobs.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/row_kernels.h"

PREFOPT_BEGIN_NAMESPACE
namespace detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace kc = prefopt::detail::cpu;

// ------------------------------------------------------------------------------------------
// Scored rows: every token that gets a log-prob, flattened.

struct Rows {
  at::Tensor b, t;    ///< [n] int64: the logits row is logits[b, t]
  at::Tensor target;  ///< [n] int64: the label it scores
  at::Tensor seq;     ///< [n] int64: the sequence it belongs to
};

struct RowResults {
  at::Tensor logp, lse, logit_mean, correct, entropy, log_sum_p2;  // [n] each (or empty)
};

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool use_kernel(const at::Tensor& logits, GatherBackend backend) {
  const bool cpu_ok = logits.device().is_cpu() && logits.stride(-1) == 1;
  switch (backend) {
    case GatherBackend::kKernel:
      TORCH_CHECK(logits.device().is_cpu(),
                  "prefopt::gather_logprobs: backend kKernel needs CPU logits, got ",
                  logits.device());
      return cpu_ok;  // a strided vocabulary dimension goes through the chunked copy path
    case GatherBackend::kATen:
      return false;
    default:
      return cpu_ok;
  }
}

int64_t rows_per_chunk(const at::Tensor& logits, int64_t chunk_bytes) {
  const int64_t V = logits.size(-1);
  // The row copy in its own dtype plus two temporaries in the accumulation dtype.
  const int64_t per_row = V * (logits.element_size() + 2 * at::elementSize(acc_type(logits)));
  return std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(per_row, 1));
}

template <typename F>
void for_each_chunk(int64_t n, int64_t chunk, F&& f) {
  for (int64_t s = 0; s < n; s += chunk) f(s, std::min(n, s + chunk));
}

// ---- CPU row kernels ----

template <typename S>
struct Storage {
  using type = S;
};
template <>
struct Storage<at::BFloat16> {
  using type = kc::bf16;
};
template <>
struct Storage<at::Half> {
  using type = kc::f16;
};

template <typename S>
void kernel_forward(const at::Tensor& logits, const Rows& rows, unsigned flags, RowResults& r) {
  using T = typename Storage<S>::type;
  using A = kc::acc_t<T>;
  const T* base = reinterpret_cast<const T*>(logits.data_ptr<S>());
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), V = logits.size(2);
  const int64_t n = rows.b.numel();
  const int64_t *b = rows.b.data_ptr<int64_t>(), *t = rows.t.data_ptr<int64_t>(),
                *tg = rows.target.data_ptr<int64_t>();
  A* logp = r.logp.data_ptr<A>();
  A* lse = r.lse.data_ptr<A>();
  A* lm = (flags & kc::kLogitSum) ? r.logit_mean.data_ptr<A>() : nullptr;
  int64_t* ok = (flags & kc::kArgmax) ? r.correct.data_ptr<int64_t>() : nullptr;
  A* ent = (flags & kc::kEntropy) ? r.entropy.data_ptr<A>() : nullptr;
  A* p2 = (flags & kc::kLogSumP2) ? r.log_sum_p2.data_ptr<A>() : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto st = kc::row_stats<T>(base + b[i] * s0 + t[i] * s1, V, tg[i], flags);
      lse[i] = st.lse;
      logp[i] = st.target - st.lse;
      if (lm) lm[i] = st.logit_sum / static_cast<A>(V);
      if (ok) ok[i] = st.argmax == tg[i];
      if (ent) ent[i] = st.entropy;
      if (p2) p2[i] = st.log_sum_p2;
    }
  });
}

/// Writes every row of `grad` (allocated uninitialised): the row gradient where a scored row
/// has a non-zero upstream gradient, zeros elsewhere. One parallel pass, no separate memset.
template <typename S>
void kernel_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse_t,
                     const at::Tensor& g_t, at::Tensor& grad) {
  using T = typename Storage<S>::type;
  using A = kc::acc_t<T>;
  const T* base = reinterpret_cast<const T*>(logits.data_ptr<S>());
  T* out = reinterpret_cast<T*>(grad.data_ptr<S>());
  const int64_t B = logits.size(0), Tn = logits.size(1), V = logits.size(2);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const int64_t o0 = grad.stride(0), o1 = grad.stride(1);
  const int64_t *b = rows.b.data_ptr<int64_t>(), *t = rows.t.data_ptr<int64_t>(),
                *tg = rows.target.data_ptr<int64_t>();
  const A* lse = lse_t.data_ptr<A>();
  const A* g = g_t.data_ptr<A>();
  std::vector<int64_t> row_of(static_cast<size_t>(B * Tn), -1);  // logits row -> scored row
  for (int64_t i = 0, n = rows.b.numel(); i < n; ++i) row_of[b[i] * Tn + t[i]] = i;
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* dst = out + (r / Tn) * o0 + (r % Tn) * o1;
      const int64_t i = row_of[r];
      if (i >= 0 && g[i] != A(0)) {
        kc::row_grad<T>(base + b[i] * s0 + t[i] * s1, V, tg[i], lse[i], g[i], dst);
      } else {
        std::memset(static_cast<void*>(dst), 0, sizeof(T) * V);  // all-zero bits are +0 in every T
      }
    }
  });
}

#define PREFOPT_DISPATCH_LOGITS(logits, NAME, ...)                                      \
  switch ((logits).scalar_type()) {                                                     \
    case at::kFloat: NAME<float>(__VA_ARGS__); break;                                   \
    case at::kDouble: NAME<double>(__VA_ARGS__); break;                                 \
    case at::kBFloat16: NAME<at::BFloat16>(__VA_ARGS__); break;                         \
    case at::kHalf: NAME<at::Half>(__VA_ARGS__); break;                                 \
    default: TORCH_INTERNAL_ASSERT(false, "unchecked logits dtype ", (logits).scalar_type()); \
  }

// ---- chunked ATen path (any device) ----

void aten_forward(const at::Tensor& logits, const Rows& rows, unsigned flags, int64_t chunk_bytes,
                  RowResults& r) {
  const int64_t V = logits.size(2);
  const auto acc = acc_type(logits);
  for_each_chunk(rows.b.numel(), rows_per_chunk(logits, chunk_bytes), [&](int64_t s, int64_t e) {
    const auto tg = rows.target.slice(0, s, e);
    const auto z = logits.index({rows.b.slice(0, s, e), rows.t.slice(0, s, e)}).to(acc);
    const auto m = std::get<0>(z.max(1, /*keepdim=*/true));
    const auto x = z - m;
    const auto ex = x.exp();
    const auto log_s = ex.sum(1).log();
    const auto lse = m.squeeze(1) + log_s;
    r.lse.slice(0, s, e).copy_(lse);
    r.logp.slice(0, s, e).copy_(z.gather(1, tg.unsqueeze(1)).squeeze(1) - lse);
    if (flags & kc::kLogitSum) r.logit_mean.slice(0, s, e).copy_(z.sum(1) / static_cast<double>(V));
    if (flags & kc::kArgmax) r.correct.slice(0, s, e).copy_(z.argmax(1) == tg);
    if (flags & kc::kEntropy)  // clamp: 0·(−inf) would be NaN where a logit is −inf
      r.entropy.slice(0, s, e).copy_(log_s - (ex * x.clamp_min(-1e30)).sum(1) / log_s.exp());
    if (flags & kc::kLogSumP2) r.log_sum_p2.slice(0, s, e).copy_((ex * ex).sum(1).log() - 2 * log_s);
  });
}

void aten_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse,
                   const at::Tensor& g, int64_t chunk_bytes, at::Tensor& grad) {
  const auto acc = acc_type(logits);
  for_each_chunk(rows.b.numel(), rows_per_chunk(logits, chunk_bytes), [&](int64_t s, int64_t e) {
    const auto bi = rows.b.slice(0, s, e), ti = rows.t.slice(0, s, e);
    const auto gs = g.slice(0, s, e).unsqueeze(1);
    auto dz = (logits.index({bi, ti}).to(acc) - lse.slice(0, s, e).unsqueeze(1)).exp_().mul_(-gs);
    dz.scatter_add_(1, rows.target.slice(0, s, e).unsqueeze(1), gs);
    grad.index_put_({bi, ti}, dz.to(logits.scalar_type()));
  });
}

RowResults rows_forward(const at::Tensor& logits, const Rows& rows, unsigned flags,
                        const GatherLogprobsOptions& o) {
  const int64_t n = rows.b.numel();
  const auto f = logits.options().dtype(acc_type(logits));
  const auto empty = at::empty({0}, f);
  RowResults r;
  r.logp = at::empty({n}, f);
  r.lse = at::empty({n}, f);
  r.logit_mean = (flags & kc::kLogitSum) ? at::empty({n}, f) : empty;
  r.correct = (flags & kc::kArgmax) ? at::empty({n}, f.dtype(at::kLong)) : empty;
  r.entropy = (flags & kc::kEntropy) ? at::empty({n}, f) : empty;
  r.log_sum_p2 = (flags & kc::kLogSumP2) ? at::empty({n}, f) : empty;
  if (n == 0) return r;
  if (use_kernel(logits, o.backend())) {
    PREFOPT_DISPATCH_LOGITS(logits, kernel_forward, logits, rows, flags, r)
  } else {
    aten_forward(logits, rows, flags, o.chunk_bytes(), r);
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// The autograd function: saves the logits (an input, so no copy) and the per-row lse only.

struct TokenLogpsFunction : public torch::autograd::Function<TokenLogpsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& b,
                               const at::Tensor& t, const at::Tensor& target, int64_t flags,
                               int64_t chunk_bytes, int64_t backend) {
    const auto o = GatherLogprobsOptions()
                       .chunk_bytes(chunk_bytes)
                       .backend(static_cast<GatherBackend>(backend));
    RowResults r = rows_forward(logits, Rows{b, t, target, {}}, static_cast<unsigned>(flags), o);
    ctx->save_for_backward({logits, b, t, target, r.lse});
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    ctx->saved_data["backend"] = backend;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({r.logit_mean, r.correct, r.entropy, r.log_sum_p2});
    return {r.logp, r.logit_mean, r.correct, r.entropy, r.log_sum_p2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    at::Tensor grad;
    if (grads[0].defined()) {
      const Rows rows{saved[1], saved[2], saved[3], {}};
      const auto g = grads[0].to(saved[4].scalar_type()).contiguous();
      grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
      if (grad.is_cpu()) kc::advise_huge_pages(grad.data_ptr(), grad.nbytes());
      const auto backend = static_cast<GatherBackend>(ctx->saved_data["backend"].toInt());
      if (use_kernel(logits, backend)) {
        PREFOPT_DISPATCH_LOGITS(logits, kernel_backward, logits, rows, saved[4], g, grad)
      } else {
        grad.zero_();
        aten_backward(logits, rows, saved[4], g, ctx->saved_data["chunk_bytes"].toInt(), grad);
      }
    }
    return {grad, {}, {}, {}, {}, {}, {}};
  }
};

// ------------------------------------------------------------------------------------------
// Input checks. Messages name the public function and state what was expected and given.

void check_logits(const char* fn, const at::Tensor& logits, int64_t dim) {
  TORCH_CHECK(logits.defined(), fn, ": expected logits, got an undefined tensor");
  TORCH_CHECK(logits.dim() == dim, fn, ": expected logits of rank ", dim,
              dim == 3 ? " [B, T, V]" : " [N, V]", ", got shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, fn,
              ": expected floating logits (float64, float32, bfloat16 or float16), got ", st);
  TORCH_CHECK(logits.size(-1) > 0, fn, ": expected a vocabulary of at least 1 entry, got V = 0");
}

at::Tensor check_labels(const char* fn, const at::Tensor& labels, const char* what,
                        at::IntArrayRef expected, const at::Tensor& logits) {
  TORCH_CHECK(labels.defined(), fn, ": expected ", what, ", got an undefined tensor");
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()) &&
                  labels.scalar_type() != at::kBool,
              fn, ": expected integer ", what, " (int64 or int32), got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == expected, fn, ": expected ", what, " of shape ", expected,
              " to match the logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), fn, ": expected ", what, " on ", logits.device(),
              " like the logits, got ", labels.device());
  return labels.to(at::kLong);
}

at::Tensor check_mask(const char* fn, const at::Tensor& mask, at::IntArrayRef expected,
                      const at::Tensor& logits) {
  TORCH_CHECK(mask.defined(), fn, ": expected completion_mask, got an undefined tensor");
  TORCH_CHECK(!at::isFloatingType(mask.scalar_type()), fn,
              ": expected completion_mask of bool or integer 0/1 values, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == expected, fn, ": expected completion_mask of shape ", expected,
              " to match the logits ", logits.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == logits.device(), fn, ": expected completion_mask on ",
              logits.device(), " like the logits, got ", mask.device());
  return mask.to(at::kBool);
}

/// Scored labels must index the vocabulary. One reduction and, on error only, a readable report.
void check_targets(const char* fn, const at::Tensor& targets, const at::Tensor& scored, int64_t V,
                   bool has_ignore, int64_t ignore_index) {
  const auto bad = scored & ((targets < 0) | (targets >= V));
  if (!bad.any().item<bool>()) return;
  const auto where = bad.nonzero()[0].cpu();
  const auto value = targets.index({bad}).cpu()[0].item<int64_t>();
  std::string pos;
  for (int64_t i = 0; i < where.numel(); ++i)
    pos += (i ? ", " : "") + std::to_string(where[i].item<int64_t>());
  if (has_ignore) {
    TORCH_CHECK(false, fn, ": expected labels in [0, ", V, ") or equal to ignore_index = ",
                ignore_index, ", got ", value, " at scored position (", pos, ")");
  } else {
    TORCH_CHECK(false, fn, ": expected labels in [0, ", V,
                ") wherever completion_mask is set, got ", value, " at position (", pos, ")");
  }
}

unsigned stat_flags(const GatherLogprobsOptions& o) {
  return (o.with_logits_mean() ? kc::kLogitSum : 0u) |
         (o.with_token_accuracy() ? kc::kArgmax : 0u) | (o.with_entropy() ? kc::kEntropy : 0u) |
         (o.with_wpo_weights() ? kc::kLogSumP2 : 0u);
}

// ------------------------------------------------------------------------------------------
// From rows to per-sequence results.

/// Per-row vocabulary means of every row of logits [B, T, V] → [B, T], in the acc dtype.
at::Tensor all_row_means(const at::Tensor& logits, const GatherLogprobsOptions& o) {
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  if (use_kernel(logits, o.backend())) {
    auto out = at::empty({B, T}, logits.options().dtype(acc_type(logits)));
    auto run = [&](auto tag) {
      using S = decltype(tag);
      using TT = typename Storage<S>::type;
      using A = kc::acc_t<TT>;
      const TT* base = reinterpret_cast<const TT*>(logits.data_ptr<S>());
      A* dst = out.data_ptr<A>();
      const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
      at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          dst[i] = kc::row_sum<TT>(base + (i / T) * s0 + (i % T) * s1, V) / static_cast<A>(V);
      });
    };
    switch (logits.scalar_type()) {
      case at::kFloat: run(float{}); break;
      case at::kDouble: run(double{}); break;
      case at::kBFloat16: run(at::BFloat16{}); break;
      default: run(at::Half{}); break;
    }
    return out;
  }
  auto flat = at::empty({B * T}, logits.options().dtype(acc_type(logits)));
  const auto idx = at::arange(B * T, logits.options().dtype(at::kLong));
  for_each_chunk(B * T, rows_per_chunk(logits, o.chunk_bytes()), [&](int64_t s, int64_t e) {
    const auto i = idx.slice(0, s, e);
    flat.slice(0, s, e).copy_(
        logits.index({i.div(T, "floor"), i.remainder(T)}).to(acc_type(logits)).mean(1));
  });
  return flat.view({B, T});
}

SequenceLogprobs reduce(const at::Tensor& logits, const Rows& rows, int64_t S,
                        const at::Tensor& scored, const GatherLogprobsOptions& o) {
  const unsigned flags = stat_flags(o);
  const auto acc = acc_type(logits);
  variable_list out;
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    out = TokenLogpsFunction::apply(logits, rows.b, rows.t, rows.target,
                                    static_cast<int64_t>(flags), o.chunk_bytes(),
                                    static_cast<int64_t>(o.backend()));
  } else {  // no graph, nothing saved (reference models, evaluation)
    at::NoGradGuard no_grad;
    RowResults r = rows_forward(logits, rows, flags, o);
    out = {r.logp, r.logit_mean, r.correct, r.entropy, r.log_sum_p2};
  }
  const at::Tensor& logp = out[0];
  const auto fo = logits.options().dtype(acc);
  auto seq_sum = [&](const at::Tensor& v) {  // fp64 accumulation, returned in the acc dtype
    return at::zeros({S}, fo.dtype(at::kDouble)).index_add(0, rows.seq, v.to(at::kDouble)).to(acc);
  };

  SequenceLogprobs res;
  res.sum = seq_sum(logp);
  res.count = at::zeros({S}, fo.dtype(at::kLong)).index_add_(0, rows.seq, at::ones_like(rows.seq));
  const auto denom = res.count.clamp_min(1).to(acc);
  res.mean = res.sum / denom;
  if (o.with_token_logps()) {
    res.token_logps = at::zeros(scored.sizes(), fo);
    if (scored.dim() == 2) {
      res.token_logps = res.token_logps.index_put({rows.b, rows.t}, logp);
    } else {
      res.token_logps = res.token_logps.index_put({rows.t}, logp);
    }
    res.token_mask = scored;
  }
  if (flags & kc::kLogitSum) res.logits_sum = seq_sum(out[1]);
  if (flags & kc::kArgmax)
    res.correct = at::zeros({S}, fo.dtype(at::kLong)).index_add_(0, rows.seq, out[2]);
  if (flags & kc::kEntropy) res.entropy_sum = seq_sum(out[3]);
  if (flags & kc::kLogSumP2) res.wpo_weights = (seq_sum(logp.detach() - out[4]) / denom).exp();
  return res;
}

Rows padded_rows(const at::Tensor& targets, const at::Tensor& scored) {
  const auto idx = scored.nonzero();
  Rows rows;
  rows.b = idx.select(1, 0).contiguous();
  rows.t = idx.select(1, 1).contiguous();
  rows.target = targets.index({rows.b, rows.t}).contiguous();
  rows.seq = rows.b;
  return rows;
}

SequenceLogprobs gather_padded(const char* fn, const at::Tensor& logits, const at::Tensor& labels_in,
                               const at::Tensor* mask_in, const GatherLogprobsOptions& o) {
  check_logits(fn, logits, 3);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto labels = check_labels(fn, labels_in, mask_in ? "input_ids" : "labels", {B, T}, logits);
  const int64_t k = (o.shift() && T > 0) ? 1 : 0;  // positions t score labels at t + k
  const auto targets = labels.slice(1, k);
  at::Tensor scored = mask_in ? check_mask(fn, *mask_in, {B, T}, logits).slice(1, k)
                              : targets != o.ignore_index();
  check_targets(fn, targets, scored, V, mask_in == nullptr, o.ignore_index());
  SequenceLogprobs res = reduce(logits, padded_rows(targets, scored), B, scored, o);
  if (o.with_logits_mean_unmasked()) {
    at::NoGradGuard no_grad;
    res.logits_sum_all = all_row_means(logits, o).sum(1);
    res.positions = at::full({B}, T, logits.options().dtype(at::kLong));
  }
  return res;
}

SequenceLogprobs gather_packed(const char* fn, const at::Tensor& logits_in, const at::Tensor& labels_in,
                               const at::Tensor* mask_in, const at::Tensor& cu_seqlens,
                               const GatherLogprobsOptions& o) {
  TORCH_CHECK(logits_in.defined(), fn, ": expected logits, got an undefined tensor");
  // Accept [1, N, V]: the layout packed batches have when they come out of a [B, T] model call.
  const bool batched = logits_in.dim() == 3;
  TORCH_CHECK(!batched || logits_in.size(0) == 1, fn,
              ": expected packed logits of shape [N, V] or [1, N, V], got ", logits_in.sizes());
  const at::Tensor logits = batched ? logits_in : logits_in.unsqueeze(0);
  check_logits(fn, batched ? logits : logits_in, batched ? 3 : 2);
  const int64_t N = logits.size(1), V = logits.size(2);
  auto flat = [&](const at::Tensor& x) { return x.defined() && x.dim() == 2 ? x.squeeze(0) : x; };
  const auto labels = check_labels(fn, flat(labels_in), mask_in ? "input_ids" : "labels", {N}, logits);

  TORCH_CHECK(cu_seqlens.defined() && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, fn,
              ": expected cu_seqlens of shape [S + 1], got ",
              cu_seqlens.defined() ? cu_seqlens.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!at::isFloatingType(cu_seqlens.scalar_type()) && cu_seqlens.scalar_type() != at::kBool,
              fn, ": expected integer cu_seqlens, got ", cu_seqlens.scalar_type());
  const auto cu = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t S = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0, fn, ": expected cu_seqlens to start at 0, got ", c[0]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(c[s + 1] >= c[s], fn, ": expected non-decreasing cu_seqlens, got ", c[s], " then ",
                c[s + 1], " at index ", s + 1);
  TORCH_CHECK(c[S] == N, fn, ": expected cu_seqlens to end at the token count N = ", N, ", got ",
              c[S]);

  const auto dev = logits.options().dtype(at::kLong);
  const auto lengths = (cu.slice(0, 1) - cu.slice(0, 0, S)).to(logits.device());
  const auto seq_of = at::repeat_interleave(lengths);  // [N]: the sequence of each position
  const auto pos = at::arange(N, dev);
  const int64_t k = o.shift() ? 1 : 0;
  // Position i scores the token at i + k when that token is still in the same sequence.
  const auto in_seq = (pos + k) < cu.to(logits.device()).slice(0, 1).index_select(0, seq_of);
  const auto shifted = [&](const at::Tensor& x, const at::Scalar& fill) {
    return k ? at::cat({x.slice(0, 1), at::full({N > 0 ? 1 : 0}, fill, x.options())}) : x;
  };
  const auto targets = shifted(labels, 0);
  at::Tensor scored =
      in_seq & (mask_in ? shifted(check_mask(fn, flat(*mask_in), {N}, logits), false)
                        : shifted(labels, o.ignore_index()) != o.ignore_index());
  check_targets(fn, targets, scored, V, mask_in == nullptr, o.ignore_index());

  Rows rows;
  rows.t = scored.nonzero().select(1, 0).contiguous();
  rows.b = at::zeros_like(rows.t);
  rows.target = targets.index_select(0, rows.t);
  rows.seq = seq_of.index_select(0, rows.t);
  SequenceLogprobs res = reduce(logits, rows, S, scored, o);
  if (o.with_logits_mean_unmasked()) {
    at::NoGradGuard no_grad;
    const auto means = all_row_means(logits, o).squeeze(0);
    res.logits_sum_all = at::zeros({S}, means.options()).index_add_(0, seq_of, means);
    res.positions = lengths;
  }
  return res;
}

}  // namespace
}  // namespace detail

namespace functional {

SequenceLogprobs gather_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                 const GatherLogprobsFuncOptions& options) {
  return detail::gather_padded("prefopt::gather_logprobs", logits, labels, nullptr, options);
}

SequenceLogprobs gather_logprobs(const at::Tensor& logits, const at::Tensor& input_ids,
                                 const at::Tensor& completion_mask,
                                 const GatherLogprobsFuncOptions& options) {
  return detail::gather_padded("prefopt::gather_logprobs", logits, input_ids, &completion_mask,
                               options);
}

SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& cu_seqlens,
                                        const GatherLogprobsFuncOptions& options) {
  return detail::gather_packed("prefopt::gather_packed_logprobs", logits, labels, nullptr,
                               cu_seqlens, options);
}

SequenceLogprobs gather_packed_logprobs(const at::Tensor& logits, const at::Tensor& input_ids,
                                        const at::Tensor& completion_mask,
                                        const at::Tensor& cu_seqlens,
                                        const GatherLogprobsFuncOptions& options) {
  return detail::gather_packed("prefopt::gather_packed_logprobs", logits, input_ids,
                               &completion_mask, cu_seqlens, options);
}

PairLogprobs split_pairs(const SequenceLogprobs& all) {
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

PairSums ld_logps(const PairLogprobs& pair, double ld_alpha) {
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

at::Tensor wpo_pair_weights(const PairLogprobs& pair, bool clamp_max_one) {
  TORCH_CHECK(pair.chosen.wpo_weights.defined() && pair.rejected.wpo_weights.defined(),
              "prefopt::wpo_pair_weights: expected WPO weights (gather with with_wpo_weights(true))");
  auto w = pair.chosen.wpo_weights * pair.rejected.wpo_weights;
  return clamp_max_one ? w.clamp_max(1.0) : w;
}

}  // namespace functional
PREFOPT_END_NAMESPACE
