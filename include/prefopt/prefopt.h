// SPDX-License-Identifier: Apache-2.0
// Umbrella header: every public prefopt header.
#pragma once

#include <prefopt/config.h>
#include <prefopt/fused_logprobs.h>
#include <prefopt/logprobs.h>
#include <prefopt/version.h>
