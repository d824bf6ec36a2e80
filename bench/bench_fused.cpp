// SPDX-License-Identifier: Apache-2.0
// Fused LM-head log-probs against the naive composite (logits = h·Wᵀ, log_softmax, gather,
// masked sum), forward + backward, side by side in one process. Reports median time and the
// peak memory each method allocates beyond its inputs (gradients of hidden and weight
// included: they are the same for both methods).
//
//   bench_fused [--smoke] [--threads=N] [--device=cuda] [--benchmark_filter=...]
//
// On CUDA the shapes are the GPU target (N = 16,384, H = 4096, bf16) and memory is the
// caching allocator's peak of allocated bytes.
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <prefopt/fused_logprobs.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "bench_main.h"
#include "memory.h"

namespace {

namespace F = prefopt::functional;
constexpr int64_t kT = 512;  // tokens per sequence; B = N / T

using Method = at::Tensor (*)(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels);

at::Tensor prefopt_sum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels) {
  return F::fused_logprobs(h, w, {}, labels).sum;
}

/// A larger chunk budget (1 GiB): fewer, larger matmuls for more memory.
at::Tensor prefopt_1g_sum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels) {
  return F::fused_logprobs(h, w, {}, labels,
                           prefopt::FusedLogprobsOptions().chunk_bytes(int64_t{1} << 30))
      .sum;
}

/// The token-chunked backward (FusedBackward::kTokenChunks), for comparison with the default.
at::Tensor prefopt_tokens_sum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels) {
  return F::fused_logprobs(
             h, w, {}, labels,
             prefopt::FusedLogprobsOptions().backward(prefopt::FusedBackward::kTokenChunks))
      .sum;
}

/// The composite most trainers run: full logits, log_softmax in fp32, gather, masked sum.
at::Tensor naive_sum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels) {
  const auto logits = at::matmul(h, w.t()).to(at::kFloat);
  const auto z = logits.slice(1, 0, -1);
  const auto y = labels.slice(1, 1);
  const auto lp = z.log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  return (lp * (y != -100)).sum(1);
}

void run(benchmark::State& state, Method method) {
  const auto dev = prefopt_bench::bench_device();
  prefopt_bench::MemoryMeter meter(dev);
  const auto f = at::TensorOptions().device(dev);
  const int64_t N = state.range(0), H = state.range(1), V = state.range(2);
  const auto st = state.range(3) == 16 ? at::kBFloat16 : at::kFloat;
  const bool half_masked = state.range(4) != 0;
  at::manual_seed(0);
  const auto h = at::randn({N / kT, kT, H}, f).to(st).requires_grad_();
  const auto w = (at::randn({V, H}, f) / std::sqrt(static_cast<double>(H))).to(st).requires_grad_();
  auto labels = at::randint(V, {N / kT, kT}, f.dtype(at::kLong));
  labels.slice(1, 0, half_masked ? kT / 2 : 1).fill_(-100);  // the prompt
  if (dev.is_cuda()) {  // warm-up: cuBLAS handles, kernel loads, the allocator's cache
    const auto sum = method(h, w, labels);
    (void)torch::autograd::grad({sum.sum()}, {h, w});
    prefopt_bench::sync();
  }

  int64_t extra = 0;
  double checksum = 0;
  for (auto _ : state) {
    meter.reset_peak();
    const int64_t before = meter.live();
    const auto sum = method(h, w, labels);
    const auto grads = torch::autograd::grad({sum.sum()}, {h, w});
    benchmark::DoNotOptimize(grads[1].data_ptr());
    checksum = sum.sum().item<double>();
    extra = std::max(extra, meter.peak() - before);
  }
  state.counters["logits_MB"] = static_cast<double>(N * V * 4) / 1e6;  // fp32 logits
  state.counters["extra_MB"] = static_cast<double>(extra) / 1e6;
  state.counters["checksum"] = checksum;
}

void register_all(bool smoke) {
  const bool gpu = prefopt_bench::bench_device().is_cuda() && !smoke;
  std::vector<std::pair<const char*, Method>> methods{{"prefopt", prefopt_sum},
                                                      {"naive", naive_sum}};
  if (gpu) {
    methods.insert(methods.begin() + 1, {"prefopt_1GiB", prefopt_1g_sum});
    methods.insert(methods.begin() + 1, {"prefopt_tokens", prefopt_tokens_sum});
  }
  const int64_t N = smoke ? 1024 : gpu ? 16384 : 4096;
  const std::vector<int64_t> hs = smoke ? std::vector<int64_t>{64}
                                  : gpu ? std::vector<int64_t>{4096}
                                        : std::vector<int64_t>{512, 1024};
  const std::vector<int64_t> vs =
      smoke ? std::vector<int64_t>{1000} : std::vector<int64_t>{32000, 128256};
  const std::vector<int64_t> bitss = gpu ? std::vector<int64_t>{16} : std::vector<int64_t>{32, 16};
  for (int64_t V : vs)
    for (int64_t H : hs)
      for (int64_t bits : bitss)
        for (int64_t masked : {0, 1})
          for (const auto& [name, method] : methods)
            prefopt_bench::one_shot(
                benchmark::RegisterBenchmark((std::string("fwd_bwd/") + name).c_str(), run, method)
                    ->Args({N, H, V, bits, masked})
                    ->ArgNames({"N", "H", "V", "bits", "half_masked"}));
}

}  // namespace

int main(int argc, char** argv) { return prefopt_bench::bench_main(argc, argv, register_all); }
