// SPDX-License-Identifier: Apache-2.0
// One LM-head method per process, as a new user would run it: DPO (sigmoid) from the final
// hidden states and the head, forward + backward to the hidden states and the weight. Prints
// one JSON line: wall times, the counting allocator's peak beyond the inputs, and the process's
// peak RSS beyond what it held before the method first ran (VmHWM after resetting it through
// /proc/self/clear_refs). bench/head_matrix.py runs the methods side by side, each in its own
// process, under the same allocator settings.
//
//   bench_head --method naive|two_pass|one_pass|gemm3 --N 4096 --H 768 --V 50257 --dtype bf16
//              [--masked 0.5] [--reps 2] [--threads 2] [--T 512]
//              [--backward auto|token_chunks|vocab_blocks|tiles] [--chunk-bytes 0]
//              [--zero-reference] [--device cpu|cuda]
//
// Methods:
// - naive: logits = h·Wᵀ, log_softmax (in the logits' dtype), gather, masked sums, dpo_loss;
// - two_pass: functional::fused_logprobs, split_pairs, dpo_loss (4 GEMM-equivalents);
// - one_pass: functional::fused_dpo_loss (3 GEMM-equivalents);
// - gemm3: the three-GEMM floor, the shapes of the scored tokens only: z = h_s·Wᵀ, then
//   dh_s = z·W and dW = zᵀ·h_s with z standing in for the logits' gradient (ATen's matmul in
//   the input dtype; no softmax, no autograd). An estimate, not a bound: its one-shot GEMMs
//   allocate fresh logits-sized buffers, and a chunked method can come in below it;
//   naive/gemm3 shows how much of the composite is not GEMM.
//
// The inputs are drawn on the CPU from seed 0 (hidden, weight, labels, in that order; the
// reference log-probs last, or zeros with --zero-reference, as bench/liger_head.py's
// Liger-Kernel run has no reference model), then moved to --device. On CUDA (a build with
// torch_cuda) every run ends in a device sync, and alloc_extra_bytes is the caching
// allocator's peak of allocated bytes beyond the inputs (bench/memory.h's MemoryMeter).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <prefopt/detail/cpu_gemm.h>
#include <prefopt/detail/rows.h>
#include <prefopt/fused_loss.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "memory.h"

namespace {

namespace F = prefopt::functional;

/// A field of /proc/self/status in bytes (VmRSS, VmHWM), or -1.
int64_t status_bytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  }
  return -1;
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0); false where that is not possible.
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  return static_cast<bool>(out.flush());
}

struct Inputs {
  at::Tensor h, w, labels, ref_c, ref_r;
  prefopt::FusedLogprobsOptions opts;
};

at::Tensor naive(const Inputs& in) {
  const auto logits = at::matmul(in.h, in.w.t());
  const auto z = logits.slice(1, 0, -1);
  const auto y = in.labels.slice(1, 1);
  const auto mask = y != -100;
  const auto lp = z.log_softmax(-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  const auto sums = (lp.to(at::kFloat) * mask).sum(1);
  const int64_t B = sums.size(0) / 2;
  return F::dpo_loss(sums.narrow(0, 0, B), sums.narrow(0, B, B), in.ref_c, in.ref_r).loss;
}

at::Tensor two_pass(const Inputs& in) {
  const auto pair = F::split_pairs(F::fused_logprobs(in.h, in.w, {}, in.labels, in.opts));
  return F::dpo_loss(
             prefopt::PairInputs(pair).reference_chosen_logps(in.ref_c).reference_rejected_logps(
                 in.ref_r))
      .loss;
}

at::Tensor one_pass(const Inputs& in) {
  return F::fused_dpo_loss(prefopt::HeadBatch(in.h, in.w, {}, in.labels),
                           prefopt::PairInputs()
                               .reference_chosen_logps(in.ref_c)
                               .reference_rejected_logps(in.ref_r)
                               .logps_form(prefopt::LogpsForm::kSum),
                           {}, in.opts)
      .result.loss;
}

/// The three GEMMs of the scored rows; returns the two "gradients" so nothing is elided.
std::vector<at::Tensor> gemm3(const Inputs& in) {
  at::NoGradGuard no_grad;
  const auto y = in.labels.slice(1, 1);
  const auto hs =
      in.h.slice(1, 0, -1).reshape({-1, in.h.size(-1)}).index({(y != -100).reshape(-1)});
  const auto z = at::matmul(hs, in.w.t());
  return {at::matmul(z, in.w), at::matmul(z.t(), hs)};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"One LM-head method per process: DPO forward + backward, time and memory."};
  std::string method = "one_pass", dtype = "fp32";
  int64_t N = 4096, H = 768, V = 50257, T = 512;
  double masked = 0.0;
  int reps = 2, threads = 0;
  std::string backward = "auto";
  int64_t chunk_bytes = 0;
  bool zero_reference = false;
  std::string device = "cpu";
  app.add_option("--method", method, "naive | two_pass | one_pass | gemm3")
      ->check(CLI::IsMember({"naive", "two_pass", "one_pass", "gemm3"}));
  app.add_option("--N", N, "tokens (2B sequences of T)")->check(CLI::PositiveNumber);
  app.add_option("--H", H, "hidden size")->check(CLI::PositiveNumber);
  app.add_option("--V", V, "vocabulary size")->check(CLI::PositiveNumber);
  app.add_option("--T", T, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--dtype", dtype, "fp32 | bf16")->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--masked", masked, "fraction of each sequence that is prompt (unscored)")
      ->check(CLI::Range(0.0, 0.99));
  app.add_option("--reps", reps, "timed repetitions after one warm-up")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "intra-op threads (0: every hardware thread)");
  app.add_option("--backward", backward,
                 "FusedBackward of the two-pass op (and the options of both)")
      ->check(CLI::IsMember({"auto", "token_chunks", "vocab_blocks", "tiles"}));
  app.add_option("--chunk-bytes", chunk_bytes, "FusedLogprobsOptions::chunk_bytes (0: automatic)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--zero-reference", zero_reference,
               "reference log-probs 0 (as Liger without a reference model), not random");
  app.add_option("--device", device, "cpu | cuda (a CUDA build)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);
  if (N % (2 * T) != 0) {
    std::cerr << "bench_head: N must be a multiple of 2T (whole pairs), got N = " << N
              << ", T = " << T << "\n";
    return 2;
  }
  // Debian's libtorch starts with fewer threads than cores: every method gets them all.
  at::set_num_threads(
      threads > 0 ? threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
  if (device == "cuda" && !at::hasCUDA()) {
    std::cerr << "bench_head: --device cuda needs libtorch's CUDA library (torch_cuda) linked "
                 "and a visible GPU; at::hasCUDA() is false in this process\n";
    return 2;
  }
  const c10::Device dev(device);
  prefopt_bench::MemoryMeter meter(dev);
  const auto st = dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  at::manual_seed(0);
  Inputs in;
  const int64_t S = N / T, B = S / 2;
  in.h = at::randn({S, T, H}).to(st).to(dev).requires_grad_();
  in.w = (at::randn({V, H}) / std::sqrt(static_cast<double>(H))).to(st).to(dev).requires_grad_();
  in.labels = at::randint(V, {S, T}, at::kLong);
  in.labels.narrow(1, 0, std::max<int64_t>(1, static_cast<int64_t>(masked * T))).fill_(-100);
  in.labels = in.labels.to(dev);
  in.ref_c = (zero_reference ? at::zeros({B}) : at::randn({B}) - 10.0 * T).to(dev);
  in.ref_r = (zero_reference ? at::zeros({B}) : at::randn({B}) - 10.0 * T).to(dev);
  // Waits for the device, so that a timed run covers its work.
  const auto sync = [&] {
    if (dev.is_cuda()) at::empty({1}, at::TensorOptions().device(dev)).item();
  };
  in.opts.chunk_bytes(chunk_bytes)
      .backward(backward == "token_chunks"   ? prefopt::FusedBackward::kTokenChunks
                : backward == "vocab_blocks" ? prefopt::FusedBackward::kVocabBlocks
                : backward == "tiles"        ? prefopt::FusedBackward::kTiles
                                             : prefopt::FusedBackward::kAuto);
  auto* run = method == "naive" ? naive : method == "two_pass" ? two_pass : one_pass;

  const int64_t rss_before = status_bytes("VmRSS");
  const bool hwm_ok = reset_peak_rss();
  std::vector<double> times;
  int64_t alloc_extra = 0;
  double loss = 0;
  for (int i = 0; i <= reps; ++i) {
    sync();
    meter.reset_peak();
    const int64_t live = meter.live();
    const auto t0 = std::chrono::steady_clock::now();
    if (method == "gemm3") {
      const auto out = gemm3(in);
      loss = 0;
    } else {
      const auto l = run(in);
      const auto grads = torch::autograd::grad({l}, {in.h, in.w});
      loss = l.item<double>();
    }
    sync();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    alloc_extra = std::max(alloc_extra, meter.peak() - live);
    if (i > 0) times.push_back(s);  // the first run is the warm-up
  }
  const int64_t hwm = status_bytes("VmHWM");
  auto sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted.size() % 2
                            ? sorted[sorted.size() / 2]
                            : (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]) / 2;
  // The CPU's 16-bit GEMM choice (detail::fused::cpu_mm16_fast): timed once per process.
  const bool cpu_bf16 = dev.is_cpu() && st == at::kBFloat16;
  const double speed16 = cpu_bf16 ? prefopt::detail::fused::cpu_mm16_speed(st) : 0.0;
  const char* gemm =
      !cpu_bf16 ? "n/a"
      : prefopt::detail::fused::cpu_mm16_fast(st)
          ? prefopt::detail::cpu::gemm16_path_name(prefopt::detail::cpu::Gemm16::kBFloat16)
          : "fp32 blocks (no fast 16-bit GEMM)";
  nlohmann::json j = {{"method", method},
                      {"N", N},
                      {"H", H},
                      {"V", V},
                      {"T", T},
                      {"dtype", dtype},
                      {"device", device},
                      {"zero_reference", zero_reference},
                      {"masked", masked},
                      {"backward", backward},
                      {"chunk_bytes", chunk_bytes},
                      {"threads", at::get_num_threads()},
                      {"times_s", times},
                      {"median_s", median},
                      {"alloc_extra_bytes", alloc_extra},
                      {"rss_extra_bytes", hwm_ok && hwm > 0 ? hwm - rss_before : -1},
                      {"inputs_bytes", (in.h.numel() + in.w.numel()) * in.h.element_size()},
                      // 3 · 2·n·H·V FLOPs over these: the three GEMMs' rate (gemm3's time).
                      {"scored_tokens", (in.labels.slice(1, 1) != -100).sum().item<int64_t>()},
                      {"loss", loss},
                      {"bf16_mixed_gemm", gemm != nullptr ? gemm : "none"},
                      {"bf16_mm_speed_vs_fp32", speed16},
                      {"torch", TORCH_VERSION}};
  std::cout << j.dump() << std::endl;
  return 0;
}
