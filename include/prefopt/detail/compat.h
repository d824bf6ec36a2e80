// SPDX-License-Identifier: Apache-2.0
// The one place where differences between libtorch releases (1.13 ... 2.x) are handled.
#pragma once

#include <ATen/ATen.h>
#include <torch/arg.h>  // TORCH_ARG: fluent option setters, identical in 1.13 and 2.x
#include <torch/version.h>

#define PREFOPT_TORCH_VERSION (TORCH_VERSION_MAJOR * 100 + TORCH_VERSION_MINOR)

namespace prefopt {
inline namespace v0 {
namespace detail {

/// True when libtorch was built with CUDA and a device is present.
inline bool cuda_available() { return at::hasCUDA() && at::getNumGPUs() > 0; }

}  // namespace detail
}  // namespace v0
}  // namespace prefopt
