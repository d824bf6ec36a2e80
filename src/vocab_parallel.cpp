// SPDX-License-Identifier: Apache-2.0
// Compiled mode: the vocabulary-parallel ops.
#include <prefopt/vocab_parallel-inl.h>
