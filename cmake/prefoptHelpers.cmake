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

# PREFOPT_SANITIZE: ASan + UBSan on everything this project compiles and links, stopping at the
# first report (-fno-sanitize-recover), frame pointers kept for the reports' stacks. libtorch
# itself stays uninstrumented: Debian ships no ASan build of it.
function(prefopt_enable_sanitizers)
  if(NOT PREFOPT_SANITIZE AND NOT PREFOPT_FUZZ)
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "PREFOPT_SANITIZE needs GCC or Clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  if(PREFOPT_FUZZ AND NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "PREFOPT_FUZZ needs clang (libFuzzer), not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  set(flags -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_compile_options(${flags})
  add_link_options(${flags})
  # The tests' environment under the sanitizers (appended to PREFOPT_TEST_ENV): fail on the
  # first report, and ignore the leaks of libtorch's own static state, which
  # tests/sanitize/lsan.supp lists (no prefopt frame in it).
  # Reports name functions and lines through llvm-symbolizer (Debian's llvm-14 has it under a
  # versioned name only).
  find_program(PREFOPT_LLVM_SYMBOLIZER NAMES llvm-symbolizer-14 llvm-symbolizer
               HINTS /usr/lib/llvm-14/bin)
  set(symbolizer "")
  if(PREFOPT_LLVM_SYMBOLIZER)
    set(symbolizer ":external_symbolizer_path=${PREFOPT_LLVM_SYMBOLIZER}")
  endif()
  set(PREFOPT_SANITIZER_ENV
      "ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1${symbolizer}"
      "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1${symbolizer}"
      "LSAN_OPTIONS=suppressions=${PROJECT_SOURCE_DIR}/tests/sanitize/lsan.supp:print_suppressions=0"
      PARENT_SCOPE)
  message(STATUS "prefopt: sanitizers ON (${flags})")
endfunction()
