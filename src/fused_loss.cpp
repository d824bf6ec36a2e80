// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the one-pass fused preference losses.
#include <prefopt/fused_loss-inl.h>
