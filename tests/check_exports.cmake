# SPDX-License-Identifier: Apache-2.0
# The dynamic symbols a shared prefopt exports (cmake -P, driven by ctest): the public API, and
# nothing from namespace detail.   LIBRARY=<libprefopt.so>
cmake_minimum_required(VERSION 3.18)
execute_process(COMMAND nm -D -C --defined-only ${LIBRARY} OUTPUT_VARIABLE symbols
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nm -D ${LIBRARY} failed (${rc})")
endif()
string(REGEX MATCHALL "[^\n]*prefopt::v0::[^\n]*" ours "${symbols}")
list(LENGTH ours n)
message(STATUS "${n} exported prefopt symbols")
set(leaks "")
foreach(line IN LISTS ours)
  if(line MATCHES "prefopt::v0::detail::")
    list(APPEND leaks "${line}")
  endif()
endforeach()
if(leaks)
  list(LENGTH leaks k)
  list(SUBLIST leaks 0 10 first)
  string(REPLACE ";" "\n  " first "${first}")
  message(FATAL_ERROR "${k} detail:: symbols are exported, e.g.\n  ${first}")
endif()
foreach(api "prefopt::v0::functional::dpo_loss(" "prefopt::v0::functional::gather_logprobs("
            "prefopt::v0::functional::fused_logprobs(" "prefopt::v0::MetricAccumulator::compute("
            "prefopt::v0::init_process_group(" "prefopt::v0::functional::vocab_parallel_fused_logprobs(")
  string(FIND "${symbols}" "${api}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the public API symbol ${api}...) is not exported")
  endif()
endforeach()
