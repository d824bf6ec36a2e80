// SPDX-License-Identifier: Apache-2.0
// Row selection, per-row log-probs over logits rows (CPU row kernels or chunked ATen), their
// gradient, and the per-sequence reduction: shared by the gathering and fused LM-head ops.
#pragma once
#include <prefopt/detail/rows.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <prefopt/detail/cpu_row_kernels.h>

#ifdef PREFOPT_WITH_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <prefopt/detail/cuda_row_kernels.h>
#endif

PREFOPT_BEGIN_NAMESPACE

PREFOPT_INLINE bool has_cuda_kernels() {
#ifdef PREFOPT_WITH_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

namespace detail {
namespace rows_impl {

namespace kc = prefopt::detail::cpu;

PREFOPT_INLINE bool use_kernel(const at::Tensor& logits, GatherBackend backend) {
  const bool cpu_ok = logits.device().is_cpu() && logits.stride(-1) == 1;
  switch (backend) {
    case GatherBackend::kKernel:  // the public functions check the device
      return cpu_ok;              // a strided vocabulary dimension goes through the ATen path
    case GatherBackend::kATen:
      return false;
    default:
      return cpu_ok;
  }
}

PREFOPT_INLINE int64_t rows_per_chunk(const at::Tensor& logits, int64_t chunk_bytes) {
  const int64_t V = logits.size(-1);
  // The row copy in its own dtype plus two temporaries in the accumulation dtype.
  const int64_t per_row =
      V * (logits.element_size() + 2 * at::elementSize(acc_type(logits.scalar_type())));
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
  using A = acc_t<T>;
  const T* base = reinterpret_cast<const T*>(logits.data_ptr<S>());
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1), V = logits.size(2);
  const int64_t n = rows.b.numel();
  const int64_t *b = rows.b.data_ptr<int64_t>(), *t = rows.t.data_ptr<int64_t>(),
                *tg = rows.target.data_ptr<int64_t>();
  A* logp = r.logp.data_ptr<A>();
  A* lse = r.lse.data_ptr<A>();
  A* lm = (flags & kLogitSum) ? r.logit_mean.data_ptr<A>() : nullptr;
  int64_t* ok = (flags & kArgmax) ? r.correct.data_ptr<int64_t>() : nullptr;
  A* ent = (flags & kEntropy) ? r.entropy.data_ptr<A>() : nullptr;
  A* p2 = (flags & kLogSumP2) ? r.log_sum_p2.data_ptr<A>() : nullptr;
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto st = kc::row_stats<T>(base + b[i] * s0 + t[i] * s1, V, tg[i], flags);
      lse[i] = st.lse;
      logp[i] = st.logp;
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
                     const at::Tensor& g_t, const at::Tensor& ge_t, const at::Tensor& ent_t,
                     at::Tensor& grad) {
  using T = typename Storage<S>::type;
  using A = acc_t<T>;
  const T* base = reinterpret_cast<const T*>(logits.data_ptr<S>());
  T* out = reinterpret_cast<T*>(grad.data_ptr<S>());
  const int64_t B = logits.size(0), Tn = logits.size(1), V = logits.size(2);
  const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
  const int64_t o0 = grad.stride(0), o1 = grad.stride(1);
  const int64_t *b = rows.b.data_ptr<int64_t>(), *t = rows.t.data_ptr<int64_t>(),
                *tg = rows.target.data_ptr<int64_t>();
  const A* lse = lse_t.data_ptr<A>();
  const A* g = g_t.data_ptr<A>();
  const A* ge = ge_t.defined() ? ge_t.data_ptr<A>() : nullptr;
  const A* ent = ge_t.defined() ? ent_t.data_ptr<A>() : nullptr;
  std::vector<int64_t> row_of(static_cast<size_t>(B * Tn), -1);  // logits row -> scored row
  for (int64_t i = 0, n = rows.b.numel(); i < n; ++i) row_of[b[i] * Tn + t[i]] = i;
  at::parallel_for(0, B * Tn, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* dst = out + (r / Tn) * o0 + (r % Tn) * o1;
      const int64_t i = row_of[r];
      const A gi = i >= 0 ? g[i] : A(0), gei = i >= 0 && ge ? ge[i] : A(0);
      if (gi != A(0) || gei != A(0)) {
        kc::row_grad<T>(base + b[i] * s0 + t[i] * s1, V, tg[i], lse[i], gi, gei,
                        gei != A(0) ? ent[i] : A(0), dst);
      } else {
        std::memset(static_cast<void*>(dst), 0, sizeof(T) * V);  // all-zero bits are +0 in every T
      }
    }
  });
}

#ifdef PREFOPT_WITH_CUDA_KERNELS
namespace kg = prefopt::detail::cuda;

/// CUDA logits with unit vocabulary stride, backend not kATen.
PREFOPT_INLINE bool use_cuda_kernel(const at::Tensor& logits, GatherBackend backend) {
  return logits.is_cuda() && logits.stride(-1) == 1 && backend != GatherBackend::kATen;
}

PREFOPT_INLINE kg::DType cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return kg::DType::kFloat32;
    case at::kDouble:
      return kg::DType::kFloat64;
    case at::kBFloat16:
      return kg::DType::kBFloat16;
    default:
      return kg::DType::kFloat16;
  }
}

PREFOPT_INLINE void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "prefopt: CUDA ", what, " kernel failed: ", kg::error_string(code));
}

PREFOPT_INLINE void cuda_forward(const at::Tensor& logits, const Rows& rows, unsigned flags,
                                 RowResults& r) {
  const c10::cuda::CUDAGuard guard(logits.device());
  kg::RowsArgs a;
  a.logits = logits.data_ptr();
  a.stride0 = logits.stride(0), a.stride1 = logits.stride(1), a.V = logits.size(2);
  a.b = rows.b.data_ptr<int64_t>(), a.t = rows.t.data_ptr<int64_t>();
  a.target = rows.target.data_ptr<int64_t>();
  a.n = rows.b.numel();
  kg::StatsOut o;
  o.logp = r.logp.data_ptr(), o.lse = r.lse.data_ptr();
  if (flags & kLogitSum) o.logit_mean = r.logit_mean.data_ptr();
  if (flags & kArgmax) o.correct = r.correct.data_ptr<int64_t>();
  if (flags & kEntropy) o.entropy = r.entropy.data_ptr();
  if (flags & kLogSumP2) o.log_sum_p2 = r.log_sum_p2.data_ptr();
  check_launch(kg::row_stats(cuda_dtype(logits.scalar_type()), a, flags, o,
                             c10::cuda::getCurrentCUDAStream().stream()),
               "row statistics");
}

PREFOPT_INLINE void cuda_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse,
                                  const at::Tensor& g, at::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), n = rows.b.numel();
  // Scored rows come in row-major order (nonzero() or the fused op's identity), so with every
  // row scored, logits row r is scored row r; otherwise map logits rows to scored rows.
  at::Tensor row_of;
  if (n != B * T) {
    row_of = at::full({B * T}, -1, rows.b.options());
    row_of.index_put_({rows.b * T + rows.t}, at::arange(n, rows.b.options()));
  }
  kg::GradArgs a;
  a.logits = logits.data_ptr();
  a.stride0 = logits.stride(0), a.stride1 = logits.stride(1);
  a.grad = grad.data_ptr();
  a.out0 = grad.stride(0), a.out1 = grad.stride(1);
  a.rows = B * T, a.T = T, a.V = logits.size(2);
  a.row_of = row_of.defined() ? row_of.data_ptr<int64_t>() : nullptr;
  a.target = rows.target.data_ptr<int64_t>();
  a.lse = lse.data_ptr(), a.g = g.data_ptr();
  check_launch(
      kg::row_grad(cuda_dtype(logits.scalar_type()), a, c10::cuda::getCurrentCUDAStream().stream()),
      "row gradient");
}
#endif

#define PREFOPT_DISPATCH_LOGITS(logits, NAME, ...)                                     \
  switch ((logits).scalar_type()) {                                                    \
    case at::kFloat:                                                                   \
      NAME<float>(__VA_ARGS__);                                                        \
      break;                                                                           \
    case at::kDouble:                                                                  \
      NAME<double>(__VA_ARGS__);                                                       \
      break;                                                                           \
    case at::kBFloat16:                                                                \
      NAME<at::BFloat16>(__VA_ARGS__);                                                 \
      break;                                                                           \
    case at::kHalf:                                                                    \
      NAME<at::Half>(__VA_ARGS__);                                                     \
      break;                                                                           \
    default:                                                                           \
      TORCH_INTERNAL_ASSERT(false, "unchecked logits dtype ", (logits).scalar_type()); \
  }

// ---- chunked ATen path (any device) ----

PREFOPT_INLINE void aten_forward(const at::Tensor& logits, const Rows& rows, unsigned flags,
                                 int64_t chunk_bytes, RowResults& r) {
  const int64_t V = logits.size(2);
  const auto acc = acc_type(logits.scalar_type());
  for_each_chunk(rows.b.numel(), rows_per_chunk(logits, chunk_bytes), [&](int64_t s, int64_t e) {
    const auto tg = rows.target.slice(0, s, e);
    const auto z = logits.index({rows.b.slice(0, s, e), rows.t.slice(0, s, e)}).to(acc);
    const auto m = std::get<0>(z.max(1, /*keepdim=*/true));
    const auto x = z - m;
    const auto ex = x.exp();
    const auto log_s = ex.sum(1).log();
    const auto lse = m.squeeze(1) + log_s;
    r.lse.slice(0, s, e).copy_(lse);
    // (z_y − m) − log S, not z_y − lse: lse's rounding would cost ulp(lse)/2 at large logits.
    r.logp.slice(0, s, e).copy_(x.gather(1, tg.unsqueeze(1)).squeeze(1) - log_s);
    if (flags & kLogitSum) r.logit_mean.slice(0, s, e).copy_(z.sum(1) / static_cast<double>(V));
    if (flags & kArgmax)  // a NaN or infinite maximum never counts, as in the row kernels
      r.correct.slice(0, s, e).copy_((z.argmax(1) == tg) & at::isfinite(m.squeeze(1)));
    if (flags & kEntropy)  // clamp: 0·(−inf) would be NaN where a logit is −inf
      r.entropy.slice(0, s, e).copy_(log_s - (ex * x.clamp_min(-1e30)).sum(1) / log_s.exp());
    if (flags & kLogSumP2) r.log_sum_p2.slice(0, s, e).copy_((ex * ex).sum(1).log() - 2 * log_s);
  });
}

PREFOPT_INLINE void aten_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse,
                                  const at::Tensor& g, const at::Tensor& g_ent,
                                  const at::Tensor& ent, int64_t chunk_bytes, at::Tensor& grad) {
  const auto acc = acc_type(logits.scalar_type());
  for_each_chunk(rows.b.numel(), rows_per_chunk(logits, chunk_bytes), [&](int64_t s, int64_t e) {
    const auto bi = rows.b.slice(0, s, e), ti = rows.t.slice(0, s, e);
    const auto gs = g.slice(0, s, e).unsqueeze(1);
    const auto x = logits.index({bi, ti}).to(acc) - lse.slice(0, s, e).unsqueeze(1);  // log p
    at::Tensor dz;
    if (g_ent.defined()) {
      // −p·(g + g_ent·(log p + H)), in place on two row-sized buffers (as rows_per_chunk
      // assumes). log p is clamped where p is 0 in every dtype (below −745), so that a −inf
      // logit gives 0, not 0·(−inf).
      const auto c = x.clamp_min(-1e4)
                         .add_(ent.slice(0, s, e).unsqueeze(1))
                         .mul_(g_ent.slice(0, s, e).unsqueeze(1))
                         .add_(gs);
      dz = x.exp_().mul_(c).neg_();
    } else {
      dz = x.exp_().mul_(-gs);
    }
    const auto tg = rows.target.slice(0, s, e).unsqueeze(1);  // −1: no target in this row
    dz.scatter_add_(1, tg.clamp_min(0), gs * (tg >= 0));
    grad.index_put_({bi, ti}, dz.to(logits.scalar_type()));
  });
}

}  // namespace rows_impl
using namespace rows_impl;  // NOLINT: the helpers above, in detail only

PREFOPT_INLINE RowResults alloc_row_results(int64_t n, unsigned flags, const at::TensorOptions& f) {
  const auto empty = at::empty({0}, f);
  RowResults r;
  r.logp = at::empty({n}, f);
  r.lse = at::empty({n}, f);
  r.logit_mean = (flags & kLogitSum) ? at::empty({n}, f) : empty;
  r.correct = (flags & kArgmax) ? at::empty({n}, f.dtype(at::kLong)) : empty;
  r.entropy = (flags & kEntropy) ? at::empty({n}, f) : empty;
  r.log_sum_p2 = (flags & kLogSumP2) ? at::empty({n}, f) : empty;
  return r;
}

PREFOPT_INLINE RowResults slice_rows(const RowResults& r, int64_t s, int64_t e) {
  auto cut = [&](const at::Tensor& x) { return x.numel() > 0 ? x.slice(0, s, e) : x; };
  return {cut(r.logp),    cut(r.lse),     cut(r.logit_mean),
          cut(r.correct), cut(r.entropy), cut(r.log_sum_p2)};
}

PREFOPT_INLINE void rows_forward_into(const at::Tensor& logits, const Rows& rows, unsigned flags,
                                      GatherBackend backend, int64_t chunk_bytes, RowResults& r) {
  if (rows.b.numel() == 0) return;
#ifdef PREFOPT_WITH_CUDA_KERNELS
  if (use_cuda_kernel(logits, backend)) return cuda_forward(logits, rows, flags, r);
#endif
  if (use_kernel(logits, backend)) {
    PREFOPT_DISPATCH_LOGITS(logits, kernel_forward, logits, rows, flags, r)
  } else {
    aten_forward(logits, rows, flags, chunk_bytes, r);
  }
}

PREFOPT_INLINE RowResults rows_forward(const at::Tensor& logits, const Rows& rows, unsigned flags,
                                       GatherBackend backend, int64_t chunk_bytes) {
  RowResults r = alloc_row_results(rows.b.numel(), flags,
                                   logits.options().dtype(acc_type(logits.scalar_type())));
  rows_forward_into(logits, rows, flags, backend, chunk_bytes, r);
  return r;
}

PREFOPT_INLINE void rows_backward(const at::Tensor& logits, const Rows& rows, const at::Tensor& lse,
                                  const at::Tensor& g, const at::Tensor& g_ent,
                                  const at::Tensor& ent, GatherBackend backend, int64_t chunk_bytes,
                                  at::Tensor& grad) {
#ifdef PREFOPT_WITH_CUDA_KERNELS
  // The CUDA kernel has no entropy term: a gradient through the entropy takes the ATen path.
  if (use_cuda_kernel(logits, backend) && !g_ent.defined())
    return cuda_backward(logits, rows, lse, g, grad);
#endif
  if (use_kernel(logits, backend)) {  // writes every row, zero or not
    PREFOPT_DISPATCH_LOGITS(logits, kernel_backward, logits, rows, lse, g, g_ent, ent, grad)
    return;
  }
  if (grad.data_ptr() == logits.data_ptr()) {
    // In place: each chunk's rows are copied out by index() before they are overwritten, and
    // there is no unscored row to zero.
    TORCH_INTERNAL_ASSERT(rows.b.numel() == logits.size(0) * logits.size(1),
                          "in-place row gradients need every row scored");
  } else {
    grad.zero_();
  }
  aten_backward(logits, rows, lse, g, g_ent, ent, chunk_bytes, grad);
}

PREFOPT_INLINE RowUpstream row_upstream(const at::Tensor& g_logp, const at::Tensor& g_ent,
                                        const at::Tensor& lse) {
  RowUpstream u;
  if (g_ent.defined()) u.g_ent = g_ent.to(lse.scalar_type()).contiguous();
  if (g_logp.defined()) {
    u.g = g_logp.to(lse.scalar_type()).contiguous();
  } else if (u.g_ent.defined()) {
    u.g = at::zeros_like(lse);
  }
  return u;
}

PREFOPT_INLINE std::vector<at::Tensor> detached_statistics(const RowResults& r, unsigned flags) {
  std::vector<at::Tensor> out{r.logit_mean, r.correct, r.log_sum_p2};
  if (!(flags & kEntropy)) out.push_back(r.entropy);  // the empty placeholder
  return out;
}

PREFOPT_INLINE at::Tensor slice_or_undefined(const at::Tensor& x, int64_t s, int64_t e) {
  return x.defined() ? x.slice(0, s, e) : x;
}

PREFOPT_INLINE at::Tensor all_row_means(const at::Tensor& logits, GatherBackend backend,
                                        int64_t chunk_bytes) {
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  if (use_kernel(logits, backend)) {
    auto out = at::empty({B, T}, logits.options().dtype(acc_type(logits.scalar_type())));
    auto run = [&](auto tag) {
      using S = decltype(tag);
      using TT = typename Storage<S>::type;
      using A = acc_t<TT>;
      const TT* base = reinterpret_cast<const TT*>(logits.data_ptr<S>());
      A* dst = out.data_ptr<A>();
      const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
      at::parallel_for(0, B * T, std::max<int64_t>(1, 32768 / V), [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          dst[i] = kc::row_sum<TT>(base + (i / T) * s0 + (i % T) * s1, V) / static_cast<A>(V);
      });
    };
    switch (logits.scalar_type()) {
      case at::kFloat:
        run(float{});
        break;
      case at::kDouble:
        run(double{});
        break;
      case at::kBFloat16:
        run(at::BFloat16{});
        break;
      default:
        run(at::Half{});
        break;
    }
    return out;
  }
  auto flat = at::empty({B * T}, logits.options().dtype(acc_type(logits.scalar_type())));
  const auto idx = at::arange(B * T, logits.options().dtype(at::kLong));
  for_each_chunk(B * T, rows_per_chunk(logits, chunk_bytes), [&](int64_t s, int64_t e) {
    const auto i = idx.slice(0, s, e);
    flat.slice(0, s, e).copy_(logits.index({i.div(T, "floor"), i.remainder(T)})
                                  .to(acc_type(logits.scalar_type()))
                                  .mean(1));
  });
  return flat.view({B, T});
}

// ------------------------------------------------------------------------------------------
// Input checks. Messages name the public function and state what was expected and given.

PREFOPT_INLINE void check_floating(const char* fn, const char* what, const at::Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, fn,
              ": expected floating ", what, " (float64, float32, bfloat16 or float16), got ", st);
}

PREFOPT_INLINE at::Tensor check_labels(const char* fn, const at::Tensor& labels, const char* what,
                                       at::IntArrayRef expected, const char* ref_name,
                                       const at::Tensor& logits) {
  TORCH_CHECK(labels.defined(), fn, ": expected ", what, ", got an undefined tensor");
  // Labels are indices: the two index types only (uint8 would turn −100 into 156, scored).
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, fn,
              ": expected integer ", what, " (int64 or int32), got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == expected, fn, ": expected ", what, " of shape ", expected,
              " to match the ", ref_name, " ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), fn, ": expected ", what, " on ", logits.device(),
              " like the ", ref_name, ", got ", labels.device());
  return labels.to(at::kLong);
}

PREFOPT_INLINE at::Tensor check_mask(const char* fn, const at::Tensor& mask,
                                     at::IntArrayRef expected, const char* ref_name,
                                     const at::Tensor& logits) {
  TORCH_CHECK(mask.defined(), fn, ": expected completion_mask, got an undefined tensor");
  TORCH_CHECK(!at::isFloatingType(mask.scalar_type()) && !at::isComplexType(mask.scalar_type()), fn,
              ": expected completion_mask of bool or integer 0/1 values, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == expected, fn, ": expected completion_mask of shape ", expected,
              " to match the ", ref_name, " ", logits.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == logits.device(), fn, ": expected completion_mask on ",
              logits.device(), " like the ", ref_name, ", got ", mask.device());
  // .to(kBool) would score a 2 or a −1 silently; one small reduction (a sync on GPU, as the
  // label check's) rules them out.
  if (mask.scalar_type() != at::kBool && mask.numel() > 0) {
    const auto bad = (mask < 0) | (mask > 1);
    if (bad.any().item<bool>()) {
      const auto where = bad.nonzero()[0].cpu();
      std::string pos;
      for (int64_t i = 0; i < where.numel(); ++i)
        pos += (i ? ", " : "") + std::to_string(where[i].item<int64_t>());
      TORCH_CHECK(false, fn, ": expected completion_mask of bool or integer 0/1 values, got ",
                  mask.index({bad}).cpu()[0].item<int64_t>(), " at completion_mask[", pos, "]");
    }
  }
  return mask.to(at::kBool);
}

PREFOPT_INLINE unsigned stat_flags(bool logits_mean, bool accuracy, bool entropy, bool wpo) {
  return (logits_mean ? kLogitSum : 0u) | (accuracy ? kArgmax : 0u) | (entropy ? kEntropy : 0u) |
         (wpo ? kLogSumP2 : 0u);
}

PREFOPT_INLINE void advise_huge_pages(const at::Tensor& fresh) {
  if (fresh.is_cpu()) kc::advise_huge_pages(fresh.data_ptr(), fresh.nbytes());
}

namespace rows_impl {

/// Scored labels must index the vocabulary. One reduction and, on error only, a readable report
/// naming the label's own index (`targets` are the labels shifted by `k` along the last dim).
PREFOPT_INLINE void check_targets(const char* fn, const at::Tensor& targets,
                                  const at::Tensor& scored, int64_t V, bool has_ignore,
                                  int64_t ignore_index, int64_t k) {
  const auto bad = scored & ((targets < 0) | (targets >= V));
  if (!bad.any().item<bool>()) return;
  const auto where = bad.nonzero()[0].cpu();
  const auto value = targets.index({bad}).cpu()[0].item<int64_t>();
  std::string pos;
  for (int64_t i = 0; i < where.numel(); ++i)
    pos += (i ? ", " : "") +
           std::to_string(where[i].item<int64_t>() + (i + 1 == where.numel() ? k : 0));
  if (has_ignore) {
    TORCH_CHECK(false, fn, ": expected labels in [0, ", V,
                ") or equal to ignore_index = ", ignore_index, ", got ", value, " at labels[", pos,
                "]");
  } else {
    TORCH_CHECK(false, fn, ": expected input_ids in [0, ", V,
                ") wherever completion_mask is set, got ", value, " at input_ids[", pos, "]");
  }
}

PREFOPT_INLINE Rows padded_rows(const at::Tensor& targets, const at::Tensor& scored) {
  const auto idx = scored.nonzero();
  Rows rows;
  rows.b = idx.select(1, 0).contiguous();
  rows.t = idx.select(1, 1).contiguous();
  rows.target = targets.index({rows.b, rows.t}).contiguous();
  rows.seq = rows.b;
  return rows;
}

}  // namespace rows_impl

PREFOPT_INLINE Selection select_padded(const char* fn, const at::Tensor& ref, const char* ref_name,
                                       int64_t B, int64_t T, int64_t V, const at::Tensor& labels_in,
                                       const at::Tensor* mask_in, bool shift,
                                       int64_t ignore_index) {
  const auto labels =
      check_labels(fn, labels_in, mask_in ? "input_ids" : "labels", {B, T}, ref_name, ref);
  const int64_t k = (shift && T > 0) ? 1 : 0;  // positions t score labels at t + k
  const auto targets = labels.slice(1, k);
  Selection sel;
  sel.scored = mask_in ? check_mask(fn, *mask_in, {B, T}, ref_name, ref).slice(1, k)
                       : targets != ignore_index;
  if (V != kVocabularyUnknown)
    check_targets(fn, targets, sel.scored, V, mask_in == nullptr, ignore_index, k);
  sel.rows = padded_rows(targets, sel.scored);
  sel.S = B;
  return sel;
}

PREFOPT_INLINE Selection select_packed(const char* fn, const at::Tensor& ref, const char* ref_name,
                                       int64_t N, int64_t V, const at::Tensor& labels_in,
                                       const at::Tensor* mask_in, const at::Tensor& cu_seqlens,
                                       bool shift, int64_t ignore_index) {
  auto flat = [&](const at::Tensor& x) { return x.defined() && x.dim() == 2 ? x.squeeze(0) : x; };
  const auto labels =
      check_labels(fn, flat(labels_in), mask_in ? "input_ids" : "labels", {N}, ref_name, ref);
  TORCH_CHECK(cu_seqlens.defined() && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, fn,
              ": expected cu_seqlens of shape [S + 1], got ",
              cu_seqlens.defined() ? cu_seqlens.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!at::isFloatingType(cu_seqlens.scalar_type()) &&
                  !at::isComplexType(cu_seqlens.scalar_type()) &&
                  cu_seqlens.scalar_type() != at::kBool,
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

  const auto dev = ref.options().dtype(at::kLong);
  Selection sel;
  sel.S = S;
  sel.lengths = (cu.slice(0, 1) - cu.slice(0, 0, S)).to(ref.device());
  sel.seq_of = at::repeat_interleave(sel.lengths);  // [N]: the sequence of each position
  const auto pos = at::arange(N, dev);
  const int64_t k = shift ? 1 : 0;
  // Position i scores the token at i + k when that token is still in the same sequence.
  const auto in_seq = (pos + k) < cu.to(ref.device()).slice(0, 1).index_select(0, sel.seq_of);
  const auto shifted = [&](const at::Tensor& x, const at::Scalar& fill) {
    return k ? at::cat({x.slice(0, 1), at::full({N > 0 ? 1 : 0}, fill, x.options())}) : x;
  };
  const auto targets = shifted(labels, 0);
  sel.scored =
      in_seq & (mask_in ? shifted(check_mask(fn, flat(*mask_in), {N}, ref_name, ref), false)
                        : shifted(labels, ignore_index) != ignore_index);
  check_targets(fn, targets, sel.scored, V, mask_in == nullptr, ignore_index, k);
  sel.rows.t = sel.scored.nonzero().select(1, 0).contiguous();
  sel.rows.b = at::zeros_like(sel.rows.t);
  sel.rows.target = targets.index_select(0, sel.rows.t);
  sel.rows.seq = sel.seq_of.index_select(0, sel.rows.t);
  return sel;
}

PREFOPT_INLINE SequenceLogprobs assemble(const Selection& sel, const at::Tensor& logp,
                                         const RowResults& stats, unsigned flags,
                                         bool with_token_logps, at::ScalarType acc) {
  const auto& rows = sel.rows;
  const int64_t S = sel.S;
  const auto fo = logp.options().dtype(acc);
  auto seq_sum = [&](const at::Tensor& v) {  // fp64 accumulation, returned in the acc dtype
    return at::zeros({S}, fo.dtype(at::kDouble)).index_add(0, rows.seq, v.to(at::kDouble)).to(acc);
  };
  SequenceLogprobs res;
  res.sum = seq_sum(logp);
  res.count = at::zeros({S}, fo.dtype(at::kLong)).index_add_(0, rows.seq, at::ones_like(rows.seq));
  const auto denom = res.count.clamp_min(1).to(acc);
  res.mean = res.sum / denom;
  if (with_token_logps) {
    const auto zeros = at::zeros(sel.scored.sizes(), fo);
    res.token_logps = sel.scored.dim() == 2 ? zeros.index_put({rows.b, rows.t}, logp.to(acc))
                                            : zeros.index_put({rows.t}, logp.to(acc));
    res.token_mask = sel.scored;
  }
  if (flags & kLogitSum) res.logits_sum = seq_sum(stats.logit_mean);
  if (flags & kArgmax)
    res.correct = at::zeros({S}, fo.dtype(at::kLong)).index_add_(0, rows.seq, stats.correct);
  if (flags & kEntropy) res.entropy_sum = seq_sum(stats.entropy);
  if (flags & kLogSumP2)
    res.wpo_weights = (seq_sum(logp.detach() - stats.log_sum_p2) / denom).exp();
  return res;
}

}  // namespace detail
PREFOPT_END_NAMESPACE
