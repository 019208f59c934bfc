// The emulated build's control op (docs/DESIGN.md §11), for the test suites
// that run the CUDA backend on the CPU (scripts/test_emulated.sh):
//
//   torch.ops.nystrom._emulator(command, argument="") -> str
//
//   "schedule" [inorder|reversed|random:SEED]  sets (with an argument) and returns the schedule
//   "arch" [sm90|sm86|sm89|sm80]               sets and returns the target profile
//   "threads" [N]                              OS threads per launch
//   "reset"                                    clears the sticky error (as cudaDeviceReset)
//   "last_error"                               the emulator's account of the last error ("" if none)
//   "kernels"                                  "name=launches" per line, every kernel launched so far
//   "smem"                                     "name=bytes" per line: dynamic shared memory of each
//                                              kernel's last launch
//   "banks"                                    "name=requests,wavefronts,ideal" per line: the modeled
//                                              shared-memory traffic of each kernel's WMMA loads and
//                                              stores so far (cuda/emu/wmma.h)
//   "inject_error"                             leaves a non-sticky launch error pending, as earlier
//                                              unrelated CUDA code could (tests of the glue's entry)
//
// Only the emulated library registers it: its presence is how Python tells
// the emulated backend from the CPU one.
#include <torch/library.h>

#include <sstream>
#include <string>

// After torch: the emulator's device side redefines CUDA's keywords.
#include "emu/seams.h"

namespace nystrom::cudaimpl {
namespace {

__global__ void noop_kernel() {}

std::string emulator(c10::string_view command_view, c10::string_view argument_view) {
  const std::string command(command_view), argument(argument_view);
  namespace emu = ::nystrom::emu;
  if (command == "schedule") {
    if (!argument.empty()) {
      emu::Schedule s;
      TORCH_CHECK(emu::parse_schedule(argument, &s), "_emulator: schedule must be inorder, reversed or random:SEED, got \"",
                  argument, "\"");
      emu::set_schedule(s);
    }
    return emu::schedule().str();
  }
  if (command == "arch") {
    if (!argument.empty()) {
      TORCH_CHECK(emu::set_arch(argument), "_emulator: unknown arch \"", argument, "\" (sm90, sm86, sm89, sm80)");
    }
    return emu::profile().arch;
  }
  if (command == "threads") {
    if (!argument.empty()) {
      const int n = std::stoi(argument);
      TORCH_CHECK(n >= 1, "_emulator: threads must be >= 1, got ", n);
      emu::set_threads(n);
    }
    return std::to_string(emu::threads());
  }
  if (command == "reset") {
    emu::reset();
    return "";
  }
  if (command == "last_error") return emu::last_error_detail();
  if (command == "kernels") {
    std::ostringstream os;
    for (const auto& [name, count] : emu::kernel_launches()) os << name << "=" << count << "\n";
    return os.str();
  }
  if (command == "smem") {
    std::ostringstream os;
    for (const auto& [name, bytes] : emu::kernel_smem()) os << name << "=" << bytes << "\n";
    return os.str();
  }
  if (command == "banks") {
    std::ostringstream os;
    for (const auto& c : emu::kernel_bank_traffic())
      os << c.name << "=" << c.requests << "," << c.wavefronts << "," << c.ideal << "\n";
    return os.str();
  }
  if (command == "inject_error") {
    NYSTROM_LAUNCH(noop_kernel, dim3(1, 70000, 1), dim3(1), 0, nullptr)();  // grid.y above 65535
    return cudaGetErrorString(cudaPeekAtLastError());
  }
  TORCH_CHECK(false, "_emulator: unknown command \"", command,
              "\" (schedule, arch, threads, reset, last_error, kernels, smem, banks, inject_error)");
}

}  // namespace
}  // namespace nystrom::cudaimpl

TORCH_LIBRARY_FRAGMENT(nystrom, m) {
  m.def("_emulator(str command, str argument=\"\") -> str", &nystrom::cudaimpl::emulator);
}
