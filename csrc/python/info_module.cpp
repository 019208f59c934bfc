// torch_nystrom._C: the compiled library's account of itself, for
// `python -m torch_nystrom.info` (python/torch_nystrom/info.py).
//
// The ops are registered by the operator library through TORCH_LIBRARY, so
// that TorchScript and C++ callers need no Python; this module only reads
// nystrom_build_info() (csrc/build_info.h) from the library this process has
// already loaded (torch_nystrom.library_path(): the ordinary one, or the
// emulated one that NYSTROM_LIBRARY names). It does not link either: a second
// copy of the ops in one process would register the namespace twice.
#include <pybind11/pybind11.h>

#include <dlfcn.h>

#include <stdexcept>
#include <string>

namespace {

std::string build_info(const std::string& library) {
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) {
    throw std::runtime_error("torch_nystrom._C.build_info: " + library +
                             " is not loaded in this process (import torch_nystrom first)");
  }
  using Fn = const char* (*)();
  auto fn = reinterpret_cast<Fn>(dlsym(handle, "nystrom_build_info"));
  std::string out = fn != nullptr ? fn() : "";
  dlclose(handle);  // drops the reference RTLD_NOLOAD took; the library stays loaded
  if (fn == nullptr) {
    throw std::runtime_error("torch_nystrom._C.build_info: " + library + " has no nystrom_build_info (an older build?)");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch-nystrom's compiled library, described by itself (see torch_nystrom.info)";
  m.def("build_info", &build_info, pybind11::arg("library"),
        "The JSON build description of the loaded operator library at `library`.");
}
