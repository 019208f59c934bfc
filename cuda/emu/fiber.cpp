// Context switch and fiber stacks of the CUDA emulation (see fiber.h).
#include "fiber.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if NYSTROM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if NYSTROM_EMU_ASM_SWITCH
// void nystrom_emu_swap(void** save_sp, void* load_sp)
// Pushes the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, switches to load_sp, pops the registers saved there and
// returns into that context. Caller-saved registers need no saving: the call
// itself tells the compiler they are clobbered. The FP control words (MXCSR,
// x87) are left alone: kernels never change the rounding mode.
// `ret` rather than Boost.Context's pop-and-jmp: a ping-pong of two contexts
// runs 5x faster with the jmp, but the fibers of a block all suspend through
// the same chain of calls, so a ret returns where the return-stack predictor
// expects, and the block runs 1.6x faster with it (tests/emu/bench.cpp).
extern "C" void nystrom_emu_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl nystrom_emu_swap
  .hidden nystrom_emu_swap
  .type nystrom_emu_swap, @function
nystrom_emu_swap:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size nystrom_emu_swap, .-nystrom_emu_swap
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

namespace nystrom::emu::detail {

const char* switch_mechanism() { return NYSTROM_EMU_ASM_SWITCH ? "x86-64 asm" : "ucontext"; }

void adopt_thread(Context& self) {
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* lo = nullptr;
    std::size_t size = 0;
    if (pthread_attr_getstack(&attr, &lo, &size) == 0) {
      self.stack_lo = lo;
      self.stack_size = size;
    }
    pthread_attr_destroy(&attr);
  }
}

void prepare(Context& c, void* lo, std::size_t size, void (*entry)()) {
  c.stack_lo = lo;
  c.stack_size = size;
  c.fake_stack = nullptr;
#if NYSTROM_EMU_ASM_SWITCH
  // The frame nystrom_emu_swap pops: six zeroed registers, then `entry` as
  // the return address, above it a null fake return address of `entry`
  // itself, so that `entry` starts with rsp = 8 (mod 16), as after a call.
  auto top = (reinterpret_cast<std::uintptr_t>(lo) + size) & ~std::uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top) - 8;
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[6] = reinterpret_cast<void*>(entry);
  frame[7] = nullptr;
  c.sp = frame;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

namespace {
inline void raw_switch(Context& from, Context& to) {
#if NYSTROM_EMU_ASM_SWITCH
  nystrom_emu_swap(&from.sp, to.sp);
#else
  if (swapcontext(&from.uc, &to.uc) != 0) {
    std::perror("nystrom emu: swapcontext");
    std::abort();
  }
#endif
}
}  // namespace

void on_fiber_start() {
#if NYSTROM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
}

void jump(Context& from, Context& to) {
#if NYSTROM_EMU_ASAN
  __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_lo, to.stack_size);
#endif
  raw_switch(from, to);
#if NYSTROM_EMU_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

void finish_and_jump(Context& from, Context& to) {
#if NYSTROM_EMU_ASAN
  // A null fake-stack slot tells ASan that this stack is done with.
  __sanitizer_start_switch_fiber(nullptr, to.stack_lo, to.stack_size);
#endif
  raw_switch(from, to);
  std::fputs("nystrom emu: a finished fiber was resumed\n", stderr);
  std::abort();
}

StackPool::StackPool(std::size_t stack_bytes) {
  const long page = sysconf(_SC_PAGESIZE);
  page_ = page > 0 ? static_cast<std::size_t>(page) : 4096;
  bytes_ = (stack_bytes + page_ - 1) / page_ * page_;
}

StackPool::~StackPool() {
  for (void* lo : stacks_) munmap(static_cast<char*>(lo) - page_, bytes_ + page_);
}

bool StackPool::reserve(int n) {
  while (static_cast<int>(stacks_.size()) < n) {
    void* base = mmap(nullptr, bytes_ + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
    if (base == MAP_FAILED) return false;
    if (mprotect(base, page_, PROT_NONE) != 0) {
      munmap(base, bytes_ + page_);
      return false;
    }
    stacks_.push_back(static_cast<char*>(base) + page_);
  }
  return true;
}

void StackPool::unpoison(int i) const {
#if NYSTROM_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(lo(i), bytes_);
#else
  (void)i;
#endif
}

}  // namespace nystrom::emu::detail
