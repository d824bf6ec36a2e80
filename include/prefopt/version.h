// SPDX-License-Identifier: Apache-2.0
// prefopt version: the single source of truth (CMake parses these lines).
#pragma once

#define PREFOPT_VERSION_MAJOR 0
#define PREFOPT_VERSION_MINOR 1
#define PREFOPT_VERSION_PATCH 0

/// Version as one integer, `major * 10000 + minor * 100 + patch` (fmt's convention).
#define PREFOPT_VERSION \
  (PREFOPT_VERSION_MAJOR * 10000 + PREFOPT_VERSION_MINOR * 100 + PREFOPT_VERSION_PATCH)

#define PREFOPT_STRINGIFY_(x) #x
#define PREFOPT_STRINGIFY(x) PREFOPT_STRINGIFY_(x)
/// Version as a string, e.g. "0.1.0".
#define PREFOPT_VERSION_STRING             \
  PREFOPT_STRINGIFY(PREFOPT_VERSION_MAJOR) \
  "." PREFOPT_STRINGIFY(PREFOPT_VERSION_MINOR) "." PREFOPT_STRINGIFY(PREFOPT_VERSION_PATCH)
