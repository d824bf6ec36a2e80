// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the gathering op, and the row machinery it shares with the fused op.
#include <prefopt/detail/rows-inl.h>
#include <prefopt/logprobs-inl.h>
