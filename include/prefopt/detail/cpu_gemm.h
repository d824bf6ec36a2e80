// SPDX-License-Identifier: Apache-2.0
// Mixed-precision GEMM on CPU: 16-bit operands, fp32 output and accumulation, from the BLAS
// that libtorch already loaded. No torch types: raw pointers and sizes only.
#pragma once

#include <cstdint>

#include <prefopt/config.h>

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cpu {

/// The 16-bit operand types of `mixed_gemm`.
enum class Gemm16 { kBFloat16, kHalf };

/// `c = op(a) · op(b) + beta · c` for row-major 16-bit `a` [m, k] (or [k, m] with `trans_a`)
/// and `b` [k, n] (or [n, k] with `trans_b`), fp32 `c` [m, n]: the products are accumulated in
/// fp32 inside one GEMM and `c` is never rounded to 16 bits.
///
/// ATen has no such GEMM on CPU (its `mm` rounds the output to the input dtype, and
/// `mm(…, out_dtype)` is CUDA-only), but the BLAS behind libtorch has one: oneDNN's
/// `dnnl_gemm_bf16bf16f32` (Debian's libtorch links libdnnl) or MKL's
/// `cblas_gemm_bf16bf16f32` / `cblas_gemm_f16f16f32` (PyPI's libtorch exports them). They are
/// looked up once in the running process and checked on a small product with an exact answer
/// before first use, so a wrong answer disables them instead of computing garbage (an ILP64
/// MKL, whose 64-bit sizes this LP64 call does not match, is not supported). Returns false,
/// doing nothing, when the process has none for `type` (or when the environment variable
/// `PREFOPT_CPU_GEMM16` is `off`): the caller then falls back to fp32 GEMMs on fp32 copies of
/// blocks of the operands.
bool mixed_gemm(Gemm16 type, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c,
                int64_t ldc);

/// Which library `mixed_gemm` uses for `type` ("oneDNN dnnl_gemm_bf16bf16f32", ...), or
/// nullptr when none: for benchmarks and logs.
const char* mixed_gemm_provider(Gemm16 type);

}  // namespace cpu
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
