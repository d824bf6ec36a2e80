# SPDX-License-Identifier: Apache-2.0
# Builds and runs a consumer project of prefopt (cmake -P script, driven by ctest).
#   MODE=find_package:     `cmake --install` into a fresh prefix, then find_package(prefopt).
#   MODE=add_subdirectory: the consumer adds prefopt's source tree as a subdirectory.
cmake_minimum_required(VERSION 3.18)
set(work ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${work})
file(MAKE_DIRECTORY ${work})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "packaging test (${MODE}) failed: ${cmd} -> ${rc}")
  endif()
endfunction()

set(configure_args -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${COMPILER}
  -DTorch_DIR=${TORCH_DIR} -DEXPECTED_VERSION=${VERSION})
string(REPLACE "|" ";" prefix_path "${PREFIX_PATH}")
if(LAUNCHER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER})
endif()

if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${PREFOPT_BINARY_DIR} --prefix ${work}/prefix)
  foreach(f include/prefopt/prefopt.h include/prefopt/logprobs.h lib/cmake/prefopt/prefoptConfig.cmake
            lib/cmake/prefopt/prefoptConfigVersion.cmake lib/cmake/prefopt/prefoptTargets.cmake
            lib/cmake/prefopt/prefoptTorch.cmake)
    if(NOT EXISTS ${work}/prefix/${f})
      message(FATAL_ERROR "packaging test: ${f} was not installed")
    endif()
  endforeach()
  list(PREPEND prefix_path ${work}/prefix)
else()
  list(APPEND configure_args -DPREFOPT_SOURCE_DIR=${PREFOPT_SOURCE_DIR})
endif()
# Through the environment: a ';' list does not survive as one argument of execute_process.
string(REPLACE ";" ":" prefix_path "${prefix_path}")
set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}")

run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/${MODE} -B ${work}/build ${configure_args})
run(${CMAKE_COMMAND} --build ${work}/build)
run(${work}/build/consumer)
