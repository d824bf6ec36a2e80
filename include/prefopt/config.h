// SPDX-License-Identifier: Apache-2.0
// Namespace, export and option macros shared by every prefopt header.
#pragma once

#include <prefopt/version.h>

/// \namespace prefopt
/// prefopt's public API: the options, results and functors of the log-prob ops and the
/// losses, the metric reducer, the process groups.
///
/// \namespace prefopt::functional
/// The functional forms of the ops and losses (`prefopt::functional::dpo_loss`, ...), as
/// libtorch's `torch::nn::functional`.

// Everything lives in an inline ABI namespace (as fmt and nlohmann do): users write
// `prefopt::functional::gather_logprobs`, the linker sees `prefopt::v0::...`.
#define PREFOPT_BEGIN_NAMESPACE \
  namespace prefopt {           \
  inline namespace v0 {
#define PREFOPT_END_NAMESPACE \
  }                           \
  }

// Two build modes, as {fmt} and spdlog have them:
// - compiled (default): the library `prefopt::prefopt` holds the implementations (the `*-inl.h`
//   files, compiled once by `src/`), and is the only one with the CUDA kernels;
// - header-only: define PREFOPT_HEADER_ONLY (the CMake target `prefopt::header_only` does) and
//   every header includes its `-inl.h`, with its functions `inline`.
#ifdef PREFOPT_HEADER_ONLY
#define PREFOPT_INLINE inline
#define PREFOPT_API
#else
#define PREFOPT_INLINE
// The compiled library hides everything but the public API (CMake's visibility preset):
// `detail::` stays internal, in a shared build too.
#if defined(_WIN32) && defined(PREFOPT_SHARED)
#ifdef PREFOPT_EXPORTS
#define PREFOPT_API __declspec(dllexport)
#else
#define PREFOPT_API __declspec(dllimport)
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define PREFOPT_API __attribute__((visibility("default")))
#else
#define PREFOPT_API
#endif
#endif

// Internal templates whose instantiations over built-in types GCC would otherwise export.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(PREFOPT_HEADER_ONLY)
#define PREFOPT_HIDDEN __attribute__((visibility("hidden")))
#else
#define PREFOPT_HIDDEN
#endif
