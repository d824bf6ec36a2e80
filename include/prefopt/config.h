// SPDX-License-Identifier: Apache-2.0
// Namespace, export and option macros shared by every prefopt header.
#pragma once

#include <prefopt/version.h>

// Everything lives in an inline ABI namespace (as fmt and nlohmann do): users write
// `prefopt::functional::gather_logprobs`, the linker sees `prefopt::v0::...`.
#define PREFOPT_BEGIN_NAMESPACE \
  namespace prefopt {           \
  inline namespace v0 {
#define PREFOPT_END_NAMESPACE \
  }                           \
  }

#if defined(_WIN32) && defined(PREFOPT_SHARED)
#ifdef PREFOPT_EXPORTS
#define PREFOPT_API __declspec(dllexport)
#else
#define PREFOPT_API __declspec(dllimport)
#endif
#elif defined(PREFOPT_SHARED)
#define PREFOPT_API __attribute__((visibility("default")))
#else
#define PREFOPT_API
#endif
