# SPDX-License-Identifier: Apache-2.0
# Checks that the library with the CUDA row kernels holds machine code for every real
# architecture asked for (cmake -P, driven by ctest): nvcc records "-arch sm_NN" for each SASS
# image in the fatbin.
#   OBJECT=<libprefopt.a or .so>  ARCHS=<PREFOPT_CUDA_ARCHITECTURES, '|'-separated>
cmake_minimum_required(VERSION 3.18)
string(REPLACE "|" ";" archs "${ARCHS}")
file(STRINGS "${OBJECT}" found REGEX "-arch sm_[0-9]+a?")
string(REGEX MATCHALL "sm_[0-9]+a?" found "${found}")
list(REMOVE_DUPLICATES found)
message(STATUS "machine code in ${OBJECT}: ${found}")
foreach(a IN LISTS archs)
  if(a MATCHES "^([0-9]+a?)(-real)?$")
    if(NOT "sm_${CMAKE_MATCH_1}" IN_LIST found)
      message(FATAL_ERROR "no sm_${CMAKE_MATCH_1} machine code in ${OBJECT} (found: ${found})")
    endif()
  endif()
endforeach()
