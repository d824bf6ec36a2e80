// SPDX-License-Identifier: Apache-2.0
// Mixed-precision CPU GEMM through the process's oneDNN or MKL, found with dlsym.
#pragma once

#include <prefopt/detail/cpu_gemm.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define PREFOPT_CPU_GEMM_CPUID 1
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define PREFOPT_CPU_GEMM_DLSYM 1
#endif

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cpu {
namespace gemm16 {

// oneDNN (≥ 1.0): row-major, 64-bit sizes, returns dnnl_status_t (0: success).
using DnnlGemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const void*, int64_t,
                         const void*, int64_t, float, float*, int64_t);
// MKL CBLAS, LP64 interface: 32-bit sizes; layout 101 = row-major, 111/112 = (no) transpose.
using CblasGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                           float, float*, int);

struct Provider {
  DnnlGemm dnnl = nullptr;
  CblasGemm cblas = nullptr;
  const char* name = nullptr;
};

PREFOPT_INLINE uint16_t to16(Gemm16 type, float x) {
  // Small integers only: exact in both formats.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (type == Gemm16::kBFloat16) return static_cast<uint16_t>(bits >> 16);
  // IEEE half of a small integer: sign, exponent rebias 127 → 15, top 10 mantissa bits.
  if (x == 0) return 0;
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((bits >> 23) & 0xffu) - 127 + 15;
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp) << 10) | ((bits >> 13) & 0x3ffu));
}

PREFOPT_INLINE bool call(const Provider& p, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                         const void* a, int64_t lda, const void* b, int64_t ldb, float beta,
                         float* c, int64_t ldc) {
  if (p.dnnl != nullptr)
    return p.dnnl(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc) == 0;
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m > kMax || n > kMax || k > kMax || lda > kMax || ldb > kMax || ldc > kMax) return false;
  p.cblas(101, ta ? 112 : 111, tb ? 112 : 111, static_cast<int>(m), static_cast<int>(n),
          static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
          static_cast<int>(ldc));
  return true;
}

// c = aᵀ·b + c on a 3×2 result with a [4, 3], b [4, 2] and c starting at 1: exact in fp32.
PREFOPT_INLINE bool self_test(const Provider& p, Gemm16 type) {
  float af[12], bf[8];
  uint16_t a[12], b[8];
  for (int i = 0; i < 12; ++i) a[i] = to16(type, af[i] = static_cast<float>(i % 5 - 2));
  for (int i = 0; i < 8; ++i) b[i] = to16(type, bf[i] = static_cast<float>(3 - i));
  float c[6] = {1, 1, 1, 1, 1, 1};
  if (!call(p, /*ta=*/true, /*tb=*/false, 3, 2, 4, a, 3, b, 2, 1.0f, c, 2)) return false;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 2; ++j) {
      float want = 1;
      for (int l = 0; l < 4; ++l) want += af[l * 3 + i] * bf[l * 2 + j];
      if (c[i * 2 + j] != want) return false;
    }
  }
  return true;
}

/// PREFOPT_CPU_GEMM16 ("" when unset); an unknown value is reported once on stderr and ignored.
PREFOPT_INLINE std::string mode() {
  static const std::string m = [] {
    const char* e = std::getenv("PREFOPT_CPU_GEMM16");
    std::string v = e != nullptr ? e : "";
    if (!v.empty() && v != "off" && v != "blas" && v != "rounded") {
      std::fprintf(stderr,
                   "prefopt: PREFOPT_CPU_GEMM16=%s is not one of off, blas, rounded; ignored\n",
                   v.c_str());
      v.clear();
    }
    return v;
  }();
  return m;
}

/// Whether the CPU is Intel's: MKL's fast 16-bit kernels run on those only.
PREFOPT_INLINE bool genuine_intel() {
#ifdef PREFOPT_CPU_GEMM_CPUID
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  return b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;  // "Genu" "ineI" "ntel"
#else
  return false;
#endif
}

/// Whether the CPU has AVX512-BF16, which oneDNN's bf16 GEMM uses on any vendor.
PREFOPT_INLINE bool avx512_bf16() {
#ifdef PREFOPT_CPU_GEMM_CPUID
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) == 0) return false;
  return (a >> 5) & 1u;  // CPUID.(EAX=7, ECX=1):EAX bit 5
#else
  return false;
#endif
}

/// CPUID leaf 7 sub-leaf 0 (EBX, EDX), and whether the OS saves the AVX-512 state (XCR0 bits
/// 1-2 and 5-7); all zero off x86.
struct Leaf7 {
  unsigned ebx = 0, edx = 0;
  bool zmm_state = false;
};

PREFOPT_INLINE Leaf7 leaf7() {
  Leaf7 r;
#ifdef PREFOPT_CPU_GEMM_CPUID
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0 || ((c >> 27) & 1u) == 0) return r;  // no OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  r.zmm_state = (lo & 0xe6u) == 0xe6u;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return r;
  r.ebx = b;
  r.edx = d;
#endif
  return r;
}

PREFOPT_INLINE Provider find(Gemm16 type) {
  Provider p;
  // PREFOPT_CPU_GEMM16=off: none (for tests of the fallback, and to rule the BLAS out).
  if (mode() == "off") return p;
#ifdef PREFOPT_CPU_GEMM_DLSYM
  const bool bf16 = type == Gemm16::kBFloat16;
  if (bf16) {
    if (void* f = dlsym(RTLD_DEFAULT, "dnnl_gemm_bf16bf16f32")) {
      p.dnnl = reinterpret_cast<DnnlGemm>(f);
      p.name = "oneDNN dnnl_gemm_bf16bf16f32";
      if (self_test(p, type)) return p;
      p = Provider{};
    }
  }
  if (void* f = dlsym(RTLD_DEFAULT, bf16 ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32")) {
    p.cblas = reinterpret_cast<CblasGemm>(f);
    p.name = bf16 ? "MKL cblas_gemm_bf16bf16f32" : "MKL cblas_gemm_f16f16f32";
    if (self_test(p, type)) return p;
    p = Provider{};
  }
#else
  (void)type;
#endif
  return p;
}

PREFOPT_INLINE const Provider& provider(Gemm16 type) {
  // Looked up once per process (thread-safe static initialisation).
  static const Provider bf16 = find(Gemm16::kBFloat16);
  static const Provider f16 = find(Gemm16::kHalf);
  return type == Gemm16::kBFloat16 ? bf16 : f16;
}

}  // namespace gemm16

PREFOPT_INLINE bool fp32_only() { return gemm16::mode() == "off"; }

PREFOPT_INLINE bool forced16() {
  const std::string m = gemm16::mode();
  return m == "blas" || m == "rounded";
}

PREFOPT_INLINE bool fast16(Gemm16 type) {
#ifdef PREFOPT_CPU_GEMM_CPUID
  static const bool bf16 = [] {
    const gemm16::Leaf7 l = gemm16::leaf7();
    // AVX512 F, DQ, BW, VL: EBX bits 16, 17, 30, 31.
    return l.zmm_state && (l.ebx & 0xc0030000u) == 0xc0030000u;
  }();
  static const bool f16 = [] {
    const gemm16::Leaf7 l = gemm16::leaf7();
    return bf16 && ((l.edx >> 23) & 1u) != 0;  // AVX512-FP16: EDX bit 23
  }();
  return type == Gemm16::kBFloat16 ? bf16 : f16;
#else
  (void)type;
  return true;
#endif
}

PREFOPT_INLINE bool mixed_gemm(Gemm16 type, bool trans_a, bool trans_b, int64_t m, int64_t n,
                               int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
                               float beta, float* c, int64_t ldc) {
  const auto& p = gemm16::provider(type);
  if (p.name == nullptr) return false;
  return gemm16::call(p, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

PREFOPT_INLINE const char* mixed_gemm_provider(Gemm16 type) { return gemm16::provider(type).name; }

PREFOPT_INLINE Gemm16Path gemm16_path(Gemm16 type) {
  const auto choose = [](Gemm16 t) {
    const std::string m = gemm16::mode();
    if (m == "rounded") return Gemm16Path::kRounded;
    const auto& p = gemm16::provider(t);  // none with "off"
    if (p.name == nullptr) return Gemm16Path::kFp32Copies;
    if (m == "blas") return Gemm16Path::kBlas;
    // Without AVX-512 no 16-bit GEMM here has fast kernels (libtorch's bf16 mm ran at 10
    // GFLOP/s against 66 for fp32 on 2 cores of an AVX2-only EPYC): fp32 blocks are used.
    if (!fast16(t)) return Gemm16Path::kFp32Copies;
    if (p.dnnl != nullptr) return Gemm16Path::kBlas;
    return t == Gemm16::kBFloat16 && !gemm16::genuine_intel() && gemm16::avx512_bf16()
               ? Gemm16Path::kRounded
               : Gemm16Path::kBlas;
  };
  static const Gemm16Path bf16 = choose(Gemm16::kBFloat16);
  static const Gemm16Path f16 = choose(Gemm16::kHalf);
  return type == Gemm16::kBFloat16 ? bf16 : f16;
}

PREFOPT_INLINE const char* gemm16_path_name(Gemm16 type) {
  switch (gemm16_path(type)) {
    case Gemm16Path::kBlas:
      return mixed_gemm_provider(type);
    case Gemm16Path::kRounded:
      return "rounded (libtorch's 16-bit GEMM per block, summed in fp32)";
    case Gemm16Path::kFp32Copies:
      break;
  }
  return "none (fallback)";  // fp32 copies
}

}  // namespace cpu
}  // namespace detail
}  // namespace v0
}  // namespace prefopt

#undef PREFOPT_CPU_GEMM_DLSYM
#undef PREFOPT_CPU_GEMM_CPUID
