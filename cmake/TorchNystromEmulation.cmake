# The emulated CUDA backend (included from the top-level CMakeLists.txt when
# NYSTROM_BUILD_EMULATION is ON): docs/DESIGN.md §11.
#
#   nystrom_emu                the emulation runtime (cuda/emu/emu.cmake)
#   nystrom_emulated           a shared library with the ops' common parts and
#                              the CUDA glue and kernels compiled as C++ against
#                              the emulator, registered at the CPU key. It
#                              replaces libnystrom in a test process
#                              (NYSTROM_LIBRARY=.../libnystrom_emulated.so).
#   emu_tests, emu_real_kernels  the emulator's own GoogleTest suites (tests/emu)
include(${PROJECT_SOURCE_DIR}/cuda/emu/emu.cmake)
target_compile_options(nystrom_emu PRIVATE -Wall -Wextra)

# The kernel instantiation files are .cu; a wrapper .cpp per file includes it
# so that the host compiler builds it (setting LANGUAGE on the .cu files
# themselves would also change the real CUDA build of the same sources).
file(GLOB _nystrom_emu_cu CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/cuda/*.cu)
set(_nystrom_emu_wrappers)
foreach(_cu IN LISTS _nystrom_emu_cu)
  get_filename_component(_name "${_cu}" NAME_WE)
  set(_wrapper "${CMAKE_CURRENT_BINARY_DIR}/emulated/${_name}.cpp")
  file(CONFIGURE OUTPUT "${_wrapper}" CONTENT "// Generated: ${_cu} built for the CUDA emulation.\n#include \"${_cu}\"\n")
  list(APPEND _nystrom_emu_wrappers "${_wrapper}")
endforeach()

add_library(nystrom_emulated SHARED
  ${_nystrom_emu_wrappers}
  csrc/cuda/forward.cpp
  csrc/cuda/backward.cpp
  csrc/cuda/stages.cpp
  csrc/cuda/emulator_control.cpp
  csrc/cuda/cuda_build_info.cpp
  $<TARGET_OBJECTS:nystrom_common>)
set_target_properties(nystrom_emulated PROPERTIES
  CXX_STANDARD ${NYSTROM_CXX_STANDARD}
  CXX_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CXX_VISIBILITY_PRESET default
  INSTALL_RPATH "${_torch_lib_dir}")
target_include_directories(nystrom_emulated
  PUBLIC ${PROJECT_SOURCE_DIR}/csrc/include
  PRIVATE ${PROJECT_SOURCE_DIR}/csrc ${PROJECT_SOURCE_DIR}/cuda)
target_compile_definitions(nystrom_emulated PUBLIC ${NYSTROM_ABI_DEFINE})
# #pragma unroll is nvcc's; thread-local built-ins (threadIdx, ...) are read on
# every access: the initial-exec model avoids __tls_get_addr for them.
target_compile_options(nystrom_emulated PRIVATE -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas
                                                -ftls-model=initial-exec)
target_link_libraries(nystrom_emulated PUBLIC ${TORCH_LIBRARIES} PRIVATE nystrom_emu)
target_link_options(nystrom_emulated INTERFACE "LINKER:--no-as-needed")
foreach(_opt IN LISTS _nystrom_link_opts)
  target_link_options(nystrom_emulated INTERFACE "$<BUILD_INTERFACE:${_opt}>")
endforeach()

if(NYSTROM_BUILD_TESTS)
  enable_testing()
  add_subdirectory(tests/emu)
endif()
