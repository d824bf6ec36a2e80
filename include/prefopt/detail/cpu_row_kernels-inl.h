// SPDX-License-Identifier: Apache-2.0
// CPU row kernels for log-prob gathering: one read for the max, one for the exp sums, fp32
// accumulation (fp64 for fp64 rows), no temporary the size of a row.
//
// Vectorised with GCC/Clang vector extensions at each instruction set's register width (16
// fp32 lanes for AVX-512, 8 for AVX2, 4 for the portable build: SSE2, NEON); on x86-64 each
// entry point is compiled for AVX2+FMA and AVX-512 too and picked once at run time (see
// row_kernel_isa), so the binary runs on any x86-64 and is fast where the instructions exist.
#pragma once
#include <prefopt/detail/cpu_row_kernels.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

// GCC's target_clones("arch=...") dispatches on the CPU model, not its features (an AMD EPYC
// with AVX-512 is never "haswell"), so the dispatch below tests the features themselves.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(PREFOPT_NO_DISPATCH)
#define PREFOPT_X86_DISPATCH 1
#else
#define PREFOPT_X86_DISPATCH 0
#endif
#define PREFOPT_ALWAYS_INLINE inline __attribute__((always_inline))
#define PREFOPT_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

// The kernels pass 64-byte vectors between always-inlined helpers only; GCC's note that such
// a vector's ABI depends on AVX-512 is noise here. GCC emits it at the end of the translation
// unit, so it stays off from here on (in header-only mode, for the rest of the user's file).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cpu {
namespace kernels {

template <typename T>
T neg_inf();
template <>
PREFOPT_ALWAYS_INLINE float neg_inf<float>() {
  return -std::numeric_limits<float>::infinity();
}
template <>
PREFOPT_ALWAYS_INLINE bf16 neg_inf<bf16>() {
  return bf16{0xFF80u};
}
template <>
PREFOPT_ALWAYS_INLINE f16 neg_inf<f16>() {
  return f16{0xFC00u};
}

// One instruction set's kernels, N fp32 lanes per vector: its register width (16 for AVX-512,
// 8 for AVX2, 4 for SSE2 and NEON). GCC lowers wider generic vectors poorly: 16 lanes on AVX2
// kept loop-carried vectors in memory and made every lane comparison a scalar compare, 3.4×
// the native width's time for the max pass (and 1.7-3.1× overall) on an AMD EPYC.
template <int N>
struct Lanes;  // the vector types of N lanes (GCC ignores a vector_size that depends on N)
#define PREFOPT_LANES(N)                                     \
  template <>                                                \
  struct Lanes<N> {                                          \
    typedef float vf __attribute__((vector_size(4 * N)));    \
    typedef int32_t vi __attribute__((vector_size(4 * N)));  \
    typedef uint32_t vu __attribute__((vector_size(4 * N))); \
    typedef uint16_t vh __attribute__((vector_size(2 * N))); \
  };
PREFOPT_LANES(4)
PREFOPT_LANES(8)
PREFOPT_LANES(16)
#undef PREFOPT_LANES

template <int N>
struct Simd {
  static constexpr int W = N;  // lanes per block
  typedef typename Lanes<N>::vf vf;
  typedef typename Lanes<N>::vi vi;
  typedef typename Lanes<N>::vu vu;
  typedef typename Lanes<N>::vh vh;

  // Partial sums live in fp32 lanes for at most 1024 entries before they are flushed into an
  // fp64 total, which bounds the rounding error of a 128K-entry sum to that of 1K entries.
  static constexpr int64_t kFlushBlocks = 1024 / N;

  static PREFOPT_ALWAYS_INLINE vf splat(float x) {
    vf r;
    for (int i = 0; i < W; ++i) r[i] = x;
    return r;
  }
  static PREFOPT_ALWAYS_INLINE vu splatu(uint32_t x) {
    vu r;
    for (int i = 0; i < W; ++i) r[i] = x;
    return r;
  }
  static PREFOPT_ALWAYS_INLINE vu select(vu mask, vu a, vu b) { return (a & mask) | (b & ~mask); }
  static PREFOPT_ALWAYS_INLINE vf selectf(vi mask, vf a, vf b) {
    return (vf)select((vu)mask, (vu)a, (vu)b);
  }
  static PREFOPT_ALWAYS_INLINE vf vmax(vf a, vf b) { return selectf(a > b, a, b); }
  static PREFOPT_ALWAYS_INLINE double hsum(vf v) {
    double s = 0;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  static PREFOPT_ALWAYS_INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static PREFOPT_ALWAYS_INLINE bool any(vi m) {
    int r = 0;
    for (int i = 0; i < W; ++i) r |= m[i];
    return r != 0;
  }

  // exp for x <= 0 (callers subtract the row max or the lse first): Cody-Waite range reduction
  // x = n ln2 + r, a degree-7 polynomial for e^r on |r| <= ln2/2 (≈1 ulp), 2^n from the exponent
  // bits. Underflows to exactly 0 below -87.3 (also for -inf); NaN stays NaN.
  static constexpr float kExpLo = -87.33654475f;
  static PREFOPT_ALWAYS_INLINE vf vexp(vf x) {
    const vf lo = splat(kExpLo);
    vf xc = selectf(x < lo, lo, x);
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = (xc * splat(1.44269504088896341f) + magic) - magic;
    vf r = xc - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    vf y = p * r * r + r + splat(1.0f);
    vi ni = __builtin_convertvector(n, vi);
    vf pow2n = (vf)((vu)(ni + 127) << 23);
    y = y * pow2n;
    return selectf(x < lo, splat(0.0f), y);
  }

  // ---- loading and storing N lanes of each storage type as fp32 ----

  static PREFOPT_ALWAYS_INLINE vf half_bits_to_float(vu h) {
    // IEEE half -> float without branches (denormals handled by a magic-number subtraction).
    const vu w = h << 16;
    const vu sign = w & splatu(0x80000000u);
    const vu two_w = w + w;
    const vf norm = (vf)((two_w >> 4) + splatu(0xE0u << 23)) * splat(0x1.0p-112f);
    const vf denorm = (vf)((two_w >> 17) | splatu(126u << 23)) - splat(0.5f);
    const vu is_denorm = (vu)(two_w < splatu(1u << 27));
    return (vf)(sign | select(is_denorm, (vu)denorm, (vu)norm));
  }
  static PREFOPT_ALWAYS_INLINE vu float_to_half_bits(vf f) {
    // float -> IEEE half, round to nearest even, overflow to inf, NaN to a quiet NaN.
    const vu w = (vu)f;
    const vu shl1_w = w + w;
    const vu sign = w & splatu(0x80000000u);
    vf base = ((vf)(w & splatu(0x7FFFFFFFu)) * splat(0x1.0p+112f)) * splat(0x1.0p-110f);
    vu bias = shl1_w & splatu(0xFF000000u);
    bias = select((vu)(bias < splatu(0x71000000u)), splatu(0x71000000u), bias);
    base = (vf)((bias >> 1) + splatu(0x07800000u)) + base;
    const vu bits = (vu)base;
    const vu nonsign = ((bits >> 13) & splatu(0x00007C00u)) + (bits & splatu(0x00000FFFu));
    return (sign >> 16) | select((vu)(shl1_w > splatu(0xFF000000u)), splatu(0x7E00u), nonsign);
  }

  static PREFOPT_ALWAYS_INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static PREFOPT_ALWAYS_INLINE vf load(const bf16* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static PREFOPT_ALWAYS_INLINE vf load(const f16* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    return half_bits_to_float(__builtin_convertvector(h, vu));
  }
  static PREFOPT_ALWAYS_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
  // The low 16 bits of each lane (every lane < 2¹⁶). For 8 lanes, a shuffle of the 16-bit
  // halves: GCC turns AVX2's __builtin_convertvector from 8 × u32 into lane extractions.
  static PREFOPT_ALWAYS_INLINE vh narrow(vu r) {
#if defined(__clang__) || __GNUC__ >= 12  // __builtin_shufflevector: GCC 12 and clang
    if constexpr (N == 8) {
      typedef uint16_t v16 __attribute__((vector_size(32)));
      return __builtin_shufflevector((v16)r, (v16)r, 0, 2, 4, 6, 8, 10, 12, 14);
    }
#endif
    return __builtin_convertvector(r, vh);
  }
  static PREFOPT_ALWAYS_INLINE void store(bf16* p, vf v) {
    const vu u = (vu)v;
    vu r = (u + splatu(0x7FFFu) + ((u >> 16) & splatu(1u))) >> 16;  // round to nearest even
    r = select((vu)(v != v), splatu(0x7FC0u), r);
    const vh h = narrow(r);
    std::memcpy(p, &h, sizeof h);
  }
  static PREFOPT_ALWAYS_INLINE void store(f16* p, vf v) {
    const vh h = narrow(float_to_half_bits(v));
    std::memcpy(p, &h, sizeof h);
  }

  /// The last V % W entries of a row, padded with -inf (which every pass below treats as absent).
  template <typename T>
  static PREFOPT_ALWAYS_INLINE vf load_tail(const T* p, int64_t n) {
    T buf[W];
    for (int i = 0; i < W; ++i) buf[i] = neg_inf<T>();
    std::memcpy(buf, p, n * sizeof(T));
    return load(buf);
  }
  template <typename T>
  static PREFOPT_ALWAYS_INLINE float to_float(const T* p) {
    return load_tail(p, 1)[0];
  }

  // ---- the row passes, fp32 lanes ----

  template <typename T>
  static PREFOPT_ALWAYS_INLINE RowStats<float> stats_impl(const T* z, int64_t V, int64_t target,
                                                          unsigned flags) {
    RowStats<float> out;
    const int64_t nb = V / W, tail = V - nb * W;
    const bool want_sum = flags & kLogitSum;

    // Pass 1: max, NaN detection and (optionally) the plain sum.
    vf mx = splat(-std::numeric_limits<float>::infinity());
    vi nan = vi{};
    vf acc = splat(0.0f);
    double total = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const vf v = load(z + b * W);
      mx = vmax(mx, v);
      nan |= (v != v);
      if (want_sum) {
        acc += v;
        if ((b + 1) % kFlushBlocks == 0) total += hsum(acc), acc = splat(0.0f);
      }
    }
    if (tail) {
      const vf v = load_tail(z + nb * W, tail);
      mx = vmax(mx, v);
      nan |= (v != v);
      if (want_sum) {  // only the real lanes: a −inf logit makes the sum −inf, as in ATen
        vi lane;
        for (int i = 0; i < W; ++i) lane[i] = i;
        vi n;
        for (int i = 0; i < W; ++i) n[i] = static_cast<int32_t>(tail);
        acc += selectf(lane < n, v, splat(0.0f));
      }
    }
    const float m = hmax(mx);
    if (want_sum) out.logit_sum = static_cast<float>(total + hsum(acc));
    if (target >= 0) out.target = to_float(z + target);
    if (any(nan) || !std::isfinite(m)) {
      const float q = std::numeric_limits<float>::quiet_NaN();
      out.lse = out.logp = out.entropy = out.log_sum_p2 = q;
      return out;
    }
    if (flags & kArgmax) {
      const vf vm = splat(m);
      for (int64_t b = 0; b <= nb && out.argmax < 0; ++b) {
        const int64_t n = b < nb ? W : tail;
        if (n == 0) break;
        const vf v = b < nb ? load(z + b * W) : load_tail(z + b * W, n);
        const vi eq = (v == vm);
        if (any(eq))
          for (int i = 0; i < W; ++i)
            if (eq[i]) {
              out.argmax = b * W + i;
              break;
            }
      }
    }

    // Pass 2: Σ e, Σ e·(z−m) (entropy), Σ e² (WPO), with e = exp(z − m).
    const bool want_ent = flags & kEntropy, want_p2 = flags & kLogSumP2;
    const vf vm = splat(m), lo = splat(kExpLo);
    vf s = splat(0.0f), t = splat(0.0f), w = splat(0.0f);
    double S = 0, Tt = 0, Wt = 0;
    // Inlined like every helper here: a lambda does not inherit the caller's target ISA, and a
    // 64-byte vector passed to an out-of-line generic copy from AVX-512 code arrives garbled.
    auto step = [&](vf v) PREFOPT_ALWAYS_INLINE_LAMBDA {
      const vf x = v - vm;
      const vf e = vexp(x);
      s += e;
      if (want_ent) t += e * selectf(x < lo, lo, x);  // 0·(−inf) would be NaN
      if (want_p2) w += e * e;
    };
    for (int64_t b = 0; b < nb; ++b) {
      step(load(z + b * W));
      if ((b + 1) % kFlushBlocks == 0) {
        S += hsum(s), Tt += hsum(t), Wt += hsum(w);
        s = t = w = splat(0.0f);
      }
    }
    if (tail) step(load_tail(z + nb * W, tail));
    S += hsum(s), Tt += hsum(t), Wt += hsum(w);
    const double log_s = std::log(S);
    out.lse = static_cast<float>(m + log_s);
    // Not z_target − lse: lse rounded to float loses ulp(lse)/2 (2e-3 at logits near 3e4).
    out.logp = static_cast<float>((static_cast<double>(out.target) - m) - log_s);
    if (want_ent) out.entropy = static_cast<float>(log_s - Tt / S);
    if (want_p2) out.log_sum_p2 = static_cast<float>(std::log(Wt) - 2 * log_s);
    return out;
  }

  // f(b) for the blocks b of a row, 16 lanes per step (U vectors, unrolled): the exp chains of
  // a step are independent, which keeps a narrow unit busy (AVX2's bf16 gradient: 77 → 57 ms
  // for 2048 rows of 32,000 on an AMD EPYC).
  template <typename F>
  static PREFOPT_ALWAYS_INLINE void each_block(int64_t nb, F&& f) {
    constexpr int U = N >= 16 ? 1 : 16 / N;
    int64_t b = 0;
    for (; b + U <= nb; b += U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) f(b + u);
    }
    for (; b < nb; ++b) f(b);
  }

  template <typename T>
  static PREFOPT_ALWAYS_INLINE void grad_impl(const T* z, int64_t V, int64_t target, float lse,
                                              float g, float ge, float ent, T* out) {
    const int64_t nb = V / W, tail = V - nb * W;
    // Read before the row is written: `out` may alias `z` (in-place gradients of the fused op).
    const double x_t = target >= 0 ? static_cast<double>(to_float(z + target)) - lse : 0;
    const double p = target >= 0 ? std::exp(x_t) : 0;
    const vf vl = splat(lse);
    if (ge == 0.0f) {  // log-probs only: out_v = −g·p_v
      const vf vg = splat(-g);
      each_block(nb, [&](int64_t b) PREFOPT_ALWAYS_INLINE_LAMBDA {
        store(out + b * W, vg * vexp(load(z + b * W) - vl));
      });
      if (tail) {
        T buf[W];
        store(buf, vg * vexp(load_tail(z + nb * W, tail) - vl));
        std::memcpy(out + nb * W, buf, tail * sizeof(T));
      }
    } else {
      // With the entropy's gradient: out_v = −p_v·(g + ge·(log p_v + H)). log p_v is clamped
      // where p_v underflows to 0 anyway, so that a −inf logit gives 0, not 0·(−inf).
      const vf vc = splat(g + ge * ent), vge = splat(ge), lo = splat(kExpLo);
      const auto term = [&](vf v) PREFOPT_ALWAYS_INLINE_LAMBDA {
        const vf x = v - vl;
        return -(vexp(x) * (vc + vge * selectf(x < lo, lo, x)));
      };
      each_block(nb, [&](int64_t b) PREFOPT_ALWAYS_INLINE_LAMBDA {
        store(out + b * W, term(load(z + b * W)));
      });
      if (tail) {
        T buf[W];
        store(buf, term(load_tail(z + nb * W, tail)));
        std::memcpy(out + nb * W, buf, tail * sizeof(T));
      }
    }
    if (target >= 0) {
      const double d = g * (1.0 - p) - (p > 0 ? ge * p * (x_t + ent) : 0.0);
      T buf[W];
      store(buf, splat(static_cast<float>(d)));
      out[target] = buf[0];
    }
  }

  template <typename T>
  static PREFOPT_ALWAYS_INLINE float sum_impl(const T* z, int64_t V) {
    const int64_t nb = V / W, tail = V - nb * W;
    vf acc = splat(0.0f);
    double total = 0;
    for (int64_t b = 0; b < nb; ++b) {
      acc += load(z + b * W);
      if ((b + 1) % kFlushBlocks == 0) total += hsum(acc), acc = splat(0.0f);
    }
    for (int64_t i = 0; i < tail; ++i) total += to_float(z + nb * W + i);
    return static_cast<float>(total + hsum(acc));
  }
};

// ---- fp64 rows: plain scalar loops, fp64 throughout ----

PREFOPT_INLINE RowStats<double> stats_f64(const double* z, int64_t V, int64_t target,
                                          unsigned flags) {
  RowStats<double> out;
  double m = -std::numeric_limits<double>::infinity(), total = 0;
  bool nan = false;
  for (int64_t v = 0; v < V; ++v) {
    nan |= std::isnan(z[v]);
    if (z[v] > m) m = z[v], out.argmax = v;
    total += z[v];
  }
  if (flags & kLogitSum) out.logit_sum = total;
  if (target >= 0) out.target = z[target];
  if (!(flags & kArgmax)) out.argmax = -1;
  if (nan || !std::isfinite(m)) {
    out.argmax = -1;  // as the fp32/16-bit kernels: such a row's token never counts as correct
    out.lse = out.logp = out.entropy = out.log_sum_p2 = std::numeric_limits<double>::quiet_NaN();
    return out;
  }
  double s = 0, t = 0, w = 0;
  for (int64_t v = 0; v < V; ++v) {
    const double x = z[v] - m, e = std::exp(x);
    s += e;
    if (e > 0) t += e * x;
    w += e * e;
  }
  out.lse = m + std::log(s);
  out.logp = (out.target - m) - std::log(s);
  if (flags & kEntropy) out.entropy = std::log(s) - t / s;
  if (flags & kLogSumP2) out.log_sum_p2 = std::log(w) - 2 * std::log(s);
  return out;
}

}  // namespace kernels
using namespace kernels;  // NOLINT: the vector helpers above, in detail::cpu only

// ---- entry points: one set per instruction-set level, chosen once at run time ----

#define PREFOPT_ROW_ENTRIES(ISA, ATTR, N)                                                     \
  PREFOPT_INLINE ATTR RowStats<float> stats_##ISA(const float* z, int64_t V, int64_t t,       \
                                                  unsigned f) {                               \
    return Simd<N>::stats_impl(z, V, t, f);                                                   \
  }                                                                                           \
  PREFOPT_INLINE ATTR RowStats<float> stats_##ISA(const bf16* z, int64_t V, int64_t t,        \
                                                  unsigned f) {                               \
    return Simd<N>::stats_impl(z, V, t, f);                                                   \
  }                                                                                           \
  PREFOPT_INLINE ATTR RowStats<float> stats_##ISA(const f16* z, int64_t V, int64_t t,         \
                                                  unsigned f) {                               \
    return Simd<N>::stats_impl(z, V, t, f);                                                   \
  }                                                                                           \
  template <typename T>                                                                       \
  ATTR void grad_##ISA(const T* z, int64_t V, int64_t t, float l, float g, float ge, float h, \
                       T* o) {                                                                \
    Simd<N>::grad_impl(z, V, t, l, g, ge, h, o);                                              \
  }                                                                                           \
  template <typename T>                                                                       \
  ATTR float sum_##ISA(const T* z, int64_t V) {                                               \
    return Simd<N>::sum_impl(z, V);                                                           \
  }

namespace kernels {
PREFOPT_ROW_ENTRIES(generic, , 4)
#if PREFOPT_X86_DISPATCH
PREFOPT_ROW_ENTRIES(avx2, __attribute__((target("avx2,fma,f16c"))), 8)
PREFOPT_ROW_ENTRIES(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), 16)
#endif

enum class Isa { generic, avx2, avx512 };
inline constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512"};
PREFOPT_INLINE Isa detect_isa() {
  Isa best = Isa::generic;
#if PREFOPT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    best = Isa::avx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::avx2;
  }
#endif
  // PREFOPT_CPU_ISA picks a lower level, so that every machine can test the generic kernels.
  const char* want = std::getenv("PREFOPT_CPU_ISA");
  if (want != nullptr && *want != '\0') {  // set and not empty
    for (int i = 0; i <= static_cast<int>(best); ++i)
      if (std::strcmp(want, kIsaNames[i]) == 0) return static_cast<Isa>(i);
    std::fprintf(stderr,
                 "prefopt: PREFOPT_CPU_ISA=%s is none of the row kernels' levels this CPU runs "
                 "(generic up to %s); using %s\n",
                 want, kIsaNames[static_cast<int>(best)], kIsaNames[static_cast<int>(best)]);
  }
  return best;
}
// Detected once, on first use (not at static initialisation: other static initialisers, which
// may already run the kernels, can come first).
inline Isa isa() {
  static const Isa detected = detect_isa();
  return detected;
}

#if PREFOPT_X86_DISPATCH
#define PREFOPT_DISPATCH(NAME, ...)       \
  switch (isa()) {                        \
    case Isa::avx512:                     \
      return NAME##_avx512(__VA_ARGS__);  \
    case Isa::avx2:                       \
      return NAME##_avx2(__VA_ARGS__);    \
    default:                              \
      return NAME##_generic(__VA_ARGS__); \
  }
#else
#define PREFOPT_DISPATCH(NAME, ...) return NAME##_generic(__VA_ARGS__);
#endif
}  // namespace kernels

PREFOPT_INLINE const char* row_kernel_isa() { return kIsaNames[static_cast<int>(isa())]; }

template <>
PREFOPT_INLINE RowStats<float> row_stats<float>(const float* z, int64_t V, int64_t t, unsigned f) {
  PREFOPT_DISPATCH(stats, z, V, t, f)
}
template <>
PREFOPT_INLINE RowStats<float> row_stats<bf16>(const bf16* z, int64_t V, int64_t t, unsigned f) {
  PREFOPT_DISPATCH(stats, z, V, t, f)
}
template <>
PREFOPT_INLINE RowStats<float> row_stats<f16>(const f16* z, int64_t V, int64_t t, unsigned f) {
  PREFOPT_DISPATCH(stats, z, V, t, f)
}
template <>
PREFOPT_INLINE RowStats<double> row_stats<double>(const double* z, int64_t V, int64_t t,
                                                  unsigned f) {
  return stats_f64(z, V, t, f);
}

template <>
PREFOPT_INLINE void row_grad<float>(const float* z, int64_t V, int64_t t, float l, float g,
                                    float ge, float h, float* o) {
  PREFOPT_DISPATCH(grad, z, V, t, l, g, ge, h, o)
}
template <>
PREFOPT_INLINE void row_grad<bf16>(const bf16* z, int64_t V, int64_t t, float l, float g, float ge,
                                   float h, bf16* o) {
  PREFOPT_DISPATCH(grad, z, V, t, l, g, ge, h, o)
}
template <>
PREFOPT_INLINE void row_grad<f16>(const f16* z, int64_t V, int64_t t, float l, float g, float ge,
                                  float h, f16* o) {
  PREFOPT_DISPATCH(grad, z, V, t, l, g, ge, h, o)
}
template <>
PREFOPT_INLINE void row_grad<double>(const double* z, int64_t V, int64_t t, double l, double g,
                                     double ge, double h, double* o) {
  // Before `o` (which may alias z) is written.
  const double x_t = t >= 0 ? z[t] - l : 0, p = t >= 0 ? std::exp(x_t) : 0;
  for (int64_t v = 0; v < V; ++v) {
    const double x = z[v] - l, e = std::exp(x);
    o[v] = e == 0 ? 0.0 : -e * (g + ge * (x + h));  // 0, not 0·(−inf), at a −inf logit; NaN stays
  }
  if (t >= 0) o[t] = g * (1.0 - p) - (p > 0 ? ge * p * (x_t + h) : 0.0);
}

template <>
PREFOPT_INLINE float row_sum<float>(const float* z, int64_t V) {
  PREFOPT_DISPATCH(sum, z, V)
}
template <>
PREFOPT_INLINE float row_sum<bf16>(const bf16* z, int64_t V) {
  PREFOPT_DISPATCH(sum, z, V)
}
template <>
PREFOPT_INLINE float row_sum<f16>(const f16* z, int64_t V) {
  PREFOPT_DISPATCH(sum, z, V)
}
template <>
PREFOPT_INLINE double row_sum<double>(const double* z, int64_t V) {
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += z[v];
  return s;
}

PREFOPT_INLINE void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  // Advisory only: on failure (THP off, not a private mapping) the pages are just small.
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
