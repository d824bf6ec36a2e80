// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the mixed-precision CPU GEMM lookup.
#include <prefopt/detail/cpu_gemm-inl.h>
