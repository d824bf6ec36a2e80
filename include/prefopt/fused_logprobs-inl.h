// SPDX-License-Identifier: Apache-2.0
// Fused LM-head log-probs: chunked matmul + row log-softmax over the scored tokens only, with
// a recomputing backward that never holds more than one chunk of logits.
#pragma once
#include <prefopt/fused_logprobs.h>

#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include <prefopt/detail/check_enum.h>
#include <prefopt/detail/cpu_gemm.h>
#include <prefopt/detail/row_common.h>
#include <prefopt/detail/rows.h>

#ifdef PREFOPT_WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <prefopt/detail/cuda_row_kernels.h>
#endif

PREFOPT_BEGIN_NAMESPACE
namespace detail {
namespace fused {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

PREFOPT_INLINE void save_spec(const HeadSpec& spec, AutogradContext* ctx) {
  ctx->saved_data["temperature"] = spec.temperature;
  ctx->saved_data["softcap"] = spec.softcap;
  ctx->saved_data["logit_scale"] = spec.logit_scale;
  ctx->saved_data["backend"] = static_cast<int64_t>(spec.backend);
  ctx->saved_data["chunk_rows"] = spec.chunk_rows;
  ctx->saved_data["chunk_bytes"] = spec.chunk_bytes;
  ctx->saved_data["tile_bytes"] = spec.tile_bytes;
  ctx->saved_data["backward"] = static_cast<int64_t>(spec.backward);
}

PREFOPT_INLINE HeadSpec load_spec(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["temperature"].toDouble(), d["softcap"].toDouble(),
          d["logit_scale"].toDouble(), static_cast<GatherBackend>(d["backend"].toInt()),
          d["chunk_rows"].toInt(),     d["chunk_bytes"].toInt(),
          d["tile_bytes"].toInt(),     static_cast<FusedBackward>(d["backward"].toInt())};
}

/// What the backward pass needs, computed once. `h` holds every row of the batch ([R, H]);
/// `rows` [n] are the scored ones, in the order of `target`, `lse` and `g`.
struct HeadGrads {
  const at::Tensor &h, &rows, &weight, &bias, &target, &lse, &g;
  const at::Tensor &g_ent, &ent;  ///< the entropies' upstream gradient (or undefined), entropies
  bool need_h, need_w, need_b;
  at::ScalarType acc;
  bool upcast;       ///< 16-bit inputs: dh and dW accumulate in fp32 (see add_mm)
  CrossRank* cross;  ///< vocabulary-parallel: dh is summed over the ranks; else nullptr
};

/// The backward pass's blocking: row chunks of `rows` scored tokens × blocks of `cols`
/// vocabulary columns.
struct Tiling {
  int64_t rows, cols;
};

// Why the padding: with the odd row stride of V = 50,257, MKL's sgemm wrote a chunk's logits
// at 122-127 GFLOP/s against 152-157 with the rows 64-byte aligned (1.24× the time); the dh
// and dW GEMMs that read them ran alike at both strides (1024 × 768 × 50,257 per chunk, AMD
// EPYC without AVX-512, 2 threads, torch 2.14; bench/gemm_stride.py, bench/RESULTS.md). CUDA
// buffers stay dense until padding is measured on a GPU.
PREFOPT_INLINE int64_t buffer_stride(int64_t cols, at::ScalarType st, const at::Device& device) {
  if (!device.is_cpu()) return cols;
  const int64_t unit = std::max<int64_t>(1, 64 / static_cast<int64_t>(at::elementSize(st)));
  return (cols + unit - 1) / unit * unit;
}

PREFOPT_INLINE int64_t block_columns(int64_t cols, int64_t V, at::ScalarType st,
                                     const at::Device& device) {
  const int64_t unit = buffer_stride(1, st, device);
  return cols >= V ? V : cols > unit ? cols - cols % unit : cols;
}

PREFOPT_INLINE int64_t block_stride(int64_t cols, int64_t V, at::ScalarType st,
                                    const at::Device& device) {
  return cols < V ? cols : buffer_stride(V, st, device);
}

PREFOPT_INLINE at::Tensor buffer_rows(const at::Tensor& buffer, int64_t r0, int64_t m, int64_t cols,
                                      int64_t ld) {
  TORCH_INTERNAL_ASSERT(cols <= ld && (r0 + m) * ld <= buffer.numel(), "buffer_rows: ", m,
                        " rows of ", cols, " from row ", r0, " of a ", buffer.numel(),
                        "-entry buffer with rows ", ld, " apart");
  return buffer.as_strided({m, cols}, {ld, 1}, buffer.storage_offset() + r0 * ld);
}

/// Bytes per row of the chunk buffers, forward and backward (see FusedLogprobsOptions). Not
/// counted: the gathered hidden row, small beside the logits, and the padding of a row to 64
/// bytes (`buffer_stride`), under 64 bytes a row per buffer.
PREFOPT_INLINE int64_t bytes_per_row(int64_t V, at::ScalarType st, bool softcap) {
  return V * static_cast<int64_t>(at::elementSize(st)) * (softcap ? 2 : 1);
}

/// x itself if it is row-major with a leading dimension of at least one row (what BLAS takes
/// as it is, e.g. a column slice of a buffer), else a dense copy.
PREFOPT_INLINE at::Tensor row_major(const at::Tensor& x) {
  return x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, x.size(1)) ? x : x.contiguous();
}

/// The leading dimension to hand BLAS for a row-major x: its row stride, or (one row, whose
/// stride ATen leaves arbitrary, even for a "contiguous" tensor) the row length.
PREFOPT_INLINE int64_t leading_dim(const at::Tensor& x) {
  return x.size(0) > 1 ? x.stride(0) : std::max<int64_t>(1, x.size(1));
}

/// c [m, n] (fp32, row-major) += op(a) · b for 16-bit a, b on CUDA: op(a) = aᵀ for a [k, m]
/// when `trans_a`, else a [m, k]; fp32 accumulation inside one cuBLAS call. Row-major operands
/// with a leading dimension (column slices of the logits) go in as they are, without a copy.
PREFOPT_INLINE void gemm_f32acc(at::Tensor& c, const at::Tensor& a, bool trans_a,
                                const at::Tensor& b) {
#ifdef PREFOPT_WITH_CUDA_KERNELS
  namespace kg = prefopt::detail::cuda;
  // The handle (and the stream bound to it) of the operands' device, not the current one: the
  // one-pass losses run this in forward, where the host's current device may be another GPU.
  const c10::cuda::CUDAGuard guard(c.device());
  const auto ac = row_major(a), bc = row_major(b);
  TORCH_INTERNAL_ASSERT(c.scalar_type() == at::kFloat && c.stride(1) == 1 &&
                        leading_dim(c) >= std::max<int64_t>(1, c.size(1)));
  TORCH_INTERNAL_ASSERT(b.scalar_type() == a.scalar_type() && a.device() == c.device() &&
                        b.device() == c.device());
  const int64_t m = c.size(0), n = c.size(1), k = bc.size(0);
  // cuBLAS takes int sizes and leading dimensions.
  constexpr int64_t kInt = std::numeric_limits<int>::max();
  TORCH_INTERNAL_ASSERT(m <= kInt && n <= kInt && k <= kInt && leading_dim(ac) <= kInt &&
                            leading_dim(bc) <= kInt && leading_dim(c) <= kInt,
                        "gemm_f32acc: a dimension beyond cuBLAS's int range");
  const int code = kg::gemm_f32acc(
      a.scalar_type() == at::kBFloat16 ? kg::DType::kBFloat16 : kg::DType::kFloat16,
      at::cuda::getCurrentCUDABlasHandle(), trans_a, m, n, k, ac.data_ptr(), leading_dim(ac),
      bc.data_ptr(), leading_dim(bc), c.data_ptr<float>(), leading_dim(c));
  TORCH_CHECK(code == 0, "prefopt: cublasGemmEx for a gradient failed with status ", code);
#else
  (void)c, (void)a, (void)trans_a, (void)b;
  TORCH_INTERNAL_ASSERT(false, "mixed-precision GEMM without CUDA kernels");
#endif
}

PREFOPT_INLINE bool col_major(const at::Tensor& x) {
  if (x.dim() != 2) return false;
  // ATen's CPU GEMM rule for a row-major output (all the fused ops write): row-major if rows
  // are dense with a leading dimension of at least a row, else column-major likewise, else
  // it multiplies a row-major copy.
  const auto rows_ok = [&](int d) {
    return x.stride(1 - d) == 1 && x.stride(d) >= std::max<int64_t>(1, x.size(1 - d));
  };
  return !rows_ok(0) && rows_ok(1);
}

PREFOPT_INLINE void mm_fp32_blocks(at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
                                   bool accumulate, const at::Tensor& bias) {
  const int64_t m = c.size(0), n = c.size(1), k = a.size(1);
  TORCH_INTERNAL_ASSERT(a.size(0) == m && b.size(0) == k && b.size(1) == n,
                        "mm_fp32_blocks: shapes ", a.sizes(), " · ", b.sizes(), " → ", c.sizes());
  TORCH_INTERNAL_ASSERT(!bias.defined() || (!accumulate && bias.dim() == 1 && bias.size(0) == n),
                        "mm_fp32_blocks: a bias of ", n, " entries, with accumulate false");
  const bool direct = c.scalar_type() == at::kFloat;
  if (!accumulate && (direct || k == 0)) {
    if (bias.defined()) {
      c.copy_(bias.unsqueeze(0).expand({m, n}));
    } else {
      c.zero_();
    }
  }
  if (m == 0 || n == 0 || k == 0) return;
  // Blocks of 16 MiB in fp32: all of k where that leaves room for at least 1024 columns of b
  // (the logits: k = H), else blocks of k of at least 4096 over all of n (dh: k = V, n = H).
  constexpr int64_t kFloats = int64_t{4} << 20;
  const int64_t kb = std::min(k, std::max<int64_t>(kFloats / 1024, kFloats / n));
  const int64_t nb = std::clamp<int64_t>(kFloats / kb, 1, n);
  const int64_t mb = std::clamp<int64_t>(kFloats / std::max(kb, nb), 1, m);
  // Copied in the operand's own layout (a column-major block as its transpose's rows).
  const auto f32 = [](const at::Tensor& x) {
    return col_major(x) ? x.t().to(at::kFloat).t() : x.to(at::kFloat);
  };
  const auto block = [](const at::Tensor& x, int64_t r0, int64_t r, int64_t c0, int64_t cn) {
    return x.narrow(0, r0, r).narrow(1, c0, cn);
  };
  const auto bias32 = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
  at::Tensor acc = direct ? at::Tensor() : at::empty({mb, nb}, c.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < n; n0 += nb) {
    const int64_t nr = std::min(nb, n - n0);
    if (direct) {  // c is the fp32 accumulator: b's block is copied once
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        const int64_t kr = std::min(kb, k - k0);
        const auto b32 = f32(block(b, k0, kr, n0, nr));
        for (int64_t m0 = 0; m0 < m; m0 += mb) {
          const int64_t mr = std::min(mb, m - m0);
          block(c, m0, mr, n0, nr).addmm_(f32(block(a, m0, mr, k0, kr)), b32);
        }
      }
      continue;
    }
    // A 16-bit c: each block summed in fp32 over all of k, then rounded once.
    const auto b_all = kb == k ? f32(block(b, 0, k, n0, nr)) : at::Tensor();
    for (int64_t m0 = 0; m0 < m; m0 += mb) {
      const int64_t mr = std::min(mb, m - m0);
      auto t = acc.narrow(0, 0, mr).narrow(1, 0, nr);
      auto cb = block(c, m0, mr, n0, nr);
      if (accumulate) {
        t.copy_(cb);
      } else if (bias32.defined()) {
        t.copy_(bias32.narrow(0, n0, nr).unsqueeze(0).expand({mr, nr}));
      } else {
        t.zero_();
      }
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        const int64_t kr = std::min(kb, k - k0);
        t.addmm_(f32(block(a, m0, mr, k0, kr)),
                 b_all.defined() ? b_all : f32(block(b, k0, kr, n0, nr)));
      }
      cb.copy_(t);
    }
  }
}

PREFOPT_INLINE bool cpu_mm16_serves(at::ScalarType st, const at::Tensor& a, const at::Tensor& b) {
  // libtorch's CPU GEMM runs products of at most 16³ multiply-adds in its reference loops, not
  // oneDNN, and Debian's 1.13 sums those in 16 bits where it reads b row-major, also on CPUs
  // whose 8 × 2048 × 8 check passes (test_fused_logprobs, SixteenBitTinyProductsSumInFp32).
  return a.size(0) * a.size(1) * b.size(1) > 16 * 16 * 16 &&
         cpu_mm16_usable(st, col_major(a), col_major(b));
}

/// c += op(a) · b with op(a) = aᵀ when `trans_a`. For operands in c's dtype, one addmm. For
/// 16-bit operands and an fp32 `c` (a gradient accumulating over chunks or blocks): on CUDA,
/// one cuBLAS GEMM with fp32 accumulation and output; on CPU, where `cpu_mm16_fast` allows
/// 16-bit GEMMs, `cpu::gemm16_path` decides:
/// the process's oneDNN or MKL GEMM with fp32 output, libtorch's 16-bit GEMM on 16 MiB row
/// blocks of c rounded once per block and summed in fp32 (where MKL's 16-bit GEMM is slow;
/// not when `exact`), or `mm_fp32_blocks` (fp32 copies of blocks of at most 16 MiB). No
/// whole-matrix copy.
PREFOPT_INLINE void add_mm(at::Tensor& c, const at::Tensor& a, bool trans_a, const at::Tensor& b,
                           bool exact) {
  if (c.scalar_type() == a.scalar_type()) {
    c.addmm_(trans_a ? a.t() : a, b);
    return;
  }
  TORCH_INTERNAL_ASSERT(c.scalar_type() == at::kFloat && c.stride(1) == 1);
  if (a.is_cuda() && has_cuda_kernels()) {
    gemm_f32acc(c, a, trans_a, b);
    return;
  }
  const auto ac = row_major(a);
  const auto bc = row_major(b);
  const int64_t m = c.size(0), n = c.size(1), k = bc.size(0);
  const auto type = a.scalar_type() == at::kBFloat16 ? cpu::Gemm16::kBFloat16 : cpu::Gemm16::kHalf;
  const auto path = a.is_cpu() && cpu_mm16_fast(a.scalar_type()) ? cpu::gemm16_path(type)
                                                                 : cpu::Gemm16Path::kFp32Copies;
  if (path == cpu::Gemm16Path::kBlas &&
      cpu::mixed_gemm(type, trans_a, /*trans_b=*/false, m, n, k, ac.data_ptr(), leading_dim(ac),
                      bc.data_ptr(), leading_dim(bc), 1.0f, c.data_ptr<float>(), leading_dim(c)))
    return;
  const auto op_a = trans_a ? ac.t() : ac;
  if (path == cpu::Gemm16Path::kRounded && !exact && a.is_cpu() &&
      cpu_mm16_serves(a.scalar_type(), op_a, bc)) {
    // Row blocks of c, so the 16-bit product buffer stays at 16 MiB.
    const int64_t rows = std::clamp<int64_t>((int64_t{8} << 20) / std::max<int64_t>(n, 1), 1,
                                             std::max<int64_t>(m, 1));
    auto product = at::empty({rows, n}, a.options());
    // The sum in pieces of 1 MiB of c: ATen's CPU add_ with a 16-bit operand and an fp32
    // result first copies that operand to fp32, which for a whole block is 32 MiB more.
    const int64_t piece = std::max<int64_t>((int64_t{1} << 18) / std::max<int64_t>(n, 1), 1);
    for (int64_t r0 = 0; r0 < m; r0 += rows) {
      const int64_t r = std::min(rows, m - r0);
      auto p = product.narrow(0, 0, r);
      at::mm_out(p, op_a.narrow(0, r0, r), bc);
      for (int64_t s = 0; s < r; s += piece) {
        const int64_t q = std::min(piece, r - s);
        c.narrow(0, r0 + s, q).add_(p.narrow(0, s, q));
      }
    }
    return;
  }
  mm_fp32_blocks(c, op_a, bc, /*accumulate=*/true);
}

PREFOPT_INLINE void set_mm(at::Tensor& c, const at::Tensor& a, bool trans_a, const at::Tensor& b) {
  const auto st = c.scalar_type();
  const auto op_a = trans_a ? a.t() : a;
  if (!c.is_cpu() || (st != at::kBFloat16 && st != at::kHalf) || cpu_mm16_serves(st, op_a, b)) {
    at::mm_out(c, op_a, b);
    return;
  }
  mm_fp32_blocks(c, op_a, b, /*accumulate=*/false);
}

PREFOPT_INLINE DwAccumulator::DwAccumulator(int64_t V, int64_t H, const at::TensorOptions& fp32) {
  // ⌈V/2⌉ rounded up to 8 rows, so that the bottom half's column slice of the logits starts
  // 16-byte aligned where the rows do (cuBLAS's tensor-core kernels want it); at most 15·H
  // 16-bit slots to spare.
  const int64_t v_top = std::min(V, ((V + 1) / 2 + 7) / 8 * 8);
  top_ = at::zeros({v_top, H}, fp32);
  bottom_ = at::zeros({V - v_top, H}, fp32);
}

PREFOPT_INLINE void DwAccumulator::add(int64_t v0, const at::Tensor& z, const at::Tensor& h) {
  const int64_t vb = z.size(1), v_top = top_.size(0);
  const int64_t in_top = std::clamp<int64_t>(v_top - v0, 0, vb);
  if (in_top > 0) {
    auto c = top_.narrow(0, v0, in_top);
    add_mm(c, z.narrow(1, 0, in_top), /*trans_a=*/true, h);
  }
  if (in_top < vb) {
    auto c = bottom_.narrow(0, v0 + in_top - v_top, vb - in_top);
    add_mm(c, z.narrow(1, in_top, vb - in_top), /*trans_a=*/true, h);
  }
}

PREFOPT_INLINE at::Tensor DwAccumulator::finish(at::ScalarType st) {
  const int64_t v_top = top_.size(0), v_bottom = bottom_.size(0), H = top_.size(1);
  TORCH_INTERNAL_ASSERT(at::elementSize(st) == 2, "DwAccumulator: a 16-bit result");
  // 2·v_top·H 16-bit slots over the top half's bytes. Block [r0, r0 + r) is cast into a
  // temporary first and lands in bytes [2·r0·H, 2·(r0 + r)·H), before the first fp32 row still
  // unread (byte 4·(r0 + r)·H). Blocks: 2 MiB of the result on CPU (in cache), 64 MiB on CUDA
  // (few launches; the caching allocator reuses the temporary).
  const auto slots = top_.view(st).view({-1});
  const int64_t block_bytes = top_.is_cpu() ? int64_t{2} << 20 : int64_t{64} << 20;
  const int64_t rows = std::clamp<int64_t>(block_bytes / (2 * std::max<int64_t>(H, 1)), 1,
                                           std::max<int64_t>(v_top, 1));
  for (int64_t r0 = 0; r0 < v_top; r0 += rows) {
    const int64_t r = std::min(rows, v_top - r0);
    const auto part = top_.narrow(0, r0, r).to(st);
    slots.narrow(0, r0 * H, r * H).copy_(part.view({-1}));
  }
  if (v_bottom > 0) slots.narrow(0, v_top * H, v_bottom * H).view({v_bottom, H}).copy_(bottom_);
  const at::Tensor out = slots.narrow(0, 0, (v_top + v_bottom) * H).view({v_top + v_bottom, H});
  top_ = bottom_ = at::Tensor();
  return out;
}

/// Bytes per vocabulary column of the kVocabBlocks backward buffers for n scored tokens.
PREFOPT_INLINE int64_t bytes_per_column(int64_t n, at::ScalarType st, bool softcap) {
  return n * static_cast<int64_t>(at::elementSize(st)) * (softcap ? 2 : 1);
}

/// The kTiles blocking within `budget` bytes. Per row: the gathered hidden row and its `dh`
/// accumulator; per logit: the tile, and a second one with softcapping. Rows come first, as
/// many as fit beside blocks of 512 columns: every row chunk reads W twice and updates dW
/// once, so fewer, taller chunks move less memory.
PREFOPT_INLINE Tiling tiles_within(int64_t budget, int64_t n, int64_t V, int64_t H,
                                   at::ScalarType st, bool softcap) {
  const int64_t e = static_cast<int64_t>(at::elementSize(st));
  const int64_t acc = static_cast<int64_t>(at::elementSize(acc_type(st)));
  const int64_t per_row = H * (e + acc);
  const int64_t per_logit = e * (softcap ? 2 : 1);
  const int64_t rows =
      std::clamp<int64_t>(budget / (per_row + 512 * per_logit), 1, std::max<int64_t>(n, 1));
  return {rows, std::clamp<int64_t>((budget / rows - per_row) / per_logit, 1, V)};
}

/// z ← f(z) in place, f(x) = cap · tanh(s · x / cap) / T (s · x / T without a softcap): the
/// order of the models (Cohere's `logit_scale`, Gemma-2's softcap in the forward) and of TRL's
/// sampling temperature after them, each step the models' own operation (× s, ÷ cap, ÷ T), so
/// that s = 1 keeps the results of the version without it. With a softcap, `dydx` (a buffer
/// like z, or undefined) receives f'(x) = (s / T) · sech²(s · x / cap), formed from x: from the
/// rounded f(x), 1 − tanh² cancels where the cap saturates (and a 16-bit bound cap / T that
/// rounds above itself would make it negative). In 16 bits a softcap goes through fp32 blocks
/// (two with `dydx`, one without; 2 MiB on CPU and 16 MiB on CUDA, or one row where a row is
/// larger; beside the budget), so f(x) and f'(x) are rounded once to the buffer's dtype, as x
/// was by the GEMM; a lone × s or ÷ T rounds once.
PREFOPT_INLINE void transform_logits(at::Tensor& z, const HeadSpec& spec, at::Tensor dydx = {}) {
  const double s = spec.logit_scale, T = spec.temperature, cap = spec.softcap;
  const bool half = z.element_size() == 2;
  if (cap <= 0) {
    if (half && s != 1.0 && T != 1.0) {
      z.mul_(s / T);
    } else {
      if (s != 1.0) z.mul_(s);
      if (T != 1.0) z.div_(T);
    }
    return;
  }
  // y ← cap·tanh(s·y/cap)/T in place; with `d`, also d ← (s/T)·sech²(u), u = s·y/cap formed in
  // the scratch `u` (which may be d itself).
  const auto apply = [&](at::Tensor& y, at::Tensor u, const at::Tensor& d) {
    if (!d.defined()) {
      if (s != 1.0) y.mul_(s);
      y.div_(cap).tanh_().mul_(cap);
    } else {
      u.copy_(y);
      if (s != 1.0) u.mul_(s);
      u.div_(cap);
      at::tanh_out(y, u).mul_(cap);
      u.cosh_().pow_(-2);
      if (s / T != 1.0) u.mul_(s / T);
      if (!u.is_same(d)) d.copy_(u);
    }
    if (T != 1.0) y.div_(T);
  };
  if (!half) return apply(z, dydx, dydx);
  if (z.numel() == 0) return;
  const int64_t block = (z.is_cpu() ? int64_t{2} : int64_t{16}) << 20;  // bytes of fp32
  const int64_t m = std::max<int64_t>(1, block / (4 * z.size(1)));
  for (int64_t r0 = 0; r0 < z.size(0); r0 += m) {
    const int64_t mr = std::min(m, z.size(0) - r0);
    auto rows = z.narrow(0, r0, mr);
    auto y = rows.to(at::kFloat);
    if (dydx.defined())
      apply(y, at::empty_like(y), dydx.narrow(0, r0, mr));
    else
      apply(y, {}, {});
    rows.copy_(y);
  }
}

/// z ← f(h_c · Wᵀ + b) into `z` (a reused [c, V] buffer), and f' into `dydx` when it is
/// defined (see transform_logits).
PREFOPT_INLINE void chunk_logits(const at::Tensor& h_c, const at::Tensor& weight,
                                 const at::Tensor& bias, const HeadSpec& spec, at::Tensor& z,
                                 const at::Tensor& dydx) {
  const auto st = z.scalar_type();
  if (z.is_cpu() && (st == at::kBFloat16 || st == at::kHalf) &&
      !cpu_mm16_serves(st, h_c, weight.t())) {
    mm_fp32_blocks(z, h_c, weight.t(), /*accumulate=*/false, bias);
  } else if (bias.defined()) {
    at::addmm_out(z, bias, h_c, weight.t());
  } else {
    at::mm_out(z, h_c, weight.t());
  }
  transform_logits(z, spec, dydx);
}

PREFOPT_INLINE Rows identity_rows(const at::Tensor& target_c) {
  const int64_t c = target_c.size(0);
  const auto opts = target_c.options().dtype(at::kLong);
  return Rows{at::zeros({c}, opts), at::arange(c, opts), target_c, {}};
}

PREFOPT_INLINE void logits_grad(at::Tensor& z, const at::Tensor& target_b, const at::Tensor& lse,
                                const at::Tensor& g, const at::Tensor& g_ent, const at::Tensor& ent,
                                const HeadSpec& spec, const at::Tensor& dydx) {
  const double s = spec.logit_scale, T = spec.temperature;
  auto z3 = z.unsqueeze(0);
  // The row kernels need no temporaries; the ATen path (kATen, CUDA without the row kernels,
  // and a gradient through the entropies on CUDA, whose kernels have no entropy term) keeps
  // its fp32 row buffers within the budget.
  rows_backward(z3, identity_rows(target_b), lse, g, g_ent, ent, spec.backend, spec.chunk_bytes,
                z3);  // z ← dL/dy
  if (spec.softcap > 0) {
    z.mul_(dydx);  // f'(x), from chunk_logits
  } else if (s == 1.0 && T != 1.0) {
    z.div_(T);
  } else if (s / T != 1.0) {
    z.mul_(s / T);
  }
}

/// The forward pass over all chunks: per-row log-probs, logsumexp and statistics of the
/// scored `rows` of `h` [R, H], gathered chunk by chunk into a reused buffer.
PREFOPT_INLINE RowResults head_forward(const at::Tensor& h, const at::Tensor& rows,
                                       const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& target, unsigned flags,
                                       const HeadSpec& spec) {
  const int64_t n = rows.size(0), V = weight.size(0), c = std::min(spec.chunk_rows, n);
  RowResults r = alloc_row_results(n, flags, h.options().dtype(acc_type(h.scalar_type())));
  const int64_t ld = buffer_stride(V, h.scalar_type(), h.device());
  at::Tensor buffer = at::empty({c * ld}, h.options());
  at::Tensor h_buffer = at::empty({c, h.size(1)}, h.options());
  for (int64_t s = 0; s < n; s += c) {
    const int64_t e = std::min(n, s + c);
    auto z = buffer_rows(buffer, 0, e - s, V, ld);
    auto h_c = h_buffer.narrow(0, 0, e - s);
    at::index_select_out(h_c, h, 0, rows.slice(0, s, e));
    chunk_logits(h_c, weight, bias, spec, z);
    RowResults out = slice_rows(r, s, e);
    rows_forward_into(z.unsqueeze(0), identity_rows(target.slice(0, s, e)), flags, spec.backend,
                      spec.chunk_bytes, out);  // the ATen path's temporaries within the budget
  }
  return r;
}

// Saves the inputs (no copies: the hidden states of every row, not a compacted copy) and one
// logsumexp (and entropy, when asked for: its gradient flows back too) per scored row. With `cross`
// (the vocabulary-parallel form) `weight` is this rank's slice of the head, the per-row results are
// reduced over the ranks, and backward sums the hidden states' gradient over them.
struct FusedHeadFunction : public torch::autograd::Function<FusedHeadFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& rows,
                               const at::Tensor& target, int64_t flags, const HeadSpec& spec,
                               const CrossRankPtr& cross, const char* fn) {
    // `bias` is a [0] placeholder when the head has none: autograd inputs must be defined.
    const at::Tensor b = bias.numel() > 0 ? bias : at::Tensor();
    RowResults r;
    at::Tensor saved_target = target;
    if (cross) {
      // Per-shard entropies would be wrong, and so would their gradient: never asked for.
      TORCH_INTERNAL_ASSERT(!(flags & kEntropy), "vocabulary-parallel entropies");
      const auto st = slice_targets(target, weight.size(0));
      r = head_forward(h, rows, weight, b, st.forward, static_cast<unsigned>(flags), spec);
      cross->reduce_rows(r.lse, r.logp, st.owned);
      saved_target = st.backward;
    } else {
      r = head_forward(h, rows, weight, b, target, static_cast<unsigned>(flags), spec);
    }
    ctx->save_for_backward({h, weight, bias, rows, saved_target, r.lse, r.entropy});
    ctx->saved_data["cross"] = cross_rank_ivalue(cross);
    ctx->saved_data["fn"] = std::string(fn);
    save_spec(spec, ctx);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(detached_statistics(r, static_cast<unsigned>(flags)));
    return {r.logp, r.logit_mean, r.correct, r.entropy, r.log_sum_p2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &weight = saved[1], &rows = saved[3], &target = saved[4],
                     &lse = saved[5];
    const at::Tensor bias = saved[2].numel() > 0 ? saved[2] : at::Tensor();
    const auto up = row_upstream(grads[0], grads[3], lse);
    if (!up.g.defined()) return result({}, {}, {});
    // The gradients are formed in reused buffers by out= GEMMs and row kernels, which autograd
    // does not record: a graph of them would be wrong, or fail inside ATen without our name.
    TORCH_CHECK(!at::GradMode::is_enabled(), ctx->saved_data["fn"].toStringRef(),
                ": double backward (create_graph) is not supported: the gradients are computed "
                "outside autograd");
    const HeadSpec spec = load_spec(ctx);
    const auto acc = acc_type(h.scalar_type());
    const CrossRankPtr cross = cross_rank_of(ctx->saved_data["cross"]);
    const HeadGrads hg{h,
                       rows,
                       weight,
                       bias,
                       target,
                       lse,
                       up.g,
                       up.g_ent,
                       saved[6],
                       ctx->needs_input_grad(0),
                       ctx->needs_input_grad(1),
                       bias.defined() && ctx->needs_input_grad(2),
                       acc,
                       acc != h.scalar_type(),
                       cross.get()};
    return backward_tiles(hg, spec, tiling(hg, spec));
  }

  /// The blocking that `spec.backward` asks for (see FusedBackward).
  static Tiling tiling(const HeadGrads& a, const HeadSpec& spec) {
    const int64_t n = a.rows.size(0), V = a.weight.size(0), H = a.weight.size(1);
    const auto st = a.h.scalar_type();
    const bool cap = spec.softcap > 0;
    auto mode = spec.backward;
    if (mode == FusedBackward::kAuto)
      mode = !a.upcast ? FusedBackward::kTiles
             : n <= V  ? FusedBackward::kVocabBlocks
                       : FusedBackward::kTokenChunks;
    const auto aligned = [&](Tiling t) {
      return Tiling{t.rows, block_columns(t.cols, V, st, a.h.device())};
    };
    if (mode == FusedBackward::kTiles)
      return aligned(tiles_within(spec.tile_bytes, n, V, H, st, cap));
    if (mode == FusedBackward::kVocabBlocks) {
      const int64_t per_col = std::max<int64_t>(1, bytes_per_column(n, st, cap));
      if (spec.chunk_bytes >= per_col) return aligned({n, std::min(V, spec.chunk_bytes / per_col)});
    }
    return {spec.chunk_rows, V};  // token chunks, also when one column of every row won't fit
  }

  static variable_list result(at::Tensor dh, at::Tensor dw, at::Tensor db) {
    return {std::move(dh), std::move(dw), std::move(db), {}, {}, {}, {}, {}, {}};
  }

  /// Row chunks × vocabulary blocks, one reused tile buffer. Per row chunk, its hidden rows are
  /// gathered and `dh` accumulates across the blocks (fp32 for 16-bit inputs; written
  /// directly when one block spans V, unless it is summed over the ranks next: rounded once,
  /// after that sum), then lands in the [R, H] gradient. The weight and bias
  /// gradients: with one row chunk, each block's is one GEMM over every scored token (fp32
  /// accumulation inside it, rounded once, no [V, H] accumulator); with several, they
  /// accumulate in place for fp32/fp64 weights and in a DwAccumulator for 16-bit ones,
  /// cast once at the end.
  static variable_list backward_tiles(const HeadGrads& a, const HeadSpec& spec, Tiling t) {
    const int64_t n = a.rows.size(0), V = a.weight.size(0), H = a.weight.size(1);
    const auto opt = [](bool need, const at::Tensor& x) {
      return need ? at::zeros_like(x) : at::Tensor();
    };
    if (n == 0) return result(opt(a.need_h, a.h), opt(a.need_w, a.weight), opt(a.need_b, a.bias));
    const int64_t c = std::min(t.rows, n), cols = std::min(t.cols, V);
    const bool one_chunk = c == n, one_block = cols == V;
    // dh in the inputs' dtype at once with one block, unless 16-bit partials are summed over
    // the ranks next: those stay fp32 (no 16-bit product either), rounded once after the sum.
    const bool dh_direct = one_block && (a.cross == nullptr || !a.upcast);
    const auto acc_opts = a.h.options().dtype(a.acc);
    // 16-bit weights over several row chunks: an fp32 accumulator, cast in its own storage.
    std::optional<DwAccumulator> dw_acc;
    at::Tensor dw;
    if (a.need_w && !one_chunk && a.upcast) {
      dw_acc.emplace(V, H, acc_opts);
    } else if (a.need_w) {
      dw = one_chunk ? at::empty({V, H}, a.weight.options()) : at::zeros({V, H}, acc_opts);
    }
    at::Tensor db = a.need_b ? at::zeros({V}, acc_opts) : at::Tensor();
    at::Tensor dh;  // [R, H]: allocated once the first chunk is done (after the tiles with one)
    // Vocabulary-parallel: the scored rows' dh, summed over the ranks before it lands in dh.
    at::Tensor dh_rows =
        a.need_h && a.cross != nullptr ? at::empty({n, H}, acc_opts) : at::Tensor();
    at::Tensor h_buffer = at::empty({c, H}, a.h.options());
    at::Tensor dh_buffer =
        a.need_h ? at::empty({c, H}, dh_direct ? a.h.options() : acc_opts) : at::Tensor();
    const int64_t ld = block_stride(cols, V, a.h.scalar_type(), a.h.device());
    at::Tensor buffer = at::empty({c * ld}, a.h.options());
    at::Tensor cap_buffer = spec.softcap > 0 ? at::empty_like(buffer) : at::Tensor();
    const auto outside = at::full({}, -1, a.target.options());
    for (int64_t s = 0; s < n; s += c) {
      const int64_t e = std::min(n, s + c), m = e - s;
      const auto rows_c = a.rows.slice(0, s, e), target_c = a.target.slice(0, s, e);
      auto h_c = h_buffer.narrow(0, 0, m);
      at::index_select_out(h_c, a.h, 0, rows_c);
      auto dh_c = a.need_h ? dh_buffer.narrow(0, 0, m) : at::Tensor();
      if (a.need_h && !dh_direct) dh_c.zero_();
      for (int64_t v0 = 0; v0 < V; v0 += cols) {
        const int64_t vb = std::min(V, v0 + cols) - v0;
        const auto w_b = a.weight.narrow(0, v0, vb);
        auto z = buffer_rows(buffer, 0, m, vb, ld);
        const auto cap = spec.softcap > 0 ? buffer_rows(cap_buffer, 0, m, vb, ld) : at::Tensor();
        chunk_logits(h_c, w_b, a.bias.defined() ? a.bias.narrow(0, v0, vb) : a.bias, spec, z, cap);
        logits_grad(
            z,
            one_block ? target_c
                      : at::where((target_c >= v0) & (target_c < v0 + vb), target_c - v0, outside),
            a.lse.slice(0, s, e), a.g.slice(0, s, e), slice_or_undefined(a.g_ent, s, e),
            slice_or_undefined(a.ent, s, e), spec, cap);
        if (a.need_b) db.narrow(0, v0, vb).add_(z.sum(0, /*keepdim=*/false, a.acc));
        // Every GEMM takes the operands in their own dtype (16-bit ones with fp32
        // accumulation inside); a gradient that spans one chunk (dW) or one block (dh) is
        // written once, the others accumulate through add_mm.
        if (dw_acc) {
          dw_acc->add(v0, z, h_c);
        } else if (a.need_w) {
          auto dw_b = dw.narrow(0, v0, vb);
          if (one_chunk) {
            set_mm(dw_b, z, /*trans_a=*/true, h_c);
          } else {
            dw_b.addmm_(z.t(), h_c);
          }
        }
        if (a.need_h) {
          if (dh_direct) {
            set_mm(dh_c, z, /*trans_a=*/false, a.weight);
          } else {
            add_mm(dh_c, z, /*trans_a=*/false, w_b, /*exact=*/one_block);
          }
        }
      }
      if (dh_rows.defined()) {
        dh_rows.narrow(0, s, m).copy_(dh_c);
      } else if (a.need_h) {
        if (e == n) buffer = cap_buffer = at::Tensor();  // free the tiles before a last new dh
        if (!dh.defined()) dh = at::zeros({a.h.size(0), H}, a.h.options());
        dh.index_copy_(0, rows_c, dh_c.to(a.h.scalar_type()));
      }
    }
    if (dh_rows.defined()) {
      // Each rank's dh covers its vocabulary slice only; the full gradient is their sum.
      a.cross->sum(dh_rows);
      dh = at::zeros({a.h.size(0), H}, a.h.options());
      dh.index_copy_(0, a.rows, dh_rows.to(a.h.scalar_type()));
    }
    if (dw_acc) dw = dw_acc->finish(a.weight.scalar_type());
    return result(dh, dw, a.need_b ? db.to(a.bias.scalar_type()) : at::Tensor());
  }
};

PREFOPT_INLINE bool cpu_half_matmul() {
  // libtorch < 2.1 has no fp16 GEMM on CPU ("addmm_impl_cpu_" not implemented for 'Half').
  static const bool ok = [] {
    try {
      const auto x = at::ones({1, 1}, at::TensorOptions().dtype(at::kHalf));
      return at::mm(x, x).item<float>() == 1.0f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok;
}

PREFOPT_INLINE bool cpu_mm16_usable(at::ScalarType st, bool a_col_major, bool b_col_major) {
  TORCH_INTERNAL_ASSERT(st == at::kBFloat16 || st == at::kHalf, "cpu_mm16_usable: 16-bit only");
  if (!cpu_mm16_fast(st)) return false;  // nothing of libtorch's 16-bit mm is run then
  // op(a) [8, k] · op(b) [k, 8], k = 2048, deterministic entries in [-1, 1]: summed in fp32,
  // the error is one 16-bit rounding of the result (2⁻⁹ of the largest entry in bf16: 1.03×
  // that measured); summed in 16 bits it grows with k (50× that, Debian's libtorch 1.13 on
  // an AVX2-only CPU). The bound, 2⁻⁶ of the largest entry (8×), separates the two.
  const auto test = [](at::ScalarType t, bool ta, bool tb) {
    if (t == at::kHalf && !cpu_half_matmul()) return false;
    const int64_t m = 8, k = 2048;
    const auto x = [&](double f) {
      return at::sin(at::arange(m * k, at::TensorOptions().dtype(at::kDouble)) * f)
          .view({m, k})
          .to(t);
    };
    const auto a = ta ? x(0.37).t().contiguous().t() : x(0.37);  // [m, k], its layout chosen
    const auto b = tb ? x(0.73).contiguous().t() : x(0.73).t().contiguous();  // [k, m]
    const auto ref = at::mm(a.to(at::kDouble), b.to(at::kDouble));
    const double u = t == at::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;  // unit roundoff
    try {
      const double err = (at::mm(a, b).to(at::kDouble) - ref).abs().max().item<double>();
      return err <= 4 * u * ref.abs().max().item<double>();
    } catch (const c10::Error&) {  // no 16-bit GEMM at all: the fp32 blocks serve
      return false;
    }
  };
  static const std::array<bool, 8> ok = [&] {
    std::array<bool, 8> r{};
    // Inside an autocast region the check must still multiply in 16 bits.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    const c10::AutoGradMode no_grad(false);
    for (int i = 0; i < 8; ++i)
      r[i] = test(i < 4 ? at::kBFloat16 : at::kHalf, (i & 1) != 0, (i & 2) != 0);
    return r;
  }();
  return ok[(st == at::kHalf ? 4 : 0) + (a_col_major ? 1 : 0) + (b_col_major ? 2 : 0)];
}

PREFOPT_INLINE double cpu_mm16_speed(at::ScalarType st) {
  // [512, 1024] · [1024, 1024]ᵀ (the logits' layout), 1.1 GFLOP: a few ms where 16-bit
  // kernels exist, and not run where cpu::fast16 says they do not. fp32 and 16-bit runs
  // alternate, 6 of each after a warm-up, and the best of each counts, so that a slow moment
  // of the machine is not taken for a slow GEMM (timed one after the other, best of 3 each,
  // the ratio spread over 0.50-0.82 between processes on a 2-core Xeon VM whose large-GEMM
  // ratio is 0.6; alternating, best of 6 each: 0.56-0.63 over 8 processes).
  const auto ratio = [](at::ScalarType t) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
    const c10::AutoGradMode no_grad(false);
    try {
      std::array<double, 2> best{std::numeric_limits<double>::infinity(),
                                 std::numeric_limits<double>::infinity()};
      std::array<at::Tensor, 2> a, b, out;
      for (int j = 0; j < 2; ++j) {
        const auto opts = at::TensorOptions().dtype(j == 0 ? at::kFloat : t);
        a[j] = at::full({512, 1024}, 0.25, opts);
        b[j] = at::full({1024, 1024}, 0.25, opts);
        out[j] = at::empty({512, 1024}, opts);
      }
      for (int i = 0; i < 7; ++i) {
        for (int j = 0; j < 2; ++j) {
          const auto t0 = std::chrono::steady_clock::now();
          at::mm_out(out[j], a[j], b[j].t());
          const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
          if (i > 0) best[j] = std::min(best[j], dt.count());
        }
        if (i == 1 && best[1] > 3 * best[0]) break;  // clearly slow: no more 16-bit runs
      }
      return best[0] / best[1];
    } catch (const c10::Error&) {  // no 16-bit GEMM at all
      return 0.0;
    }
  };
  TORCH_INTERNAL_ASSERT(st == at::kBFloat16 || st == at::kHalf, "cpu_mm16_speed: 16-bit only");
  if (st == at::kHalf) {
    static const double f16 =
        cpu::fast16(cpu::Gemm16::kHalf) && cpu_half_matmul() ? ratio(at::kHalf) : 0.0;
    return f16;
  }
  static const double bf16 = cpu::fast16(cpu::Gemm16::kBFloat16) ? ratio(at::kBFloat16) : 0.0;
  return bf16;
}

PREFOPT_INLINE bool cpu_mm16_fast(at::ScalarType st) {
  if (cpu::fp32_only()) return false;
  if (cpu::forced16()) return true;
  return cpu_mm16_speed(st) >= 0.8;
}

PREFOPT_INLINE HeadInputs check_head(const char* fn, const at::Tensor& hidden,
                                     const at::Tensor& weight, const at::Tensor& bias, bool packed,
                                     const FusedLogprobsOptions& o) {
  TORCH_CHECK(hidden.defined(), fn, ": expected hidden states, got an undefined tensor");
  TORCH_CHECK(weight.defined(), fn, ": expected the LM-head weight, got an undefined tensor");
  if (packed) {
    TORCH_CHECK(hidden.dim() == 2 || (hidden.dim() == 3 && hidden.size(0) == 1), fn,
                ": expected packed hidden states of shape [N, H] or [1, N, H], got ",
                hidden.sizes());
  } else {
    TORCH_CHECK(hidden.dim() == 3, fn, ": expected hidden states of rank 3 [B, T, H], got shape ",
                hidden.sizes());
  }
  check_floating(fn, "hidden states", hidden);
  TORCH_CHECK(!hidden.is_cpu() || hidden.scalar_type() != at::kHalf || cpu_half_matmul(), fn,
              ": this libtorch has no fp16 matrix product on CPU; use bf16 or fp32 hidden ",
              "states and weight there");
  TORCH_CHECK(weight.dim() == 2, fn, ": expected weight of shape [V, H], got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, fn, ": expected a vocabulary of at least 1 entry, got V = 0");
  TORCH_CHECK(weight.size(1) > 0, fn, ": expected a hidden size of at least 1, got H = 0");
  // Keeps the buffer-size arithmetic (rows × V × bytes) far from int64 overflow, even for
  // expanded views that hold no memory.
  constexpr int64_t kMaxDim = int64_t{1} << 40;
  TORCH_CHECK(weight.size(0) < kMaxDim && weight.size(1) < kMaxDim, fn,
              ": expected V and H below 2^40, got weight of shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(-1), fn, ": expected weight of shape [V, ",
              hidden.size(-1), "] to match the hidden size of ", hidden.sizes(), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), fn, ": expected weight of dtype ",
              hidden.scalar_type(), " like the hidden states, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), fn, ": expected weight on ", hidden.device(),
              " like the hidden states, got ", weight.device());
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), fn, ": expected bias of shape [",
                weight.size(0), "] to match the weight ", weight.sizes(), ", got ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == hidden.scalar_type(), fn, ": expected bias of dtype ",
                hidden.scalar_type(), " like the hidden states, got ", bias.scalar_type());
    TORCH_CHECK(bias.device() == hidden.device(), fn, ": expected bias on ", hidden.device(),
                " like the hidden states, got ", bias.device());
  }
  TORCH_CHECK(std::isfinite(o.temperature()) && o.temperature() > 0, fn,
              ": expected a finite temperature > 0, got ", o.temperature());
  check_enum(fn, "backend", "a GatherBackend", o.backend(), GatherBackend::kATen);
  check_enum(fn, "backward", "a FusedBackward", o.backward(), FusedBackward::kTiles);
  TORCH_CHECK(std::isfinite(o.softcap()) && o.softcap() >= 0, fn,
              ": expected a finite softcap >= 0 (0: off), got ", o.softcap());
  TORCH_CHECK(std::isfinite(o.logit_scale()) && o.logit_scale() > 0, fn,
              ": expected a finite logit_scale > 0, got ", o.logit_scale());
  TORCH_CHECK(
      o.backend() != GatherBackend::kKernel || hidden.is_cpu() ||
          (hidden.is_cuda() && has_cuda_kernels()),
      fn,
      ": backend kKernel needs CPU tensors, or CUDA tensors and a build with CUDA kernels, got ",
      hidden.device());
  HeadInputs in;
  in.hidden = hidden.dim() == 2 ? hidden.unsqueeze(0) : hidden;
  in.V = weight.size(0);
  in.H = weight.size(1);
  return in;
}

PREFOPT_INLINE int64_t row_budget(const HeadInputs& in, const FusedLogprobsOptions& o) {
  return bytes_per_row(in.V, in.hidden.scalar_type(), o.softcap() > 0);
}

PREFOPT_INLINE HeadSpec head_spec(const char* fn, const HeadInputs& in, int64_t n,
                                  const FusedLogprobsOptions& o) {
  const auto st = in.hidden.scalar_type();
  const int64_t per_row = row_budget(in, o);
  TORCH_CHECK(o.chunk_bytes() >= 0, fn, ": expected chunk_bytes >= 0 (0: automatic), got ",
              o.chunk_bytes());
  TORCH_CHECK(o.chunk_bytes() == 0 || o.chunk_bytes() >= per_row, fn,
              ": memory budget chunk_bytes = ", o.chunk_bytes(),
              " is below one row of logits buffers (", per_row, " bytes for V = ", in.V,
              ", H = ", in.H, ", ", st, (o.softcap() > 0 ? ", softcap" : ""), ")");
  // Automatic: the chunks, 1/16 of the scored tokens' logits (at most 256 MiB, at least one
  // row); the tiles, 1/128 of them in fp32 (4 to 64 MiB).
  TORCH_CHECK(n <= (int64_t{1} << 59) / in.V, fn, ": ", n, " scored rows of ", in.V,
              " logits each overflow 64-bit sizes");
  const int64_t logits_bytes = n * in.V * static_cast<int64_t>(at::elementSize(st));
  const int64_t acc_logits_bytes = n * in.V * static_cast<int64_t>(at::elementSize(acc_type(st)));
  const int64_t budget = o.chunk_bytes() > 0
                             ? o.chunk_bytes()
                             : std::max(per_row, std::min(int64_t{256} << 20, logits_bytes / 16));
  const int64_t tile_budget =
      o.chunk_bytes() > 0 ? o.chunk_bytes()
                          : std::clamp(acc_logits_bytes / 128, int64_t{4} << 20, int64_t{64} << 20);
  return {o.temperature(),  o.softcap(), o.logit_scale(), o.backend(),
          budget / per_row, budget,      tile_budget,     o.backward()};
}

PREFOPT_INLINE SequenceLogprobs run_head(const char* fn, const HeadInputs& in,
                                         const at::Tensor& weight, const at::Tensor& bias,
                                         const Selection& sel, const FusedLogprobsOptions& o,
                                         const CrossRankPtr& cross) {
  const auto st = in.hidden.scalar_type();
  const HeadSpec spec = head_spec(fn, in, sel.rows.b.numel(), o);
  const unsigned flags = stat_flags(o.with_logits_mean(), o.with_token_accuracy(), o.with_entropy(),
                                    o.with_wpo_weights());
  // Only the scored rows reach the matmuls: they are gathered chunk by chunk from a flat view
  // of the hidden states (no compacted copy of them is made or saved).
  const auto h = in.hidden.reshape({-1, in.H});
  const auto rows = sel.rows.b * in.hidden.size(1) + sel.rows.t;
  const bool grad = at::GradMode::is_enabled() && (h.requires_grad() || weight.requires_grad() ||
                                                   (bias.defined() && bias.requires_grad()));
  at::Tensor logp;
  RowResults stats;
  if (grad) {
    const auto out = FusedHeadFunction::apply(
        h, weight, bias.defined() ? bias : at::empty({0}, weight.options()), rows, sel.rows.target,
        static_cast<int64_t>(flags), spec, cross, fn);
    logp = out[0];
    stats.logit_mean = out[1], stats.correct = out[2], stats.entropy = out[3];
    stats.log_sum_p2 = out[4];
  } else {  // reference model / evaluation: nothing saved
    c10::NoGradGuard no_grad;
    if (cross) {
      const auto st = slice_targets(sel.rows.target, in.V);
      stats = head_forward(h, rows, weight, bias, st.forward, flags, spec);
      cross->reduce_rows(stats.lse, stats.logp, st.owned);
    } else {
      stats = head_forward(h, rows, weight, bias, sel.rows.target, flags, spec);
    }
    logp = stats.logp;
  }
  return assemble(sel, logp, stats, flags, o.with_token_logps(), acc_type(st));
}

PREFOPT_INLINE SequenceLogprobs fused_padded(const char* fn, const at::Tensor& hidden,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& labels, const at::Tensor* mask,
                                             const FusedLogprobsOptions& o) {
  const auto in = check_head(fn, hidden, weight, bias, /*packed=*/false, o);
  const auto sel = select_padded(fn, hidden, "hidden states", hidden.size(0), hidden.size(1), in.V,
                                 labels, mask, o.shift(), o.ignore_index());
  return run_head(fn, in, weight, bias, sel, o, {});
}

PREFOPT_INLINE SequenceLogprobs fused_packed(const char* fn, const at::Tensor& hidden,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& labels, const at::Tensor* mask,
                                             const at::Tensor& cu_seqlens,
                                             const FusedLogprobsOptions& o) {
  const auto in = check_head(fn, hidden, weight, bias, /*packed=*/true, o);
  const auto sel = select_packed(fn, in.hidden, "hidden states", in.hidden.size(1), in.V, labels,
                                 mask, cu_seqlens, o.shift(), o.ignore_index());
  return run_head(fn, in, weight, bias, sel, o, {});
}

}  // namespace fused
}  // namespace detail

namespace functional {

PREFOPT_INLINE SequenceLogprobs fused_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& labels,
                                               const FusedLogprobsFuncOptions& options) {
  return detail::fused::fused_padded("prefopt::fused_logprobs", hidden, weight, bias, labels,
                                     nullptr, options);
}

PREFOPT_INLINE SequenceLogprobs fused_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& input_ids,
                                               const at::Tensor& completion_mask,
                                               const FusedLogprobsFuncOptions& options) {
  return detail::fused::fused_padded("prefopt::fused_logprobs", hidden, weight, bias, input_ids,
                                     &completion_mask, options);
}

PREFOPT_INLINE SequenceLogprobs fused_packed_logprobs(const at::Tensor& hidden,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& bias,
                                                      const at::Tensor& labels,
                                                      const at::Tensor& cu_seqlens,
                                                      const FusedLogprobsFuncOptions& options) {
  return detail::fused::fused_packed("prefopt::fused_packed_logprobs", hidden, weight, bias, labels,
                                     nullptr, cu_seqlens, options);
}

PREFOPT_INLINE SequenceLogprobs
fused_packed_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& input_ids, const at::Tensor& completion_mask,
                      const at::Tensor& cu_seqlens, const FusedLogprobsFuncOptions& options) {
  return detail::fused::fused_packed("prefopt::fused_packed_logprobs", hidden, weight, bias,
                                     input_ids, &completion_mask, cu_seqlens, options);
}

}  // namespace functional
PREFOPT_END_NAMESPACE
