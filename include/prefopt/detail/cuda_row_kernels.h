// SPDX-License-Identifier: Apache-2.0
// Row kernels for log-prob gathering on CUDA. No torch types (raw pointers, sizes, strides and
// a stream), so nvcc compiles this code even where libtorch is CPU-only (see the
// build.cuda_kernels test). The library builds it only when the libtorch found has CUDA.
#pragma once

#include <cstdint>

#include <prefopt/detail/row_common.h>

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cuda {

/// Storage dtype of the logits. Statistics are fp64 for kFloat64 and fp32 otherwise; `flags`
/// below are RowFlags (src/row_common.h).
enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

/// Rows of a logits tensor [B, T, V] with unit vocabulary stride: row i is
/// `logits + b[i]·stride0 + t[i]·stride1` (strides in elements).
struct RowsArgs {
  const void* logits = nullptr;
  int64_t stride0 = 0, stride1 = 0, V = 0;
  const int64_t* b = nullptr;       ///< [n] device
  const int64_t* t = nullptr;       ///< [n] device
  const int64_t* target = nullptr;  ///< [n] device, in [0, V)
  int64_t n = 0;
};

/// Per-row outputs ([n] device arrays in the accumulation dtype; `correct` int64). Pointers of
/// statistics whose flag is not set may be null.
struct StatsOut {
  void* logp = nullptr;        ///< z_target − lse
  void* lse = nullptr;         ///< log Σ_v exp(z_v)
  void* logit_mean = nullptr;  ///< Σ_v z_v / V                  (kLogitSum)
  int64_t* correct = nullptr;  ///< first argmax == target        (kArgmax)
  void* entropy = nullptr;     ///< −Σ_v p_v log p_v              (kEntropy)
  void* log_sum_p2 = nullptr;  ///< log Σ_v p_v²                  (kLogSumP2)
};

/// One read of each row: online max/sum-exp (with the entropy and Σp² terms rescaled alongside),
/// logit sum and first argmax, one block per row. Rows with a NaN or a non-finite maximum
/// give NaN lse, entropy and Σp², as log_softmax does. Returns a cudaError_t value (0: success).
int row_stats(DType dtype, const RowsArgs& rows, unsigned flags, const StatsOut& out, void* stream);

/// The logits gradient of `Σ_i g_i · log_softmax(row_i)[target_i]`, written to every row of
/// `grad` [B·T rows of V, strides o0/o1]:
/// `grad_v = g_i · (1[v = target_i] − exp(z_v − lse_i))` on scored rows, zeros elsewhere.
/// Each element is read and written by the same thread, so `grad` may be `logits` (in place).
struct GradArgs {
  const void* logits = nullptr;
  int64_t stride0 = 0, stride1 = 0;
  void* grad = nullptr;
  int64_t out0 = 0, out1 = 0;
  int64_t rows = 0, T = 1, V = 0;   ///< rows = B·T logits rows; row r is (r / T, r % T)
  const int64_t* row_of = nullptr;  ///< [rows] scored-row index or −1; null: row r is scored row r
  const int64_t* target = nullptr;  ///< [n] per scored row
  const void* lse = nullptr;        ///< [n] accumulation dtype
  const void* g = nullptr;          ///< [n] accumulation dtype
};
int row_grad(DType dtype, const GradArgs& args, void* stream);

/// `C += op(A)·B` for 16-bit A and B (row-major, dtype kBFloat16 or kFloat16) into fp32 C
/// [m, n] (row-major, ldc), fp32 accumulation, in one cuBLAS call. op(A) = A [m, k] (lda), or
/// with `trans_a` Aᵀ of A stored [k, m]; B is [k, n] (ldb). The fused op accumulates its
/// gradients across chunks with it, without fp32 copies of the operands (an fp32 GEMM runs at
/// a fraction of the tensor cores' rate). `cublas_handle` is a cublasHandle_t already bound to
/// the stream. Returns a cublasStatus_t value (0: success).
int gemm_f32acc(DType ab, void* cublas_handle, bool trans_a, int64_t m, int64_t n, int64_t k,
                const void* A, int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc);

/// Message of a value returned by row_stats/row_grad.
const char* error_string(int code);

}  // namespace cuda
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
