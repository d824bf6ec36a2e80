// SPDX-License-Identifier: Apache-2.0
// Per-sequence log-probs from a row-major logits matrix of packed sequences, and their
// gradient with respect to the logits, on Eigen.
//
// Mirrors `functional::gather_packed_logprobs` (labels form) of include/prefopt/logprobs.h and
// include/prefopt/logprobs-inl.h, include/prefopt/detail/rows-inl.h (`select_packed`, `assemble`):
// the reference this layer is tested against (tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>

PREFOPT_BEGIN_NAMESPACE
namespace eigen {

/// Options of `eigen::gather_packed_logprobs` (the libtorch layer's `GatherLogprobsOptions`,
/// labels form).
///
/// Example:
/// ```
/// auto o = prefopt::eigen::GatherLogprobsOptions().shift(false).ignore_index(-1);
/// ```
struct GatherLogprobsOptions {
  /// Causal shift: the logits row at position t scores the label at t + 1 of the same sequence
  /// (decoder LMs; the last row of each sequence scores nothing). With `false` row t scores
  /// the label at t. Default: true.
  PREFOPT_EIGEN_ARG(bool, shift) = true;
  /// Label value that marks a position as not scored (prompt, padding). Default: -100.
  PREFOPT_EIGEN_ARG(int64_t, ignore_index) = -100;
};

namespace detail {

/// Validates the logits, labels and cu_seqlens of a packed batch; returns S.
template <typename T>
Eigen::Index check_packed(const char* fn, const Eigen::Ref<const RowMatrix<T>>& logits,
                          const Eigen::Ref<const IndexVector>& labels,
                          const Eigen::Ref<const IndexVector>& cu_seqlens) {
  const Eigen::Index N = logits.rows(), V = logits.cols();
  check(V > 0, fn, ": expected a vocabulary of at least 1 entry, got V = 0");
  check(labels.size() == N, fn, ": expected labels of shape [", N, "] to match the logits [", N,
        ", ", V, "], got ", shape(labels.size()));
  check(cu_seqlens.size() >= 1, fn, ": expected cu_seqlens of shape [S + 1], got ",
        shape(cu_seqlens.size()));
  const Eigen::Index S = cu_seqlens.size() - 1;
  check(cu_seqlens(0) == 0, fn, ": expected cu_seqlens to start at 0, got ", cu_seqlens(0));
  for (Eigen::Index s = 0; s < S; ++s) {
    check(cu_seqlens(s + 1) >= cu_seqlens(s), fn, ": expected non-decreasing cu_seqlens, got ",
          cu_seqlens(s), " then ", cu_seqlens(s + 1), " at index ", s + 1);
  }
  check(cu_seqlens(S) == N, fn, ": expected cu_seqlens to end at the token count N = ", N, ", got ",
        cu_seqlens(S));
  return S;
}

/// Calls `f(s, row, label)` for every scored row of the packed batch, in order, after checking
/// that its label indexes the vocabulary.
template <typename F>
void for_each_scored(const char* fn, Eigen::Index V, const Eigen::Ref<const IndexVector>& labels,
                     const Eigen::Ref<const IndexVector>& cu_seqlens,
                     const GatherLogprobsOptions& o, F&& f) {
  const Eigen::Index S = cu_seqlens.size() - 1;
  const Eigen::Index k = o.shift() ? 1 : 0;  // row i scores the label at i + k
  for (Eigen::Index s = 0; s < S; ++s) {
    const Eigen::Index end = cu_seqlens(s + 1);
    for (Eigen::Index i = cu_seqlens(s); i + k < end; ++i) {
      const int64_t y = labels(i + k);
      if (y == o.ignore_index()) continue;
      check(y >= 0 && y < V, fn, ": expected labels in [0, ", V,
            ") or equal to ignore_index = ", o.ignore_index(), ", got ", y, " at labels[", i + k,
            "]");
      f(s, i, static_cast<Eigen::Index>(y));
    }
  }
}

/// logsumexp of a row, max-shifted.
template <typename Row>
typename Row::Scalar logsumexp(const Row& row) {
  using T = typename Row::Scalar;
  const T m = row.maxCoeff();
  return m + std::log((row.array() - m).exp().sum());
}

}  // namespace detail

/// Per-sequence log-probs of `labels` under `logits`, for S sequences packed back to back
/// (sequence s spans rows `[cu_seqlens[s], cu_seqlens[s+1])`), positions excluded by
/// `ignore_index`; the libtorch layer's `gather_packed_logprobs` (labels form).
///
/// `sum_s = Σ_{t scored} (z_{t, y_{t+1}} − logsumexp_v z_{t, v})` (shift on; the shift never
/// crosses a sequence boundary), `mean_s = sum_s / max(count_s, 1)`.
///
/// - `logits`: [N, V] row-major (a `RowMatrix<T>` or a map of the host's buffer).
/// - `labels`: [N] int64 in [0, V) or `ignore_index` (checked where scored).
/// - `cu_seqlens`: [S + 1] int64, starting at 0, non-decreasing, ending at N
///   (`cu_seqlens_from_lengths` builds it).
///
/// Per-token log-probs are computed in T with a max-shifted logsumexp; sums accumulate in
/// double and are returned in T. `token_logps` holds each row's log-prob (0 where not scored).
///
/// Example:
/// ```
/// namespace pe = prefopt::eigen;
/// pe::RowMatrix<float> logits(7, 32);  // 2 sequences of 3 and 4 positions
/// pe::IndexVector labels(7), cu(3);
/// cu << 0, 3, 7;
/// auto lp = pe::gather_packed_logprobs<float>(logits, labels, cu);  // lp.sum, lp.count: [2]
/// ```
template <typename T>
SequenceLogprobs<T> gather_packed_logprobs(const Eigen::Ref<const RowMatrix<T>>& logits,
                                           const Eigen::Ref<const IndexVector>& labels,
                                           const Eigen::Ref<const IndexVector>& cu_seqlens,
                                           const GatherLogprobsOptions& options = {}) {
  detail::check_scalar<T>();
  constexpr const char* fn = "prefopt::eigen::gather_packed_logprobs";
  const Eigen::Index S = detail::check_packed<T>(fn, logits, labels, cu_seqlens);
  Eigen::VectorXd acc = Eigen::VectorXd::Zero(S);
  SequenceLogprobs<T> out;
  out.count = IndexVector::Zero(S);
  out.token_logps = Vector<T>::Zero(logits.rows());
  detail::for_each_scored(fn, logits.cols(), labels, cu_seqlens, options,
                          [&](Eigen::Index s, Eigen::Index i, Eigen::Index y) {
                            const auto row = logits.row(i);
                            const T lp = row(y) - detail::logsumexp(row);
                            out.token_logps(i) = lp;
                            acc(s) += static_cast<double>(lp);
                            out.count(s) += 1;
                          });
  out.sum = acc.cast<T>();
  out.mean = out.sum.cwiseQuotient(out.count.cwiseMax(int64_t{1}).template cast<T>());
  return out;
}

/// `gather_packed_logprobs` with T deduced from the logits (a `RowMatrix<T>` or a map of one;
/// other layouts are copied to row-major first).
///
/// Example:
/// ```
/// auto lp = prefopt::eigen::gather_packed_logprobs(logits, labels, cu);
/// ```
template <typename Derived>
auto gather_packed_logprobs(const Eigen::MatrixBase<Derived>& logits,
                            const Eigen::Ref<const IndexVector>& labels,
                            const Eigen::Ref<const IndexVector>& cu_seqlens,
                            const GatherLogprobsOptions& options = {})
    -> SequenceLogprobs<typename Derived::Scalar> {
  using T = typename Derived::Scalar;
  return gather_packed_logprobs<T>(Eigen::Ref<const RowMatrix<T>>(logits), labels, cu_seqlens,
                                   options);
}

/// The gradient of a loss with respect to the logits, given its gradient with respect to the
/// per-sequence sums and/or means that `gather_packed_logprobs` returned, written into
/// `grad_logits` [N, V] (every row: 0 where not scored):
///
/// `dL/dz_t = g_s · (onehot(y) − softmax(z_t))` on scored rows of sequence s, y the label row t
/// scores (y_{t+1} with the shift), with
/// `g_s = grad_sum_s + grad_mean_s / max(count_s, 1)`.
///
/// `grad_sum`, `grad_mean`: [S], or empty for zero. The same `labels`, `cu_seqlens` and options
/// as the forward call.
///
/// `grad_logits` may be the logits' own buffer (the same data and strides): the gradient then
/// replaces the logits in place, each row read before it is written, as memory-bound hosts
/// (Liger, Cut Cross-Entropy) reuse the logits for their gradient. Any other overlap of the two
/// buffers is refused (std::invalid_argument), since rows would be read after being written.
/// Every check runs before anything is written.
///
/// Example:
/// ```
/// // sequences [chosen..., rejected...]: one upstream gradient per sequence, in that order
/// Eigen::VectorXf dsum(2 * B);
/// dsum << r.grad_policy_chosen, r.grad_policy_rejected;
/// pe::RowMatrix<float> dlogits(logits.rows(), logits.cols());
/// pe::gather_packed_logprobs_backward<float>(logits, labels, cu, dsum, Eigen::VectorXf(),
///                                            dlogits);
/// ```
template <typename T>
void gather_packed_logprobs_backward(const Eigen::Ref<const RowMatrix<T>>& logits,
                                     const Eigen::Ref<const IndexVector>& labels,
                                     const Eigen::Ref<const IndexVector>& cu_seqlens,
                                     const Eigen::Ref<const Vector<T>>& grad_sum,
                                     const Eigen::Ref<const Vector<T>>& grad_mean,
                                     Eigen::Ref<RowMatrix<T>> grad_logits,
                                     const GatherLogprobsOptions& options = {}) {
  detail::check_scalar<T>();
  constexpr const char* fn = "prefopt::eigen::gather_packed_logprobs_backward";
  const Eigen::Index S = detail::check_packed<T>(fn, logits, labels, cu_seqlens);
  detail::check(grad_sum.size() == S || grad_sum.size() == 0, fn, ": expected grad_sum of shape [",
                S, "] (one per sequence) or empty, got ", detail::shape(grad_sum.size()));
  detail::check(grad_mean.size() == S || grad_mean.size() == 0, fn,
                ": expected grad_mean of shape [", S, "] (one per sequence) or empty, got ",
                detail::shape(grad_mean.size()));
  detail::check(grad_logits.rows() == logits.rows() && grad_logits.cols() == logits.cols(), fn,
                ": expected grad_logits of shape [", logits.rows(), ", ", logits.cols(),
                "] like the logits, got [", grad_logits.rows(), ", ", grad_logits.cols(), "]");
  const Eigen::Index N = logits.rows(), V = logits.cols();
  if (N > 0 && V > 0) {
    // In place (the very same buffer and layout) is fine row by row; any other overlap is not.
    const T* lb = logits.data();
    const T* le = lb + (N - 1) * logits.outerStride() + (V - 1) * logits.innerStride() + 1;
    const T* gb = grad_logits.data();
    const T* ge =
        gb + (N - 1) * grad_logits.outerStride() + (V - 1) * grad_logits.innerStride() + 1;
    const bool overlap = std::less<const T*>()(lb, ge) && std::less<const T*>()(gb, le);
    const bool same = lb == gb && logits.outerStride() == grad_logits.outerStride() &&
                      logits.innerStride() == grad_logits.innerStride();
    detail::check(!overlap || same, fn,
                  ": expected grad_logits to be the logits' own buffer (in place) or not to ",
                  "overlap it, got buffers that partly overlap");
  }
  // Every scored row's sequence and label, checked before anything is written.
  std::vector<Eigen::Index> seq_of(static_cast<size_t>(N), -1), label_of(static_cast<size_t>(N));
  IndexVector count = IndexVector::Zero(S);
  detail::for_each_scored(fn, V, labels, cu_seqlens, options,
                          [&](Eigen::Index s, Eigen::Index i, Eigen::Index y) {
                            seq_of[static_cast<size_t>(i)] = s;
                            label_of[static_cast<size_t>(i)] = y;
                            count(s) += 1;
                          });
  // The means' gradient reaches the sums divided by max(count, 1).
  Vector<T> g = grad_sum.size() ? Vector<T>(grad_sum) : Vector<T>(Vector<T>::Zero(S));
  if (grad_mean.size()) {
    for (Eigen::Index s = 0; s < S; ++s)
      g(s) += grad_mean(s) / static_cast<T>(std::max<int64_t>(count(s), 1));
  }
  for (Eigen::Index i = 0; i < N; ++i) {
    const Eigen::Index s = seq_of[static_cast<size_t>(i)];
    if (s < 0) {
      grad_logits.row(i).setZero();
      continue;
    }
    // The row's logsumexp first: with grad_logits in place, the row is overwritten next.
    const T lse = detail::logsumexp(logits.row(i));
    grad_logits.row(i) = (logits.row(i).array() - lse).exp() * -g(s);
    grad_logits(i, label_of[static_cast<size_t>(i)]) += g(s);
  }
}

/// `gather_packed_logprobs_backward` returning a new [N, V] gradient matrix.
///
/// Example:
/// ```
/// auto dlogits = prefopt::eigen::gather_packed_logprobs_backward<double>(
///     logits, labels, cu, grad_sum, Eigen::VectorXd());
/// ```
template <typename T>
RowMatrix<T> gather_packed_logprobs_backward(const Eigen::Ref<const RowMatrix<T>>& logits,
                                             const Eigen::Ref<const IndexVector>& labels,
                                             const Eigen::Ref<const IndexVector>& cu_seqlens,
                                             const Eigen::Ref<const Vector<T>>& grad_sum,
                                             const Eigen::Ref<const Vector<T>>& grad_mean,
                                             const GatherLogprobsOptions& options = {}) {
  RowMatrix<T> grad(logits.rows(), logits.cols());
  gather_packed_logprobs_backward<T>(logits, labels, cu_seqlens, grad_sum, grad_mean, grad,
                                     options);
  return grad;
}

/// `cu_seqlens` [S + 1] of sequences of the given lengths: 0, l_0, l_0 + l_1, ...
///
/// Example:
/// ```
/// prefopt::eigen::IndexVector len(2);
/// len << 3, 4;
/// auto cu = prefopt::eigen::cu_seqlens_from_lengths(len);  // 0, 3, 7
/// ```
inline IndexVector cu_seqlens_from_lengths(const Eigen::Ref<const IndexVector>& lengths) {
  IndexVector cu(lengths.size() + 1);
  cu(0) = 0;
  for (Eigen::Index s = 0; s < lengths.size(); ++s) {
    detail::check(lengths(s) >= 0, "prefopt::eigen::cu_seqlens_from_lengths",
                  ": expected lengths >= 0, got ", lengths(s), " at index ", s);
    // A sum past int64 would be undefined behaviour, and wrap to offsets that pass for valid.
    detail::check(lengths(s) <= std::numeric_limits<int64_t>::max() - cu(s),
                  "prefopt::eigen::cu_seqlens_from_lengths",
                  ": expected lengths whose total fits in int64, got ", lengths(s), " at index ", s,
                  " after a total of ", cu(s));
    cu(s + 1) = cu(s) + lengths(s);
  }
  return cu;
}

/// Splits the results of a concatenated batch `[chosen..., rejected...]` into its two halves
/// (`sum`, `count`, `mean`; `token_logps` is per position and stays with the whole batch).
/// Needs an even number of sequences.
///
/// Example:
/// ```
/// auto pair = prefopt::eigen::split_pairs(prefopt::eigen::gather_packed_logprobs(logits, labels,
/// cu));
/// ```
template <typename T>
PairLogprobs<T> split_pairs(const SequenceLogprobs<T>& all) {
  const Eigen::Index n = all.sum.size();
  detail::check(n % 2 == 0, "prefopt::eigen::split_pairs",
                ": expected an even number of sequences [chosen..., rejected...], got ", n);
  detail::check(all.count.size() == n && all.mean.size() == n, "prefopt::eigen::split_pairs",
                ": expected sum, count and mean of the same shape, got ", detail::shape(n), ", ",
                detail::shape(all.count.size()), " and ", detail::shape(all.mean.size()));
  const Eigen::Index B = n / 2;
  PairLogprobs<T> out;
  out.chosen.sum = all.sum.head(B);
  out.chosen.count = all.count.head(B);
  out.chosen.mean = all.mean.head(B);
  out.rejected.sum = all.sum.tail(B);
  out.rejected.count = all.count.tail(B);
  out.rejected.mean = all.mean.tail(B);
  return out;
}

}  // namespace eigen
PREFOPT_END_NAMESPACE
