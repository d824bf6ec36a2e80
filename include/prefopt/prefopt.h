// SPDX-License-Identifier: Apache-2.0
// Umbrella header: every public prefopt header.
#pragma once

// Header-only mode: the outermost prefopt header includes every implementation at its end.
#if defined(PREFOPT_HEADER_ONLY) && !defined(PREFOPT_INCLUDING)
#define PREFOPT_INCLUDING
#define PREFOPT_OUTERMOST_PREFOPT
#endif

#include <prefopt/config.h>
#include <prefopt/distributed.h>
#include <prefopt/fused_logprobs.h>
#include <prefopt/fused_loss.h>
#include <prefopt/logprobs.h>
#include <prefopt/losses/common.h>
#include <prefopt/losses/cpo.h>
#include <prefopt/losses/dpo.h>
#include <prefopt/losses/kto.h>
#include <prefopt/losses/orpo.h>
#include <prefopt/losses/tpo.h>
#include <prefopt/metrics.h>
#include <prefopt/version.h>
#include <prefopt/vocab_parallel.h>

#ifdef PREFOPT_OUTERMOST_PREFOPT
#undef PREFOPT_OUTERMOST_PREFOPT
#include <prefopt/detail/header_only.h>
#endif
