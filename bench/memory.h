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
    auto* ctx = new Context{inner_->allocate(n), n, this};
    const int64_t live = live_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    void* data = ctx->inner.get();
    return {data, ctx, &Context::release, c10::Device(c10::DeviceType::CPU)};
  }
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
  struct Context {
    c10::DataPtr inner;
    size_t n;
    const TrackingAllocator* owner;
    static void release(void* p) {
      auto* ctx = static_cast<Context*>(p);
      ctx->owner->live_.fetch_sub(static_cast<int64_t>(ctx->n));
      delete ctx;  // frees the memory through the inner allocator's deleter
    }
  };
  explicit TrackingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::Allocator* inner_;
  mutable std::atomic<int64_t> live_{0}, peak_{0};
};

}  // namespace prefopt_bench
