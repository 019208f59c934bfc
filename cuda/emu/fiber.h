// Fibers of the CUDA emulation: execution contexts on stacks of their own,
// switched cooperatively on one OS thread. Internal to the emulator
// (cuda/emu/*.cpp); kernel sources never include it.
//
// The switch is a minimal x86-64 one (the six callee-saved registers and the
// stack pointer: the System V ABI leaves everything else to the caller) or,
// on other machines or with NYSTROM_EMU_UCONTEXT defined, glibc's
// swapcontext. Under AddressSanitizer every switch is announced with
// __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber, so ASan
// knows which stack is current and keeps its fake stacks apart.
#pragma once

#include <cstddef>
#include <vector>

#if defined(__x86_64__) && !defined(NYSTROM_EMU_UCONTEXT)
#define NYSTROM_EMU_ASM_SWITCH 1
#else
#define NYSTROM_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define NYSTROM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NYSTROM_EMU_ASAN 1
#endif
#endif
#ifndef NYSTROM_EMU_ASAN
#define NYSTROM_EMU_ASAN 0
#endif

namespace nystrom::emu::detail {

/// The name of the context switch compiled in: "x86-64 asm" or "ucontext".
const char* switch_mechanism();

/// A suspended execution context: the host thread's own, or a fiber's.
struct Context {
#if NYSTROM_EMU_ASM_SWITCH
  void* sp = nullptr;  // saved stack pointer; the callee-saved registers sit below it
#else
  ucontext_t uc;
#endif
  const void* stack_lo = nullptr;  // the stack this context runs on (ASan needs it)
  std::size_t stack_size = 0;
  void* fake_stack = nullptr;      // ASan's fake stack while suspended
};

/// Records the stack bounds of the calling OS thread in `self` (for ASan).
void adopt_thread(Context& self);

/// Makes `c` start `entry` on the stack [lo, lo + size) at its next resume.
/// `entry` must never return: it ends with finish_and_jump.
void prepare(Context& c, void* lo, std::size_t size, void (*entry)());

/// The first call of every fiber's entry function (ASan bookkeeping).
void on_fiber_start();

/// Suspends `from` and resumes `to`; returns when something resumes `from`.
void jump(Context& from, Context& to);

/// Leaves `from` for good (its stack may be reused at once) and resumes `to`.
[[noreturn]] void finish_and_jump(Context& from, Context& to);

/// Fiber stacks of one OS thread, kept for reuse across blocks and launches:
/// fresh stacks per block would cost more in page faults than most kernels.
/// Each stack has an inaccessible guard page below it, so an overflow faults
/// instead of running into the neighbouring stack.
class StackPool {
 public:
  explicit StackPool(std::size_t stack_bytes);
  ~StackPool();
  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;

  /// At least n stacks exist afterwards (false when the memory cannot be mapped).
  bool reserve(int n);
  void* lo(int i) const { return stacks_[static_cast<std::size_t>(i)]; }
  std::size_t size() const { return bytes_; }
  /// Clears ASan's poisoning of stack i (after a fiber on it was abandoned).
  void unpoison(int i) const;

 private:
  std::size_t bytes_;
  std::size_t page_;
  std::vector<void*> stacks_;  // usable low end of each stack; the guard page is below
};

}  // namespace nystrom::emu::detail
