// SPDX-License-Identifier: Apache-2.0
// What the CPU and CUDA row kernels share: the statistics flags and the accumulation type.
// No torch types, so nvcc compiles it without libtorch.
#pragma once

namespace prefopt {
inline namespace v0 {
namespace detail {

/// Which statistics a row pass computes beyond the log-sum-exp and the target logit.
enum RowFlags : unsigned {
  kLogitSum = 1u,  ///< sum over the vocabulary of the logits
  kArgmax = 2u,    ///< index of the first maximal logit
  kEntropy = 4u,   ///< entropy of the softmax
  kLogSumP2 = 8u,  ///< log of the sum of squared probabilities (WPO)
};

/// Accumulation type of a storage type: fp64 for fp64 logits, fp32 otherwise.
template <typename T>
struct acc {
  using type = float;
};
template <>
struct acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc<T>::type;

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
