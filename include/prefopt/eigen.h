// SPDX-License-Identifier: Apache-2.0
// prefopt's Eigen layer: the preference losses with closed-form gradients, log-prob gathering
// from a logits matrix and the training metrics, for hosts without libtorch. Header-only; needs
// Eigen3 and the standard library alone (no libtorch, no fmt).
//
// The libtorch layer (prefopt/losses/*.h, prefopt/logprobs.h, prefopt/metrics.h) is the
// reference each header here mirrors and is tested against (tests/test_eigen.cpp).
#pragma once

#include <prefopt/eigen/common.h>
#include <prefopt/eigen/cpo.h>
#include <prefopt/eigen/dpo.h>
#include <prefopt/eigen/kto.h>
#include <prefopt/eigen/logprobs.h>
#include <prefopt/eigen/metrics.h>
#include <prefopt/eigen/orpo.h>
#include <prefopt/eigen/tpo.h>
