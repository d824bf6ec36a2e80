# SPDX-License-Identifier: Apache-2.0
# The one place where prefopt's CMake adapts to the libtorch it is built with: Debian's 1.13
# (CPU), or a 2.x from a torch wheel or the official zip (CPU or CUDA). C++ differences live in
# include/prefopt/detail/compat.h. Included by prefopt's CMakeLists.txt and, installed, by
# prefoptConfig.cmake, so that a consumer gets the same settings.
#
# prefopt_find_torch([REQUIRED]) finds Torch and sets, in the caller's scope:
#   PREFOPT_TORCH_CXX_STANDARD  17, or 20 for libtorch >= 2.14 (its headers require C++20)
#   PREFOPT_FMT_TARGET          the {fmt} target to link: fmt::fmt, or prefopt::fmt_bundled
#                               when libtorch ships its own {fmt} headers (see below)

macro(prefopt_find_torch)
  # With a CUDA libtorch, torch's CMake picks nvcc flags from TORCH_CUDA_ARCH_LIST and, when it
  # is unset and no GPU is present, for a dozen architectures. prefopt compiles its own kernels
  # for PREFOPT_CUDA_ARCHITECTURES (torch's CMake sets CMAKE_CUDA_ARCHITECTURES to OFF, so that
  # variable cannot carry the choice); keep torch's list to the same two generations.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
  endif()
  find_package(Torch ${ARGN})
  if(Torch_FOUND OR TORCH_FOUND)
    _prefopt_check_torch_libraries()
    _prefopt_wheel_rpath_link()
    if(Torch_VERSION VERSION_GREATER_EQUAL 2.14)
      set(PREFOPT_TORCH_CXX_STANDARD 20)
    else()
      set(PREFOPT_TORCH_CXX_STANDARD 17)
    endif()
    # A torch wheel's include directory holds a copy of {fmt} (v12 in torch 2.14). Every
    # translation unit that includes libtorch searches it before /usr/include, so a system
    # {fmt}'s headers are never seen and its library would not match them: use libtorch's copy,
    # header-only, so that the headers compiled and the code linked agree.
    # (A libtorch installed in /usr shares /usr/include with the system's {fmt}: not a copy.)
    get_filename_component(_prefopt_torch_include "${TORCH_INSTALL_PREFIX}/include" REALPATH)
    if(EXISTS "${_prefopt_torch_include}/fmt/format.h" AND NOT _prefopt_torch_include IN_LIST
       CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES AND NOT _prefopt_torch_include MATCHES "^/usr(/local)?/include$")
      if(NOT TARGET prefopt::fmt_bundled)
        add_library(prefopt::fmt_bundled INTERFACE IMPORTED)
        set_target_properties(prefopt::fmt_bundled PROPERTIES
          INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INSTALL_PREFIX}/include"
          INTERFACE_COMPILE_DEFINITIONS "FMT_HEADER_ONLY=1")
      endif()
      set(PREFOPT_FMT_TARGET prefopt::fmt_bundled)
    else()
      set(PREFOPT_FMT_TARGET fmt::fmt)
    endif()
  endif()
endmacro()

# Torch's config finds its libraries with find_library(... PATHS <prefix>/lib), which searches
# the system directories first: on a machine that also has Debian's libtorch-dev, pointing
# CMAKE_PREFIX_PATH at a wheel's torch/share/cmake (PyTorch's documented recipe) fills
# TORCH_LIBRARIES with Debian's /usr/lib/.../libtorch.so and libc10.so. The `torch` target that
# prefopt links is right either way, but a host linking ${TORCH_LIBRARIES} would mix the two.
function(_prefopt_check_torch_libraries)
  get_filename_component(_prefix "${TORCH_INSTALL_PREFIX}" REALPATH)
  foreach(_lib IN ITEMS TORCH_LIBRARY C10_LIBRARY C10_CUDA_LIBRARY)
    if(${_lib})
      get_filename_component(_path "${${_lib}}" REALPATH)
      string(FIND "${_path}" "${_prefix}/" _at)
      if(NOT _at EQUAL 0)
        message(WARNING
          "prefopt: libtorch's CMake config at ${Torch_DIR} set ${_lib}=${${_lib}}, which is not "
          "under that libtorch (${_prefix}): another libtorch is installed on this system, and "
          "TORCH_LIBRARIES mixes the two. prefopt links the `torch` target, which is right; to "
          "fix TORCH_LIBRARIES add ${_prefix} itself (not only its share/cmake) to "
          "CMAKE_PREFIX_PATH, in a fresh build directory.")
      endif()
    endif()
  endforeach()
endfunction()

# A torch wheel loads the NVIDIA libraries of the wheels installed beside it
# (site-packages/nvidia/*/lib) through its RPATH. The linker searches an executable's own -rpath
# first, which holds the CUDA toolkit's lib directory, where another version may sit (the 13.0
# toolkit's NCCL lacks symbols torch 2.14's libtorch_cuda needs): name the wheels' directories
# with -rpath-link, which comes before both. Run time follows libtorch's RPATH, as it should.
function(_prefopt_wheel_rpath_link)
  if(TARGET torch_cuda AND IS_DIRECTORY "${TORCH_INSTALL_PREFIX}/../nvidia")
    file(GLOB _dirs LIST_DIRECTORIES true "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
    if(_dirs)
      string(REPLACE ";" ":" _dirs "${_dirs}")
      set_property(TARGET torch APPEND PROPERTY INTERFACE_LINK_OPTIONS "LINKER:-rpath-link,${_dirs}")
    endif()
  endif()
endfunction()
