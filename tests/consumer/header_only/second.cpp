// SPDX-License-Identifier: Apache-2.0
// The second translation unit of the header-only consumer: every header again.
#include <prefopt/prefopt.h>

double margins_of(const prefopt::Metrics& m) { return m.at("rewards/margins"); }
