// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the gathering ops' validation of labels, completion masks and cu_seqlens
// (prefopt/logprobs.h). The input's bytes choose the form (padded or packed, labels or mask),
// the shapes (small, and now and then mismatched), the dtypes and the values (mostly in range,
// with -100, -1, V and int64's extremes mixed in); each call must either succeed, with results
// of the expected shapes and a backward that runs, or throw a c10::Error. Anything else (a
// crash, a sanitizer report, another exception, a trap) is a finding.
#include <ATen/Parallel.h>
#include <prefopt/prefopt.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace F = prefopt::functional;

namespace {

/// The input, read a byte at a time; zeros once it runs out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t next() { return pos_ < size_ ? data_[pos_++] : 0; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

/// An integer for a label, a mask entry or a cu_seqlens entry: small values near the valid
/// range most of the time, the special ones now and then.
int64_t value(Bytes& in, int64_t span) {
  const uint8_t b = in.next();
  switch (b) {
    case 0xFF:
      return -100;
    case 0xFE:
      return std::numeric_limits<int64_t>::max();
    case 0xFD:
      return std::numeric_limits<int64_t>::min();
    case 0xFC:
      return span;
    case 0xFB:
      return -1;
    case 0xFA:
      return int64_t{1} << 40;
    default:
      return static_cast<int64_t>(b % (span + 2)) - 1;
  }
}

/// A small size, sometimes off by one from `like` (a mismatched shape).
int64_t size_near(Bytes& in, int64_t like) {
  const uint8_t b = in.next();
  if (b < 0xF0) return like;
  if (b == 0xFF) return 0;
  return std::max<int64_t>(like + (b & 1 ? 1 : -1), 0);
}

at::Tensor integers(Bytes& in, std::vector<int64_t> shape, int64_t span, uint8_t dtype_byte) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = value(in, span);
  auto t = at::tensor(v, at::kLong).reshape(shape);
  switch (dtype_byte % 8) {
    case 0:
      return t.to(at::kInt);
    case 1:
      return t.to(at::kBool);
    case 2:
      return t.to(at::kByte);
    case 3:
      return t.to(at::kFloat);
    case 4:
      return t.to(at::kShort);
    default:
      return t;  // int64, the common case
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  at::set_num_threads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  const uint8_t mode = in.next();
  const bool packed = mode & 1;
  const bool mask_form = mode & 2;
  const bool strided = mode & 4;  // logits with a non-unit vocabulary stride
  const bool fp64 = mode & 8;
  const bool extra_dim = mode & 16;  // packed: [1, N, V] and [1, N]
  const uint8_t flags = in.next();
  const int64_t B = in.next() % 4;
  const int64_t T = in.next() % 7;
  const int64_t V = in.next() % 6;  // 0 is invalid, and must be said so
  const int64_t N = B * T;

  prefopt::GatherLogprobsOptions o;
  o.shift(!(flags & 1))
      .with_token_logps(flags & 2)
      .with_logits_mean(flags & 4)
      .with_logits_mean_unmasked(flags & 8)
      .with_token_accuracy(flags & 16)
      .with_entropy(flags & 32)
      .with_wpo_weights(flags & 64)
      .backend(flags & 128 ? prefopt::GatherBackend::kATen : prefopt::GatherBackend::kAuto);
  const uint8_t chunk = in.next();
  if (chunk >= 0xF0) o.chunk_bytes(static_cast<int64_t>(chunk) - 0xF8);  // <= 0 is invalid

  // Logits: fixed values (the validation is what is fuzzed), fp32 or fp64, sometimes strided.
  std::vector<int64_t> lshape = packed ? std::vector<int64_t>{N, V} : std::vector<int64_t>{B, T, V};
  if (packed && extra_dim) lshape.insert(lshape.begin(), 1);
  const auto numel = N * V;
  at::Tensor logits =
      at::arange(strided ? 2 * numel : numel, fp64 ? at::kDouble : at::kFloat).sin().mul(3);
  if (strided) logits = logits.view({numel, 2}).select(1, 0);
  logits = logits.reshape(lshape).requires_grad_(true);

  std::vector<int64_t> label_shape;
  if (packed) {
    label_shape = {size_near(in, N)};
    if (extra_dim) label_shape.insert(label_shape.begin(), 1);
  } else {
    label_shape = {size_near(in, B), size_near(in, T)};
  }
  const uint8_t label_dtype = in.next();
  const auto labels = integers(in, label_shape, V, label_dtype < 0xE0 ? 7 : label_dtype);
  at::Tensor mask;
  if (mask_form) {
    const uint8_t mask_dtype = in.next();
    mask = integers(in, label_shape, 1, mask_dtype < 0x80 ? 1 : mask_dtype);
  }
  at::Tensor cu;
  if (packed) {
    const int64_t S = in.next() % 5;
    std::vector<int64_t> bounds(static_cast<size_t>(S + 1));
    // Mostly valid: 0, then increasing, ending at N; the bytes bend it.
    for (int64_t s = 0; s <= S; ++s) {
      const uint8_t b = in.next();
      if (s == 0) {
        bounds[0] = b < 0xF0 ? 0 : value(in, N);
      } else if (s == S) {
        bounds[s] = b < 0xF0 ? N : value(in, N);
      } else {
        // (From the previous bound clamped into [0, N]: it may be int64's extreme.)
        const int64_t from = std::clamp<int64_t>(bounds[s - 1], 0, N);
        bounds[s] = b < 0xF0 ? std::min<int64_t>(from + b % 4, N) : value(in, N);
      }
    }
    const uint8_t cu_dtype = in.next();
    cu = at::tensor(bounds, at::kLong);
    if (cu_dtype >= 0xF0) cu = cu.to(cu_dtype & 1 ? at::kInt : at::kFloat);
  }

  try {
    prefopt::SequenceLogprobs lp;
    if (packed) {
      lp = mask_form ? F::gather_packed_logprobs(logits, labels, mask, cu, o)
                     : F::gather_packed_logprobs(logits, labels, cu, o);
    } else {
      lp = mask_form ? F::gather_logprobs(logits, labels, mask, o)
                     : F::gather_logprobs(logits, labels, o);
    }
    // Accepted: the results must have one entry per sequence, and a backward must run.
    const int64_t S = packed ? cu.size(0) - 1 : B;
    if (!lp.sum.defined() || lp.sum.dim() != 1 || lp.sum.size(0) != S) __builtin_trap();
    if (lp.count.size(0) != S || lp.mean.size(0) != S) __builtin_trap();
    if (lp.count.numel() > 0 &&
        (lp.count.min().item<int64_t>() < 0 || lp.count.sum().item<int64_t>() > labels.numel()))
      __builtin_trap();
    if (!lp.sum.isfinite().all().item<bool>()) __builtin_trap();  // finite logits, finite sums
    (lp.sum.sum() + lp.mean.sum()).backward();
  } catch (const c10::Error&) {
    // A named validation error: the expected answer to a bad input.
  }
  return 0;
}
