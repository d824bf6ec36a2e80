// SPDX-License-Identifier: Apache-2.0
// The shared main() of prefopt's benchmarks: --smoke (tiny shapes, run by the test suite) and
// --threads=N (intra-op threads for every method; default all hardware threads, since
// Debian's libtorch would otherwise start with fewer), --device=cpu|cuda (where the tensors
// live; a CUDA build only), then Google Benchmark's own flags.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <exception>
#include <iostream>
#include <string>
#include <thread>

namespace prefopt_bench {

/// The device every benchmark allocates its tensors on (--device).
inline c10::Device& bench_device() {
  static c10::Device device(c10::DeviceType::CPU);
  return device;
}

/// Waits for the device, so that a timed iteration covers its work.
inline void sync() {
  if (bench_device().is_cuda()) at::empty({1}, at::TensorOptions().device(bench_device())).item();
}

/// The settings every registered benchmark shares: one iteration per repetition (each is a
/// whole forward/backward step), medians of 3 repetitions (5 on CUDA, whose runs are short),
/// wall-clock milliseconds.
inline benchmark::internal::Benchmark* one_shot(benchmark::internal::Benchmark* b) {
  return b->Iterations(1)
      ->Repetitions(bench_device().is_cuda() ? 5 : 3)
      ->ReportAggregatesOnly(true)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

inline int bench_main(int argc, char** argv, void (*register_all)(bool smoke)) {
  bool smoke = false;
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--smoke") {
      smoke = true;
    } else if (arg.rfind("--device=", 0) == 0) {
      try {
        bench_device() = c10::Device(arg.substr(9));
      } catch (const std::exception&) {
        std::cerr << argv[0] << ": expected --device=cpu or --device=cuda[:N], got " << arg << "\n";
        return 2;
      }
      if (bench_device().is_cuda() && !at::hasCUDA()) {
        std::cerr << argv[0] << ": " << arg << " needs a CUDA build of libtorch and a GPU\n";
        return 2;
      }
    } else if (arg.rfind("--threads=", 0) == 0) {
      size_t used = 0;
      try {
        threads = std::stoi(arg.substr(10), &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != arg.size() - 10 || threads < 1) {
        std::cerr << argv[0] << ": expected --threads=N with N >= 1, got " << arg << "\n";
        return 2;
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  at::set_num_threads(threads);
  register_all(smoke);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("device", bench_device().str());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace prefopt_bench
