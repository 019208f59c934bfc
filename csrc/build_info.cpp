// nystrom_build_info (build_info.h).
#include "build_info.h"

#include <torch/version.h>

#include <string>

#ifndef NYSTROM_VERSION
#error "NYSTROM_VERSION is set by CMakeLists.txt"
#endif

extern "C" const char* nystrom_build_info(void) {
  static const std::string info = [] {
    std::string s = "{";
    s += "\"version\": \"" NYSTROM_VERSION "\"";
    s += ", \"torch_built\": \"" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
         "." + std::to_string(TORCH_VERSION_PATCH) + "\"";
#if defined(_GLIBCXX_USE_CXX11_ABI)
    s += ", \"cxx11_abi\": " + std::to_string(_GLIBCXX_USE_CXX11_ABI);
#endif
#if defined(__clang__)
    s += ", \"compiler\": \"clang " __clang_version__ "\"";
#elif defined(__GNUC__)
    s += ", \"compiler\": \"GCC " __VERSION__ "\"";
#endif
    s += ", \"cpu\": " + std::string(nystrom_cpu_build_info ? nystrom_cpu_build_info() : "null");
    s += ", \"cuda\": " + std::string(nystrom_cuda_build_info ? nystrom_cuda_build_info() : "null");
    return s + "}";
  }();
  return info.c_str();
}
