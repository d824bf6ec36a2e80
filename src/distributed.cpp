// SPDX-License-Identifier: Apache-2.0
// Compiled mode: process groups and the cross-rank pieces of the losses.
#include <prefopt/distributed-inl.h>
