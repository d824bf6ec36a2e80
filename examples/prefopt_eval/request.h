// SPDX-License-Identifier: Apache-2.0
// prefopt-eval's request handling, shared by the tool (main.cpp) and its fuzz target
// (tests/fuzz/fuzz_eval.cpp), so that the fuzzer exercises exactly what the tool runs.
#pragma once

#include <string>
#include <string_view>

namespace prefopt_eval {

/// What prefopt-eval writes for one input: its standard output, standard error and exit status.
struct Reply {
  /// The answer, one JSON line (or pretty-printed), newline-terminated.
  std::string out;
  /// One "prefopt-eval: message" line per request that failed; empty when none did.
  std::string err;
  /// The exit status: 0, or 2 when the input is not JSON or any request failed.
  int status = 0;
};

/// Answers `text`: a loss request {"loss", "params", "inputs"}, a metrics request
/// {"metrics", "steps"}, or an array of them (one answer each, in order). A request that cannot
/// be answered gets {"error": message}; the others are still answered. `indent` >= 0
/// pretty-prints the answer with that many spaces (at most 16: nlohmann-json reads past its
/// indent buffer from 1026). Never throws for any `text`: what the input can get wrong is an
/// {"error"}.
Reply handle(std::string_view text, int indent = -1);

/// The reply {"error": message}, status 2, for a failure outside any request (an unreadable
/// file).
Reply error_reply(const std::string& message);

}  // namespace prefopt_eval
