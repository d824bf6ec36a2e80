// SPDX-License-Identifier: Apache-2.0
// Exact peak-memory accounting for CPU benchmarks: a c10 allocator that forwards to the default
// one and counts live and peak bytes of every tensor allocation libtorch makes on the CPU.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <prefopt/detail/compat.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>

#ifdef PREFOPT_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace prefopt_bench {

class TrackingAllocator final : public c10::Allocator {
 public:
  /// Installs the tracker as libtorch's CPU allocator (once per process).
  static TrackingAllocator& install() {
    static TrackingAllocator tracker(c10::GetDefaultCPUAllocator());
    static const bool done = (c10::SetCPUAllocator(&tracker, /*priority=*/100), true);
    (void)done;
    return tracker;
  }

#if PREFOPT_TORCH_VERSION >= 203
  c10::DataPtr allocate(size_t n) override {
#else
  c10::DataPtr allocate(size_t n) const override {
#endif
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (data != nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace(data, Block{std::move(inner), n});
    }
    const int64_t live = live_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    // Context == data, as raw_allocate() (used by oneDNN) requires.
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
#if PREFOPT_TORCH_VERSION >= 203
  void copy_data(void* dst, const void* src, std::size_t n) const override {
    default_copy_data(dst, src, n);
  }
#endif

  int64_t live() const { return live_.load(); }
  int64_t peak() const { return peak_.load(); }
  /// Starts a measurement: the peak is reset to what is live now.
  void reset_peak() { peak_.store(live_.load()); }

 private:
  struct Block {
    c10::DataPtr inner;  // frees through the default allocator's deleter
    size_t n;
  };
  static void release(void* data) {
    if (data == nullptr) return;
    auto& self = install();
    Block block;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.blocks_.find(data);
      if (it == self.blocks_.end()) return;
      block = std::move(it->second);
      self.blocks_.erase(it);
    }
    self.live_.fetch_sub(static_cast<int64_t>(block.n));
  }
  explicit TrackingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::Allocator* inner_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, Block> blocks_;
  mutable std::atomic<int64_t> live_{0}, peak_{0};
};

/// Live and peak bytes on one device: the tracking allocator on the CPU, the caching
/// allocator's own statistics on CUDA (bytes handed to tensors, not the cache's reserve).
class MemoryMeter {
 public:
  explicit MemoryMeter(c10::Device device) : device_(device) {
    if (device.is_cpu()) cpu_ = &TrackingAllocator::install();
  }
  void reset_peak() {
    if (cpu_) return cpu_->reset_peak();
#ifdef PREFOPT_BENCH_CUDA
    c10::cuda::CUDACachingAllocator::resetPeakStats(index());
#endif
  }
  int64_t live() const { return cpu_ ? cpu_->live() : cuda_stat().first; }
  int64_t peak() const { return cpu_ ? cpu_->peak() : cuda_stat().second; }

 private:
  /// (current, peak) allocated bytes, all pools (statistic index 0: aggregate).
  std::pair<int64_t, int64_t> cuda_stat() const {
#ifdef PREFOPT_BENCH_CUDA
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index());
    return {stats.allocated_bytes[0].current, stats.allocated_bytes[0].peak};
#else
    return {0, 0};
#endif
  }
  c10::DeviceIndex index() const { return device_.has_index() ? device_.index() : 0; }
  c10::Device device_;
  TrackingAllocator* cpu_ = nullptr;
};

}  // namespace prefopt_bench
