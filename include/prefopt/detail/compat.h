// SPDX-License-Identifier: Apache-2.0
// The one place in the code where differences between libtorch releases (1.13 ... 2.x) are
// handled; cmake/prefoptTorch.cmake is its counterpart for the build.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>  // TORCH_ARG: fluent option setters, identical in 1.13 and 2.x
#include <torch/version.h>

#include <algorithm>
#include <string>
#include <vector>

#define PREFOPT_TORCH_VERSION (TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR)

namespace prefopt {
inline namespace v0 {
namespace detail {

/// True when libtorch was built with CUDA and a device is present.
inline bool cuda_available() { return at::hasCUDA() && at::getNumGPUs() > 0; }

/// Collects the messages of libtorch warnings (`TORCH_WARN`, `TORCH_WARN_ONCE`) raised on this
/// thread while it lives, instead of printing them, with every warning shown (a
/// `TORCH_WARN_ONCE` that already fired is seen again). For tests, and for hosts that route
/// prefopt's warnings to their own log. (libtorch 2.0 changed the handler's interface.)
class WarningCapture : public c10::WarningHandler {
 public:
#if PREFOPT_TORCH_VERSION >= 200
  WarningCapture()
      : prev_(c10::WarningUtils::get_warning_handler()),
        prev_always_(c10::WarningUtils::get_warnAlways()) {
    c10::WarningUtils::set_warning_handler(this);
    c10::WarningUtils::set_warnAlways(true);
  }
  ~WarningCapture() override {
    c10::WarningUtils::set_warning_handler(prev_);
    c10::WarningUtils::set_warnAlways(prev_always_);
  }
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
#else
  WarningCapture()
      : prev_(c10::Warning::get_warning_handler()), prev_always_(c10::Warning::get_warnAlways()) {
    c10::Warning::set_warning_handler(this);
    c10::Warning::set_warnAlways(true);
  }
  ~WarningCapture() override {
    c10::Warning::set_warning_handler(prev_);
    c10::Warning::set_warnAlways(prev_always_);
  }
  void process(const c10::SourceLocation& /*where*/, const std::string& msg,
               const bool /*verbatim*/) override {
    messages.push_back(msg);
  }
#endif
  WarningCapture(const WarningCapture&) = delete;
  WarningCapture& operator=(const WarningCapture&) = delete;

  /// Whether any captured message contains `text`.
  bool contains(const std::string& text) const {
    return std::any_of(messages.begin(), messages.end(),
                       [&](const std::string& m) { return m.find(text) != std::string::npos; });
  }

  std::vector<std::string> messages;  ///< in the order raised

 private:
  c10::WarningHandler* prev_;
  bool prev_always_;
};

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
