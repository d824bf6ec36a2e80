// SPDX-License-Identifier: Apache-2.0
// A parent project's own library, built on prefopt.
#include <prefopt/losses/dpo.h>

double parent_default_beta() { return prefopt::DPOLossOptions().beta(); }
