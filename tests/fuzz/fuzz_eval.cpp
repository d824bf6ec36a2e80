// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: prefopt-eval's request handling (examples/prefopt_eval/request.h), the same
// function the tool calls. Any input must get an answer: JSON on "stdout", status 0 or 2, a
// message on "stderr" exactly when the status is 2. A crash, a sanitizer report, an exception
// escaping handle() or a broken contract (a trap) is a finding.
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "request.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // One thread: libtorch's pool would only add scheduling noise to inputs this small.
  at::set_num_threads(1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  // The last byte picks the indent now and then, so that pretty-printing is fuzzed too.
  const int indent = size > 0 && data[size - 1] < 17 ? data[size - 1] : -1;
  const auto reply = prefopt_eval::handle(text, indent);
  if (reply.status != 0 && reply.status != 2) __builtin_trap();
  if ((reply.status == 2) != !reply.err.empty()) __builtin_trap();
  if (reply.out.empty() || reply.out.back() != '\n') __builtin_trap();
  if (!nlohmann::json::accept(reply.out)) __builtin_trap();
  return 0;
}
