// SPDX-License-Identifier: Apache-2.0
// Test helpers shared by prefopt's test files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <prefopt/detail/compat.h>

#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>

namespace prefopt_test {

/// Resolves oneMKL's VML kernels (the CPU exp, log, ... of the torch wheels) on one thread
/// before any test uses them. Their dispatch is lazy and races when the first call is split
/// over the intra-op threads, and one thread can then run a low-accuracy kernel for its whole
/// chunk (pytorch/pytorch#188792). Seen here with torch 2.14.1: in 7 of 200 fresh processes
/// the first fp64 softmax of a [4, 33, 257] batch summed to 131.9999999948 instead of 132,
/// enough to fail an fp64 reference at 1e-11. Calls below the parallel grain size run on the
/// calling thread alone.
inline void warm_up_cpu_math() {
  static const bool done = [] {
    for (auto dt : {at::kDouble, at::kFloat}) {
      const auto x = at::rand({256}, at::TensorOptions().dtype(dt)) + 0.5;
      (void)x.exp(), (void)x.log(), (void)x.log1p(), (void)x.expm1(), (void)x.tanh(),
          (void)x.sigmoid(), (void)x.sqrt(), (void)at::log_softmax(x, 0);
    }
    return true;
  }();
  (void)done;
}

/// Seeds libtorch's generator before every test (torch's SeedingFixture).
struct SeededTest : ::testing::Test {
  void SetUp() override {
    warm_up_cpu_math();
    at::manual_seed(0);
  }
};

/// Seeded, and skipped (not passed) when libtorch has no CUDA or no device is present.
struct CudaTest : SeededTest {
  void SetUp() override {
    SeededTest::SetUp();
    if (!prefopt::detail::cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

/// Elementwise |actual − expected| ≤ atol + rtol·|expected|, compared in fp64; NaN only
/// matches NaN. On failure reports the worst element.
inline ::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected,
                                           double rtol, double atol) {
  if (!actual.defined() || !expected.defined())
    return ::testing::AssertionFailure() << "undefined tensor";
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != expected " << expected.sizes();
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const auto a = actual.detach().to(at::kCPU, at::kDouble);
  const auto e = expected.detach().to(at::kCPU, at::kDouble);
  const auto nan_mismatch = (a.isnan() != e.isnan()).any().item<bool>();
  const auto both = ~(a.isnan() | e.isnan());
  const auto err = (a - e).abs().masked_fill(~both, 0) - (rtol * e.abs()).masked_fill(~both, 0);
  const auto worst = err.argmax().item<int64_t>();
  const double excess = err.flatten()[worst].item<double>();
  if (!nan_mismatch && excess <= atol) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << (nan_mismatch ? "NaN pattern differs; " : "") << "worst flat index " << worst << ": actual "
     << a.flatten()[worst].item<double>() << " vs expected " << e.flatten()[worst].item<double>()
     << " (rtol " << rtol << ", atol " << atol << ")";
  return ::testing::AssertionFailure() << os.str();
}

/// Runs `stmt`, expecting a c10::Error whose message (without backtrace) contains `substr`.
#define PREFOPT_EXPECT_THROWS_WITH(stmt, substr)                                                 \
  do {                                                                                           \
    bool prefopt_threw = false;                                                                  \
    try {                                                                                        \
      (void)(stmt);                                                                              \
    } catch (const c10::Error& e) {                                                              \
      prefopt_threw = true;                                                                      \
      EXPECT_NE(std::string(e.what_without_backtrace()).find(substr), std::string::npos)         \
          << "message: " << e.what_without_backtrace() << "\nexpected to contain: " << (substr); \
    }                                                                                            \
    EXPECT_TRUE(prefopt_threw) << "expected an error containing: " << (substr);                  \
  } while (0)

/// Random labels [B, T] in [0, V), with about a third of the positions set to `ignore`; the
/// first position is always ignored (a prompt token) and sequence 1, when present, has nothing
/// scored at all.
inline at::Tensor make_labels(int64_t B, int64_t T, int64_t V, int64_t ignore = -100) {
  auto labels = at::randint(V, {B, T}, at::kLong);
  labels.masked_fill_(at::rand({B, T}) < 0.33, ignore);
  if (T > 0) labels.select(1, 0).fill_(ignore);
  if (B > 1) labels[1].fill_(ignore);
  return labels;
}

/// The shared data folder: $PREFOPT_DATA_DIR, else ../shared/data beside the source tree.
inline std::filesystem::path data_dir() {
  if (const char* env = std::getenv("PREFOPT_DATA_DIR")) return env;
  return std::filesystem::path(PREFOPT_SOURCE_DIR) / ".." / "shared" / "data";
}

}  // namespace prefopt_test
