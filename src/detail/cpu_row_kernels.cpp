// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the CPU row kernels (built with -O3 whatever the build type).
#include <prefopt/detail/cpu_row_kernels-inl.h>
