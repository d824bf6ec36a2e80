// SPDX-License-Identifier: Apache-2.0
// CUDA row kernels: one block per logits row, 16-byte loads, fp32 (fp64) accumulation.
#include <prefopt/detail/cuda_row_kernels.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

namespace prefopt {
inline namespace v0 {
namespace detail {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

// std::numeric_limits is host-only without --expt-relaxed-constexpr.
template <typename A>
__device__ __forceinline__ A inf() {
  return static_cast<A>(CUDART_INF);
}
template <typename A>
__device__ __forceinline__ A qnan() {
  return static_cast<A>(CUDART_NAN);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

/// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

/// Splits a row at `p` into a scalar head up to the first 16-byte boundary, whole vectors, and
/// a scalar tail. `head` is the row length when `p` cannot reach an aligned element.
template <typename T>
__device__ __forceinline__ void split_row(const void* p, int64_t V, int64_t& head, int64_t& nvec) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) {
    head = V, nvec = 0;
    return;
  }
  head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
  if (head > V) head = V;
  nvec = (V - head) / kVec<T>;
}

/// Per-thread state of the online pass: running max m, s = Σ e, t = Σ e·(z − m), q = Σ e²
/// with e = exp(z − m), the plain sum and the first argmax.
template <typename A>
struct State {
  A m, s, t, q, sum, best;
  int64_t arg;
  int nan;

  __device__ __forceinline__ void init() {
    m = best = -inf<A>();
    s = t = q = sum = A(0);
    arg = -1;
    nan = 0;
  }

  __device__ __forceinline__ void push(A z, int64_t v) {
    sum += z;  // a NaN logit makes the sum NaN, as in the CPU kernels and ATen
    if (z != z) {
      nan = 1;
      return;
    }
    if (z > best) best = z, arg = v;  // visited in increasing v within a thread
    if (z == -inf<A>()) return;       // p = 0: contributes nothing
    if (z > m) {
      const A a = exp_acc(m - z);  // 0 for the first finite z (m = −inf)
      t = s > A(0) ? a * (t + (m - z) * s) : A(0);
      q *= a * a;
      s *= a;
      m = z;
    }
    const A x = z - m, e = exp_acc(x);
    s += e;
    if (e > A(0)) t += e * x;  // 0·(−large) stays 0
    q += e * e;
  }

  __device__ __forceinline__ void merge(const State& o) {
    nan |= o.nan;
    sum += o.sum;
    if (o.best > best || (o.best == best && o.arg >= 0 && (arg < 0 || o.arg < arg)))
      best = o.best, arg = o.arg;
    const A mm = m > o.m ? m : o.m;
    if (mm == -inf<A>()) return;  // both empty
    const A a1 = s > A(0) ? exp_acc(m - mm) : A(0);
    const A a2 = o.s > A(0) ? exp_acc(o.m - mm) : A(0);
    const A t1 = s > A(0) ? a1 * (t + (m - mm) * s) : A(0);
    const A t2 = o.s > A(0) ? a2 * (o.t + (o.m - mm) * o.s) : A(0);
    t = t1 + t2;
    q = a1 * a1 * q + a2 * a2 * o.q;
    s = a1 * s + a2 * o.s;
    m = mm;
  }

  __device__ __forceinline__ State shfl_down(int d) const {
    State o;
    o.m = __shfl_down_sync(0xffffffffu, m, d);
    o.s = __shfl_down_sync(0xffffffffu, s, d);
    o.t = __shfl_down_sync(0xffffffffu, t, d);
    o.q = __shfl_down_sync(0xffffffffu, q, d);
    o.sum = __shfl_down_sync(0xffffffffu, sum, d);
    o.best = __shfl_down_sync(0xffffffffu, best, d);
    o.arg = __shfl_down_sync(0xffffffffu, arg, d);
    o.nan = __shfl_down_sync(0xffffffffu, nan, d);
    return o;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ logits, int64_t s0, int64_t s1, int64_t V,
                 const int64_t* __restrict__ b, const int64_t* __restrict__ t,
                 const int64_t* __restrict__ target, int64_t n, unsigned flags, StatsOut out) {
  using A = acc_t<T>;
  __shared__ State<A> partial[kWarps];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T* z = logits + b[i] * s0 + t[i] * s1;
    int64_t head, nvec;
    split_row<T>(z, V, head, nvec);
    State<A> st;
    st.init();
    for (int64_t v = threadIdx.x; v < head; v += kThreads) st.push(to_acc(z[v]), v);
    const auto* vz = reinterpret_cast<const Vec<T>*>(z + head);
    for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
      const Vec<T> x = vz[k];
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) st.push(to_acc(x.v[j]), head + k * kVec<T> + j);
    }
    for (int64_t v = head + nvec * kVec<T> + threadIdx.x; v < V; v += kThreads)
      st.push(to_acc(z[v]), v);

#pragma unroll
    for (int d = 16; d > 0; d /= 2) st.merge(st.shfl_down(d));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kWarps; ++w) st.merge(partial[w]);
      const A nan_ = qnan<A>();
      const bool bad = st.nan || !(st.m < inf<A>()) || st.m == -inf<A>();
      const A log_s = log_acc(st.s);
      const A lse = bad ? nan_ : st.m + log_s;
      const int64_t y = target[i];
      static_cast<A*>(out.lse)[i] = lse;
      // (z_y − m) − log S, not z_y − lse: lse's rounding would cost ulp(lse)/2.
      static_cast<A*>(out.logp)[i] = bad ? nan_ : (to_acc(z[y]) - st.m) - log_s;
      if (flags & kLogitSum) static_cast<A*>(out.logit_mean)[i] = st.sum / static_cast<A>(V);
      if (flags & kArgmax) out.correct[i] = !bad && st.arg == y;
      if (flags & kEntropy) static_cast<A*>(out.entropy)[i] = bad ? nan_ : log_s - st.t / st.s;
      if (flags & kLogSumP2)
        static_cast<A*>(out.log_sum_p2)[i] = bad ? nan_ : log_acc(st.q) - A(2) * log_s;
    }
    __syncthreads();  // `partial` is reused by the next row
  }
}

template <typename T>
__device__ __forceinline__ T grad_elem(T z, int64_t v, int64_t y, acc_t<T> lse, acc_t<T> g) {
  using A = acc_t<T>;
  const A p = exp_acc(to_acc(z) - lse);
  return from_acc<T>(g * ((v == y ? A(1) : A(0)) - p));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* logits, int64_t s0, int64_t s1, T* grad, int64_t o0, int64_t o1,
                int64_t rows, int64_t T_, int64_t V, const int64_t* __restrict__ row_of,
                const int64_t* __restrict__ target, const void* lse_p, const void* g_p) {
  using A = acc_t<T>;
  const A* lse = static_cast<const A*>(lse_p);
  const A* gs = static_cast<const A*>(g_p);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t bi = r / T_, ti = r % T_;
    const T* z = logits + bi * s0 + ti * s1;
    T* out = grad + bi * o0 + ti * o1;
    const int64_t i = row_of ? row_of[r] : r;
    const A g = i >= 0 ? gs[i] : A(0);
    int64_t head, nvec;
    split_row<T>(out, V, head, nvec);
    if (g == A(0)) {  // unscored or zero upstream gradient: +0 everywhere
      const T zero = from_acc<T>(A(0));
      for (int64_t v = threadIdx.x; v < head; v += kThreads) out[v] = zero;
      Vec<T> zv;
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) zv.v[j] = zero;
      auto* vo = reinterpret_cast<Vec<T>*>(out + head);
      for (int64_t k = threadIdx.x; k < nvec; k += kThreads) vo[k] = zv;
      for (int64_t v = head + nvec * kVec<T> + threadIdx.x; v < V; v += kThreads) out[v] = zero;
      continue;
    }
    const A l = lse[i];
    const int64_t y = target[i];
    // Vectors only when input and output rows share their alignment (always, in place).
    int64_t zh, zn;
    split_row<T>(z, V, zh, zn);
    if (zh != head) head = V, nvec = 0;
    for (int64_t v = threadIdx.x; v < head; v += kThreads) out[v] = grad_elem(z[v], v, y, l, g);
    const auto* vz = reinterpret_cast<const Vec<T>*>(z + head);
    auto* vo = reinterpret_cast<Vec<T>*>(out + head);
    for (int64_t k = threadIdx.x; k < nvec; k += kThreads) {
      const Vec<T> x = vz[k];
      Vec<T> d;
      const int64_t v0 = head + k * kVec<T>;
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) d.v[j] = grad_elem(x.v[j], v0 + j, y, l, g);
      vo[k] = d;
    }
    for (int64_t v = head + nvec * kVec<T> + threadIdx.x; v < V; v += kThreads)
      out[v] = grad_elem(z[v], v, y, l, g);
  }
}

int64_t grid_for(int64_t rows) { return rows < kMaxBlocks ? rows : kMaxBlocks; }

template <typename T>
int launch_stats(const RowsArgs& r, unsigned flags, const StatsOut& out, cudaStream_t stream) {
  stats_kernel<T><<<static_cast<unsigned>(grid_for(r.n)), kThreads, 0, stream>>>(
      static_cast<const T*>(r.logits), r.stride0, r.stride1, r.V, r.b, r.t, r.target, r.n, flags,
      out);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_grad(const GradArgs& a, cudaStream_t stream) {
  grad_kernel<T><<<static_cast<unsigned>(grid_for(a.rows)), kThreads, 0, stream>>>(
      static_cast<const T*>(a.logits), a.stride0, a.stride1, static_cast<T*>(a.grad), a.out0,
      a.out1, a.rows, a.T, a.V, a.row_of, a.target, a.lse, a.g);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int row_stats(DType dtype, const RowsArgs& rows, unsigned flags, const StatsOut& out,
              void* stream) {
  if (rows.n <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_stats<float>(rows, flags, out, s);
    case DType::kFloat64:
      return launch_stats<double>(rows, flags, out, s);
    case DType::kBFloat16:
      return launch_stats<__nv_bfloat16>(rows, flags, out, s);
    case DType::kFloat16:
      return launch_stats<__half>(rows, flags, out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int row_grad(DType dtype, const GradArgs& args, void* stream) {
  if (args.rows <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad<float>(args, s);
    case DType::kFloat64:
      return launch_grad<double>(args, s);
    case DType::kBFloat16:
      return launch_grad<__nv_bfloat16>(args, s);
    case DType::kFloat16:
      return launch_grad<__half>(args, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int gemm_f32acc(DType ab, void* cublas_handle, bool trans_a, int64_t m, int64_t n, int64_t k,
                const void* A, int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return 0;
  if (ab != DType::kBFloat16 && ab != DType::kFloat16) return CUBLAS_STATUS_INVALID_VALUE;
  const cudaDataType_t t = ab == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float one = 1.0f;
  // Column-major view of the row-major product: Cᵀ [n, m] += Bᵀ [n, k] · op(A)ᵀ [k, m]. The
  // row-major B is Bᵀ column-major (op N); the row-major A [m, k] is Aᵀ column-major (op N),
  // and a row-major A stored [k, m] needs op T.
  return static_cast<int>(cublasGemmEx(
      static_cast<cublasHandle_t>(cublas_handle), CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &one, B, t,
      static_cast<int>(ldb), A, t, static_cast<int>(lda), &one, C, CUDA_R_32F,
      static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace detail
}  // namespace v0
}  // namespace prefopt
