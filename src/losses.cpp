// SPDX-License-Identifier: Apache-2.0
// Compiled mode: every loss of include/prefopt/losses/.
#include <prefopt/losses/common-inl.h>
#include <prefopt/losses/cpo-inl.h>
#include <prefopt/losses/dpo-inl.h>
#include <prefopt/losses/kto-inl.h>
#include <prefopt/losses/orpo-inl.h>
#include <prefopt/losses/tpo-inl.h>
