# SPDX-License-Identifier: Apache-2.0
# Builds and runs tests/eigen_only/consumer.cpp with prefopt's and Eigen's include directories
# only (cmake -P script, driven by ctest), and fails if <prefopt/eigen.h> reads any header of
# libtorch, fmt, or of prefopt's libtorch layer. Debian installs libtorch's headers under
# /usr/include, where a compiler finds them without -I, so the headers actually read are
# listed (-M) and checked, not just the compilation's success.
#   COMPILER, SOURCE_DIR, EIGEN_INCLUDE, WORK_DIR
cmake_minimum_required(VERSION 3.18)
file(MAKE_DIRECTORY ${WORK_DIR})
set(src ${SOURCE_DIR}/tests/eigen_only/consumer.cpp)
set(flags -std=c++17 -Wall -Wextra -Werror -I${SOURCE_DIR}/include -I${EIGEN_INCLUDE})

execute_process(COMMAND ${COMPILER} ${flags} -M ${src}
                RESULT_VARIABLE rc OUTPUT_VARIABLE deps ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "eigen_only: listing the headers failed (${rc}): ${err}")
endif()
string(REGEX REPLACE "[ \\\\\n]+" ";" deps "${deps}")
set(read_prefopt "")
foreach(d IN LISTS deps)
  if(d MATCHES "/(ATen|c10|torch|caffe2|fmt|nlohmann)/")
    message(FATAL_ERROR "eigen_only: <prefopt/eigen.h> reads ${d}, a header outside Eigen and "
                        "the standard library")
  endif()
  if(d MATCHES "/include/prefopt/(.*)$")
    set(h ${CMAKE_MATCH_1})
    if(NOT h MATCHES "^(eigen\\.h|eigen/[a-z_]+\\.h|config\\.h|version\\.h|losses/types\\.h)$")
      message(FATAL_ERROR "eigen_only: <prefopt/eigen.h> reads prefopt/${h}; only eigen.h, "
                          "eigen/*.h, config.h, version.h and losses/types.h are torch-free")
    endif()
    list(APPEND read_prefopt ${h})
  endif()
endforeach()
list(REMOVE_DUPLICATES read_prefopt)
message(STATUS "eigen_only: prefopt headers read: ${read_prefopt}")

execute_process(COMMAND ${COMPILER} ${flags} -O1 ${src} -o ${WORK_DIR}/consumer
                RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "eigen_only: compiling the consumer failed (${rc}): ${err}")
endif()
execute_process(COMMAND ${WORK_DIR}/consumer RESULT_VARIABLE rc OUTPUT_VARIABLE out)
message(STATUS "${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "eigen_only: the consumer failed (${rc})")
endif()
