// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the metric reducer and the JSON Lines writer.
#include <prefopt/metrics-inl.h>
