// SPDX-License-Identifier: Apache-2.0
// The CPU row kernels alone (no torch): the statistics pass and the row gradient over rows of
// fp32 and bf16 logits, one thread, at the instruction set the process runs
// (PREFOPT_CPU_ISA=generic|avx2|avx512 picks a lower one; each row's label names it).
//
//   bench_row_kernels [--smoke] [--benchmark_filter=...]
//
// The kernels are compiled into this file (header-only), so it times exactly what the library
// runs, without the ATen dispatch around it. Elements per second are per element of a row.
#define PREFOPT_HEADER_ONLY
#include <benchmark/benchmark.h>
#include <prefopt/detail/cpu_row_kernels-inl.h>

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace cpu = prefopt::detail::cpu;
namespace d = prefopt::detail;

/// Rows × V logits, sin-shaped in [−4, 4] (deterministic, every exponent range of a softmax).
template <typename T>
const std::vector<T>& logits(int64_t rows, int64_t V) {
  static std::vector<T> z;
  if (static_cast<int64_t>(z.size()) != rows * V) {
    z.resize(rows * V);
    for (int64_t i = 0; i < rows * V; ++i) {
      const float x = 4.0f * std::sin(0.37f * static_cast<float>(i % 100003));
      if constexpr (std::is_same_v<T, float>) {
        z[i] = x;
      } else {  // bf16: the high half of the fp32 bits (truncation is fine for a benchmark)
        uint32_t u;
        std::memcpy(&u, &x, sizeof u);
        z[i].bits = static_cast<uint16_t>(u >> 16);
      }
    }
  }
  return z;
}

enum class Pass { kStats, kStatsAll, kGrad, kGradEntropy };

template <typename T>
void run(benchmark::State& state, Pass pass) {
  const int64_t rows = state.range(0), V = state.range(1);
  const auto& z = logits<T>(rows, V);
  std::vector<T> out(V);
  const unsigned all = d::kLogitSum | d::kArgmax | d::kEntropy | d::kLogSumP2;
  double sink = 0;
  for (auto _ : state) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = z.data() + r * V;
      switch (pass) {
        case Pass::kStats:
          sink += cpu::row_stats<T>(row, V, 5, 0).lse;
          break;
        case Pass::kStatsAll:
          sink += cpu::row_stats<T>(row, V, 5, all).entropy;
          break;
        case Pass::kGrad:
          cpu::row_grad<T>(row, V, 5, 10.0f, 1.0f, 0.0f, 0.0f, out.data());
          break;
        case Pass::kGradEntropy:
          cpu::row_grad<T>(row, V, 5, 10.0f, 1.0f, 0.5f, 2.0f, out.data());
          break;
      }
    }
    benchmark::DoNotOptimize(sink);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * rows * V);
  state.SetLabel(cpu::row_kernel_isa());
}

}  // namespace

int main(int argc, char** argv) {
  bool smoke = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::string(argv[i]) == "--smoke") {
      smoke = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  const int64_t rows = smoke ? 8 : 2048, V = smoke ? 1003 : 32000;
  const std::pair<const char*, Pass> passes[] = {{"stats", Pass::kStats},
                                                 {"stats_all", Pass::kStatsAll},
                                                 {"grad", Pass::kGrad},
                                                 {"grad_entropy", Pass::kGradEntropy}};
  const auto setup = [&](benchmark::internal::Benchmark* b) {
    b->Args({rows, V})->ArgNames({"rows", "V"})->Unit(benchmark::kMillisecond);
    if (smoke) b->Iterations(1);
  };
  for (const auto& [name, pass] : passes) {
    setup(benchmark::RegisterBenchmark((std::string(name) + "/fp32").c_str(), run<float>, pass));
    setup(
        benchmark::RegisterBenchmark((std::string(name) + "/bf16").c_str(), run<cpu::bf16>, pass));
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
