// SPDX-License-Identifier: Apache-2.0
// The range check of an option enum whose values are 0 ... last: a value cast from an integer
// (a config file, a C API) can lie outside it, and must get a named error, not an out-of-bounds
// read or a silent fallback.
#pragma once
#include <c10/util/Exception.h>
#include <prefopt/config.h>

PREFOPT_BEGIN_NAMESPACE
namespace detail {

/// Throws `fn: <option> is not <what> value (got N)` unless `value` is one of 0 ... `last`;
/// `what` carries its article ("a GatherBackend").
template <typename E>
void check_enum(const char* fn, const char* option, const char* what, E value, E last) {
  TORCH_CHECK_VALUE(static_cast<unsigned>(value) <= static_cast<unsigned>(last), fn, ": ", option,
                    " is not ", what, " value (got ", static_cast<int>(value), ")");
}

}  // namespace detail
PREFOPT_END_NAMESPACE
