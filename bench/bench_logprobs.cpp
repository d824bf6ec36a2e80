// SPDX-License-Identifier: Apache-2.0
// Log-prob gathering: prefopt against the naive composite and TRL's selective_log_softmax,
// side by side in one process. Reports median time and the peak memory each method allocates
// beyond the logits (exact: every CPU tensor allocation is counted, see memory.h).
//
//   bench_logprobs [--smoke] [--threads=N] [--device=cuda] [--benchmark_filter=...]
//
// prefopt_aten is prefopt's chunked ATen path (backend kATen), to show what the row kernels add;
// vocab_parallel is distributed.h's vocabulary-parallel gather on a single rank; the
// "_entropy" pair adds an entropy term to what they compute (and differentiate).
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <c10/core/GradMode.h>
#include <prefopt/distributed.h>
#include <prefopt/logprobs.h>
#include <prefopt/vocab_parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench_main.h"
#include "memory.h"

namespace {

namespace F = prefopt::functional;
constexpr int64_t kT = 1024;  // sequence length; B = tokens / T

/// Per-sequence sums of the shifted, masked token log-probs: the quantity every method computes.
using Method = at::Tensor (*)(const at::Tensor& logits, const at::Tensor& labels);

at::Tensor prefopt_sum(const at::Tensor& logits, const at::Tensor& labels) {
  return F::gather_logprobs(logits, labels).sum;
}

at::Tensor prefopt_aten_sum(const at::Tensor& logits, const at::Tensor& labels) {
  return F::gather_logprobs(logits, labels,
                            prefopt::GatherLogprobsOptions().backend(prefopt::GatherBackend::kATen))
      .sum;
}

/// The vocabulary-parallel gather on one rank holding the whole vocabulary (no group): the
/// per-rank compute of a tensor-parallel LM head, without the collectives.
at::Tensor vocab_parallel_sum(const at::Tensor& logits, const at::Tensor& labels) {
  return F::vocab_parallel_gather_logprobs(logits, labels, nullptr, {}).sum;
}

/// What most training code writes: log_softmax over the whole vocabulary, gather, masked sum.
at::Tensor naive_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const auto z = logits.slice(1, 0, -1);
  const auto y = labels.slice(1, 1);
  const auto mask = y != -100;
  const auto lp = z.log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  return (lp * mask).sum(1);
}

/// With an entropy term, as a loss with an entropy bonus reads it: Σ log p + 0.01 · Σ H per
/// sequence (backward then carries the entropy's gradient too).
constexpr double kEntropyWeight = 0.01;

at::Tensor prefopt_entropy_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const auto lp =
      F::gather_logprobs(logits, labels, prefopt::GatherLogprobsOptions().with_entropy(true));
  return lp.sum + kEntropyWeight * lp.entropy_sum;
}

at::Tensor naive_entropy_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const auto z = logits.slice(1, 0, -1);
  const auto y = labels.slice(1, 1);
  const auto mask = y != -100;
  const auto all = z.log_softmax(-1);
  const auto lp = all.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const auto entropy = -(all.exp() * all).sum(-1);
  return ((lp + kEntropyWeight * entropy) * mask).sum(1);
}

/// TRL's selective_log_softmax (trl/trainer/utils.py): fp32 gathers the label logit and
/// subtracts a logsumexp computed one sequence at a time; bf16/fp16 runs log_softmax one
/// sequence at a time (its output stays in the logits dtype).
at::Tensor trl_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const auto z = logits.slice(1, 0, -1);
  const auto y = labels.slice(1, 1);
  const auto mask = y != -100;
  const auto idx = y.clamp_min(0).unsqueeze(-1);
  at::Tensor lp;
  if (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble) {
    std::vector<at::Tensor> lse;
    for (int64_t b = 0; b < z.size(0); ++b) lse.push_back(z[b].logsumexp(-1));
    lp = z.gather(-1, idx).squeeze(-1) - at::stack(lse);
  } else {
    std::vector<at::Tensor> rows;
    for (int64_t b = 0; b < z.size(0); ++b)
      rows.push_back(z[b].log_softmax(-1).gather(-1, idx[b]).squeeze(-1));
    lp = at::stack(rows);
  }
  return (lp * mask).sum(1);
}

/// One logits tensor at a time, shared by the methods benchmarked on the same shape.
const at::Tensor& logits_for(int64_t tokens, int64_t V, at::ScalarType st) {
  static std::tuple<int64_t, int64_t, at::ScalarType> key{-1, -1, at::kFloat};
  static at::Tensor logits;
  if (key != std::make_tuple(tokens, V, st)) {
    logits = at::Tensor();  // free the previous one first
    at::manual_seed(0);
    logits = (at::randn({tokens / kT, kT, V},
                        at::TensorOptions().device(prefopt_bench::bench_device())) *
              2)
                 .to(st);
    key = {tokens, V, st};
  }
  return logits;
}

void run(benchmark::State& state, Method method, bool backward) {
  const auto dev = prefopt_bench::bench_device();
  prefopt_bench::MemoryMeter meter(dev);
  const int64_t tokens = state.range(0), V = state.range(1);
  const auto st = state.range(2) == 16 ? at::kBFloat16 : at::kFloat;
  const auto& base = logits_for(tokens, V, st);
  auto labels = at::randint(V, {tokens / kT, kT}, at::TensorOptions().device(dev).dtype(at::kLong));
  labels.slice(1, 0, 1).fill_(-100);  // the first token is a prompt token
  const auto logits = backward ? base.detach().requires_grad_() : base;

  if (dev.is_cuda()) {  // warm-up
    const auto sum = method(logits, labels);
    if (backward) (void)torch::autograd::grad({sum.sum()}, {logits});
    prefopt_bench::sync();
  }
  int64_t extra = 0;
  double checksum = 0;
  for (auto _ : state) {
    meter.reset_peak();
    const int64_t before = meter.live();
    if (backward) {
      const auto sum = method(logits, labels);
      const auto grad = torch::autograd::grad({sum.sum()}, {logits})[0];
      benchmark::DoNotOptimize(grad.data_ptr());
      checksum = sum.sum().item<double>();
    } else {
      c10::NoGradGuard no_grad;
      checksum = method(logits, labels).sum().item<double>();
    }
    extra = std::max(extra, meter.peak() - before);
  }
  const double logits_bytes = static_cast<double>(base.numel() * base.element_size());
  state.counters["logits_MB"] = logits_bytes / 1e6;
  state.counters["extra_MB"] = static_cast<double>(extra) / 1e6;
  state.counters["extra_pct"] = 100.0 * static_cast<double>(extra) / logits_bytes;
  if (backward)  // the logits gradient itself (1x logits) is the op's output, not overhead
    state.counters["extra_beyond_grad_pct"] =
        100.0 * (static_cast<double>(extra) - logits_bytes) / logits_bytes;
  // The same for every method of a shape (up to dtype), and for both "_entropy" methods.
  state.counters["checksum"] = checksum;
}

void register_all(bool smoke) {
  const bool gpu = prefopt_bench::bench_device().is_cuda() && !smoke;
  std::vector<std::pair<const char*, Method>> methods{{"prefopt", prefopt_sum},
                                                      {"naive", naive_sum},
                                                      {"trl", trl_sum},
                                                      {"vocab_parallel", vocab_parallel_sum},
                                                      {"prefopt_entropy", prefopt_entropy_sum},
                                                      {"naive_entropy", naive_entropy_sum}};
  if (gpu) methods.insert(methods.begin() + 1, {"prefopt_aten", prefopt_aten_sum});
  const std::vector<int64_t> token_sizes = smoke ? std::vector<int64_t>{1024}
                                           : gpu ? std::vector<int64_t>{16384}
                                                 : std::vector<int64_t>{2048, 8192};
  const std::vector<int64_t> vocab_sizes =
      smoke ? std::vector<int64_t>{1000} : std::vector<int64_t>{32000, 128256};
  for (int64_t tokens : token_sizes)
    for (int64_t V : vocab_sizes)
      for (int64_t bits : {32, 16})
        for (bool backward : {false, true})
          for (const auto& [name, method] : methods) {
            const std::string label = std::string(backward ? "fwd_bwd/" : "fwd/") + name;
            prefopt_bench::one_shot(
                benchmark::RegisterBenchmark(label.c_str(), run, method, backward)
                    ->Args({tokens, V, bits})
                    ->ArgNames({"tokens", "V", "bits"}));
          }
}

}  // namespace

int main(int argc, char** argv) { return prefopt_bench::bench_main(argc, argv, register_all); }
