# Compiler settings that must agree with the torch we build against.

# Torch 2.10+ headers want C++20; older releases build with C++17.
if(DEFINED Torch_VERSION AND Torch_VERSION VERSION_LESS 2.10)
  set(NYSTROM_CXX_STANDARD 17)
else()
  set(NYSTROM_CXX_STANDARD 20)
endif()

# The libstdc++ dual ABI: take the flag from the installed torch, never guess
# (a mismatch shows up as "undefined symbol: _ZN3c10..." at load time).
function(nystrom_torch_abi_flag out_var)
  set(_abi "")
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
      OUTPUT_VARIABLE _abi OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
    if(NOT _rc EQUAL 0)
      set(_abi "")
    endif()
  endif()
  if(_abi STREQUAL "" AND TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])")
    set(_abi ${CMAKE_MATCH_1})
  endif()
  if(_abi STREQUAL "")
    set(${out_var} "" PARENT_SCOPE)
  else()
    message(STATUS "torch-nystrom: _GLIBCXX_USE_CXX11_ABI=${_abi} (from the installed torch)")
    set(${out_var} "_GLIBCXX_USE_CXX11_ABI=${_abi}" PARENT_SCOPE)
  endif()
endfunction()
