// SPDX-License-Identifier: Apache-2.0
// Row kernels for log-prob gathering on CPU. No torch types: raw pointers and sizes only.
#pragma once

#include <cstddef>
#include <cstdint>

#include <prefopt/config.h>
#include <prefopt/detail/row_common.h>

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cpu {

/// 16-bit storage types, bit-compatible with c10::BFloat16 and c10::Half.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

template <typename A>
struct RowStats {
  A lse = 0;            ///< log Σ_v exp(z_v)
  A target = 0;         ///< z_target (0 when target < 0)
  A logp = 0;           ///< (z_target − max) − log Σ_v exp(z_v − max): log p_target
  A logit_sum = 0;      ///< Σ_v z_v                 (kLogitSum)
  A entropy = 0;        ///< -Σ_v p_v log p_v        (kEntropy)
  A log_sum_p2 = 0;     ///< log Σ_v p_v²            (kLogSumP2)
  int64_t argmax = -1;  ///< first v with z_v = max (kArgmax)
};

/// One pass pair over a contiguous row `z[0..V)`: max (+ logit sum), then exp sums.
/// Non-finite rows give NaN statistics, as log_softmax does.
template <typename T>
PREFOPT_HIDDEN RowStats<acc_t<T>> row_stats(const T* z, int64_t V, int64_t target, unsigned flags);

/// Gradient of `g · log_softmax(z)[target] + ge · H(softmax(z))` with respect to the row,
/// `ent` the row's entropy H: `out_v = g · 1[v = target] − p_v · (g + ge · (log p_v + H))`,
/// `p_v = exp(z_v − lse)`, written in T (0 where p_v = 0). `out` may be `z` (in place).
template <typename T>
PREFOPT_HIDDEN void row_grad(const T* z, int64_t V, int64_t target, acc_t<T> lse, acc_t<T> g,
                             acc_t<T> ge, acc_t<T> ent, T* out);

/// Σ_v z_v of a contiguous row.
template <typename T>
PREFOPT_HIDDEN acc_t<T> row_sum(const T* z, int64_t V);

/// The instruction set the row kernels run with, chosen once per process: "avx512", "avx2" or
/// "generic" (portable vector code). The environment variable `PREFOPT_CPU_ISA` (one of these
/// names) picks a lower level than the CPU's; an unknown or unsupported one is reported on
/// stderr and ignored.
const char* row_kernel_isa();

/// Asks the kernel to back a large, freshly allocated and not yet touched buffer with huge
/// pages (Linux transparent huge pages in `madvise` mode; a no-op elsewhere and below 4 MiB).
/// First-touch page faults dominate writing a logits-sized gradient otherwise: on this
/// project's CI VM, 450 ms for 262 MB against 15-25 ms with huge pages.
void advise_huge_pages(void* data, std::size_t bytes);

}  // namespace cpu
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
