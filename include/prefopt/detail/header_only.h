// SPDX-License-Identifier: Apache-2.0
// Header-only mode (PREFOPT_HEADER_ONLY): the outermost prefopt header a translation unit
// includes ends by including this file, which declares everything, then includes every
// implementation (the -inl.h files, their functions `inline`). Declarations come first so that
// no implementation meets a header that is still being read.
#pragma once

#ifndef PREFOPT_HEADER_ONLY
#error "prefopt/detail/header_only.h is for PREFOPT_HEADER_ONLY builds"
#endif

#include <prefopt/detail/cpu_gemm.h>
#include <prefopt/detail/cpu_row_kernels.h>
#include <prefopt/detail/rows.h>
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
#include <prefopt/vocab_parallel.h>

#include <prefopt/detail/cpu_gemm-inl.h>
#include <prefopt/detail/cpu_row_kernels-inl.h>
#include <prefopt/detail/rows-inl.h>
#include <prefopt/distributed-inl.h>
#include <prefopt/fused_logprobs-inl.h>
#include <prefopt/fused_loss-inl.h>
#include <prefopt/logprobs-inl.h>
#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/cpo-inl.h>
#include <prefopt/losses/dpo-inl.h>
#include <prefopt/losses/kto-inl.h>
#include <prefopt/losses/orpo-inl.h>
#include <prefopt/losses/tpo-inl.h>
#include <prefopt/metrics-inl.h>
#include <prefopt/vocab_parallel-inl.h>

#undef PREFOPT_INCLUDING
