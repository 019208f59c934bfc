# The CPU emulation of the CUDA execution model (cuda/emu/), as the static
# library target nystrom_emu. Linking it gives a target NYSTROM_CUDA_EMULATION,
# the include directories of cuda/emu/seams.h (as "seams.h" or "emu/seams.h")
# and the CUDA headers, whose host paths it uses (cuda_fp16.h, cuda_bf16.h,
# math_constants.h, the runtime API types). The headers come from
# NYSTROM_EMU_CUDA_INCLUDE, else from a CUDA toolkit (CUDA_HOME,
# /usr/local/cuda); the nvidia-cuda-runtime wheel's include/ also works.
set(_nystrom_emu_dir "${CMAKE_CURRENT_LIST_DIR}")
if(NOT NYSTROM_EMU_CUDA_INCLUDE)
  find_path(NYSTROM_EMU_CUDA_INCLUDE cuda_fp16.h
            HINTS "$ENV{CUDA_HOME}/include" "$ENV{CUDA_PATH}/include" /usr/local/cuda/include)
endif()
if(NOT NYSTROM_EMU_CUDA_INCLUDE)
  message(FATAL_ERROR "nystrom_emu needs the CUDA headers (cuda_fp16.h): set NYSTROM_EMU_CUDA_INCLUDE")
endif()
find_package(Threads REQUIRED)
add_library(nystrom_emu STATIC
  "${_nystrom_emu_dir}/cuda_api.cpp"
  "${_nystrom_emu_dir}/executor.cpp"
  "${_nystrom_emu_dir}/fiber.cpp"
  "${_nystrom_emu_dir}/runtime.cpp")
target_include_directories(nystrom_emu PUBLIC "${_nystrom_emu_dir}" "${_nystrom_emu_dir}/.." "${NYSTROM_EMU_CUDA_INCLUDE}")
target_compile_definitions(nystrom_emu PUBLIC NYSTROM_CUDA_EMULATION)
target_compile_features(nystrom_emu PUBLIC cxx_std_17)
set_target_properties(nystrom_emu PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_link_libraries(nystrom_emu PUBLIC Threads::Threads ${CMAKE_DL_LIBS})
