# SPDX-License-Identifier: Apache-2.0
# Builds and runs a consumer project of prefopt (cmake -P script, driven by ctest).
#   MODE=find_package:     `cmake --install` into a fresh prefix, then find_package(prefopt
#                          COMPONENTS core fmt), with Eigen3 made unfindable: the compiled
#                          library's users need no Eigen3.
#   MODE=build_tree:       find_package(prefopt) with prefopt_DIR at the build tree.
#   MODE=header_only:      from the install, prefopt::header_only: libtorch alone is linked.
#   MODE=add_subdirectory: a parent project adds prefopt's source tree, links it into a library
#                          of its own and installs and exports that, with no prefopt option set.
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

set(source ${MODE})
if(MODE STREQUAL "find_package" OR MODE STREQUAL "header_only")
  run(${CMAKE_COMMAND} --install ${PREFOPT_BINARY_DIR} --prefix ${work}/prefix)
  foreach(f include/prefopt/prefopt.h include/prefopt/logprobs-inl.h
            include/prefopt/detail/rows-inl.h lib/cmake/prefopt/prefoptConfig.cmake
            lib/cmake/prefopt/prefoptConfigVersion.cmake lib/cmake/prefopt/prefopt_coreTargets.cmake
            lib/cmake/prefopt/prefoptTorch.cmake)
    if(NOT EXISTS ${work}/prefix/${f})
      message(FATAL_ERROR "packaging test: ${f} was not installed")
    endif()
  endforeach()
  list(PREPEND prefix_path ${work}/prefix)
  if(MODE STREQUAL "find_package")
    list(APPEND configure_args -DCMAKE_DISABLE_FIND_PACKAGE_Eigen3=ON)
  else()
    # Unoptimised: the code must not depend on the optimiser inlining it (the CPU kernels'
    # vector helpers once did).
    list(APPEND configure_args -DCMAKE_BUILD_TYPE=Debug)
  endif()
elseif(MODE STREQUAL "build_tree")
  set(source find_package)
  list(APPEND configure_args -Dprefopt_DIR=${PREFOPT_BINARY_DIR})
else()
  list(APPEND configure_args -DPREFOPT_SOURCE_DIR=${PREFOPT_SOURCE_DIR})
endif()
# Through the environment: a ';' list does not survive as one argument of execute_process.
string(REPLACE ";" ":" prefix_path "${prefix_path}")
set(ENV{CMAKE_PREFIX_PATH} "${prefix_path}")

run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR}/${source} -B ${work}/build ${configure_args})
run(${CMAKE_COMMAND} --build ${work}/build)
run(${work}/build/consumer)
if(MODE STREQUAL "add_subdirectory")
  # The parent's install: its own exported target, and prefopt's, which it links.
  run(${CMAKE_COMMAND} --install ${work}/build --prefix ${work}/parent-prefix)
  foreach(f lib/cmake/parent/parentTargets.cmake lib/cmake/prefopt/prefopt_coreTargets.cmake)
    if(NOT EXISTS ${work}/parent-prefix/${f})
      message(FATAL_ERROR "packaging test: the parent's install has no ${f}")
    endif()
  endforeach()
endif()
