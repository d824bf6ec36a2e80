# SPDX-License-Identifier: Apache-2.0
# Small helpers for prefopt's own build; nothing here is installed.

# Use ccache for C++ when it is installed and the user did not choose a launcher.
function(prefopt_enable_ccache)
  if(NOT CMAKE_CXX_COMPILER_LAUNCHER)
    find_program(PREFOPT_CCACHE ccache)
    if(PREFOPT_CCACHE)
      set(CMAKE_CXX_COMPILER_LAUNCHER ${PREFOPT_CCACHE} PARENT_SCOPE)
    endif()
  endif()
endfunction()

# Warnings are private to prefopt's own targets: consumers never inherit them.
function(prefopt_set_warnings target)
  if(PREFOPT_WARNINGS AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    # C++ only: nvcc takes host warnings through -Xcompiler.
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
    if(PREFOPT_WERROR)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
    endif()
  endif()
endfunction()
