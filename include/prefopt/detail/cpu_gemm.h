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

/// How a gradient that accumulates in fp32 over chunks, `c (fp32) += op(a)·b` with 16-bit
/// `a` and `b`, is multiplied on this CPU (`detail::fused::add_mm`).
enum class Gemm16Path {
  /// `mixed_gemm`: one BLAS GEMM, fp32 accumulation and output, `c` never rounded.
  kBlas,
  /// libtorch's own 16-bit GEMM (oneDNN) on blocks of `c`'s rows: fp32 accumulation inside,
  /// each block's product rounded once to 16 bits, then added to `c` in fp32. (fp16 only
  /// where libtorch has a CPU fp16 GEMM, 2.1 and later; otherwise as kFp32Copies.)
  kRounded,
  /// fp32 GEMMs on fp32 copies of blocks of the operands (fp32 throughout: slower than
  /// 16-bit kernels, faster than the conversions of CPUs without them).
  kFp32Copies,
};

/// Whether `PREFOPT_CPU_GEMM16=off`: every 16-bit GEMM on CPU goes through fp32 copies of
/// blocks (for tests of that fallback on any machine, and to rule the 16-bit kernels out).
bool fp32_only();

/// Whether `PREFOPT_CPU_GEMM16` is `blas` or `rounded`: 16-bit GEMMs wherever they exist,
/// however fast (`detail::fused::cpu_mm16_fast` skips its timing).
bool forced16();

/// Whether this CPU runs `type`'s GEMMs on 16-bit units: AVX-512 (F, DQ, BW, VL, with the OS
/// saving its state) for bf16, and AVX512-FP16 as well for fp16 (where ATen uses oneDNN for
/// its 16-bit `mm`). Elsewhere oneDNN, MKL and ATen run them through conversions at a
/// fraction of the fp32 rate, and fp32 GEMMs on fp32 copies of blocks are faster. True off
/// x86, where nothing is known (the results are checked either way).
bool fast16(Gemm16 type);

/// The path for `type`, chosen once per process. `kBlas` where `mixed_gemm` has a provider,
/// except MKL's bf16 GEMM on a CPU that is not Intel's but has AVX512-BF16 (AMD Zen 4 and
/// later): MKL runs it at its fp32 rate there (182 GFLOP/s on 2 cores of an AMD EPYC, where
/// libtorch's oneDNN bf16 GEMM gives 795), so `kRounded` is used instead. `kFp32Copies`
/// where there is no provider, and on CPUs without AVX-512 (`fast16`). The environment
/// variable `PREFOPT_CPU_GEMM16` overrides: `off` (`kFp32Copies`, and no 16-bit GEMM of
/// libtorch's either: `detail::fused::cpu_mm16_usable`), `blas` (`kBlas` wherever a provider
/// exists) or `rounded`.
Gemm16Path gemm16_path(Gemm16 type);

/// `gemm16_path(type)` in words, with the provider: for benchmarks, logs and tests.
const char* gemm16_path_name(Gemm16 type);

}  // namespace cpu
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
