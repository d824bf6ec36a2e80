// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the fused LM-head op.
#include <prefopt/fused_logprobs-inl.h>
