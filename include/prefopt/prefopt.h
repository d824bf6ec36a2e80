// SPDX-License-Identifier: Apache-2.0
// Umbrella header: every public prefopt header.
#pragma once

#include <prefopt/config.h>
#include <prefopt/distributed.h>
#include <prefopt/fused_logprobs.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/common.h>
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>
#include <prefopt/metrics.h>
#include <prefopt/version.h>
