// Scheduler, fibers, checked warp/block operations and the few runtime calls of the CUDA
// emulation (see cuda_emu.h). x86-64 only: the fiber switch is a few lines of assembly.
#include "cuda_emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

// The sanitizer build compiles this file without instrumentation (the kernels and harnesses
// are what it checks; memcpy/memset of the emulated copies still go through ASan's
// interceptors) and defines CUDA_EMU_ASAN for the fiber-switch annotations.
#if defined(__SANITIZE_ADDRESS__) && !defined(CUDA_EMU_ASAN)
#define CUDA_EMU_ASAN 1
#endif
#if defined(CUDA_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" {
extern char __start_cuda_emu_shared[] __attribute__((weak));
extern char __stop_cuda_emu_shared[] __attribute__((weak));
void cuda_emu_switch(void** save_sp, void* new_sp);
void cuda_emu_fiber_entry();
}

// callee-saved registers, MXCSR and the x87 control word; then the new stack's return address
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_fiber_entry
  .type cuda_emu_fiber_entry, @function
cuda_emu_fiber_entry:
  movq %r12, %rdi
  call cuda_emu_fiber_main
  ud2
  .size cuda_emu_fiber_entry, .-cuda_emu_fiber_entry
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace cuda_emu {

uint3 g_tidx;
dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

enum State { kRunnable, kWaitWarp, kWaitBar, kExited };

struct CopyOp {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Thread {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable address
  size_t stack_size = 0;
  int tid = 0, lane = 0, warp = 0;
  uint3 tidx{};
  State state = kExited;
  // the pending operation
  Op op = kNone;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  const char* file = "";
  int line = 0;
  uint32_t addr = 0;
  uint32_t* regs = nullptr;  // ldmatrix destinations / mma a
  const uint32_t* b = nullptr;
  float* d = nullptr;
  // cp.async: the open group and the committed ones, oldest first
  std::vector<CopyOp> open;
  std::vector<std::vector<CopyOp>> groups;
#if defined(CUDA_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

constexpr size_t kStackSize = size_t(1) << 20;  // reserved, touched lazily
constexpr int kMaxThreads = 1024;

Thread g_threads[kMaxThreads];
int g_nthreads = 0;
Thread* g_cur = nullptr;
void* g_sched_sp = nullptr;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
const char* g_launch_file = "";
int g_launch_line = 0;
#if defined(CUDA_EMU_ASAN)
const void* g_main_stack_bottom = nullptr;
size_t g_main_stack_size = 0;
void* g_sched_fake = nullptr;
#endif

enum Policy { kRoundRobin, kReversed, kWarpAlone, kRandom };
Policy g_policy = kRoundRobin;
std::string g_schedule = "rr";
std::mt19937_64 g_rng(1);

const char* op_name(Op op) {
  switch (op) {
    case kSyncthreads: return "__syncthreads";
    case kSyncwarp: return "__syncwarp";
    case kShfl: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    case kAny: return "__any_sync";
    case kAll: return "__all_sync";
    case kLdmatrixX4: return "ldmatrix.sync.aligned.m8n8.x4";
    case kMmaF16: return "mma.sync.aligned.m16n8k16.f16";
    case kMmaBf16: return "mma.sync.aligned.m16n8k16.bf16";
    default: return "?";
  }
}

std::string where() {
  char buf[256];
  snprintf(buf, sizeof buf, "block (%u,%u,%u) of the launch at %s:%d, schedule %s", g_block_idx.x,
           g_block_idx.y, g_block_idx.z, g_launch_file, g_launch_line, g_schedule.c_str());
  return buf;
}

}  // namespace

[[noreturn]] void fail(const char* fmt, ...) {
  fflush(stdout);
  fprintf(stderr, "cuda_emu: ERROR: ");
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n  in %s\n", where().c_str());
  fflush(stderr);
  _exit(3);
}

void set_schedule(const char* name) {
  g_schedule = name;
  if (!strcmp(name, "rr")) g_policy = kRoundRobin;
  else if (!strcmp(name, "rev")) g_policy = kReversed;
  else if (!strcmp(name, "warp")) g_policy = kWarpAlone;
  else if (!strncmp(name, "rand:", 5)) {
    g_policy = kRandom;
    g_rng.seed(strtoull(name + 5, nullptr, 10));
  } else {
    fprintf(stderr, "cuda_emu: unknown schedule %s (rr, rev, warp, rand:<seed>)\n", name);
    exit(2);
  }
}
const char* schedule_name() { return g_schedule.c_str(); }

}  // namespace cuda_emu

using namespace cuda_emu;

namespace {

void switch_to_scheduler(Thread* t, bool exiting) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t->fake_stack, g_main_stack_bottom,
                                 g_main_stack_size);
#endif
  cuda_emu_switch(&t->sp, g_sched_sp);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t->fake_stack, nullptr, nullptr);
#endif
  (void)exiting;
}

void resume(Thread* t) {
  g_cur = t;
  g_tidx = t->tidx;
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(&g_sched_fake, t->stack, t->stack_size);
#endif
  cuda_emu_switch(&g_sched_sp, t->sp);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

}  // namespace

extern "C" void cuda_emu_fiber_main(Thread* t) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
  g_body(g_ctx);
  t->state = kExited;
  t->open.clear();
  t->groups.clear();
  switch_to_scheduler(t, true);
  abort();  // never resumed
}

namespace {

void init_thread(Thread* t) {
  if (t->stack == nullptr) {
    // a guard page below each stack catches an overflow
    char* m = static_cast<char*>(mmap(nullptr, kStackSize + 4096, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
    mprotect(m, 4096, PROT_NONE);
    t->stack = m + 4096;
    t->stack_size = kStackSize;
  }
#if defined(CUDA_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(t->stack, t->stack_size);
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(t->stack) + t->stack_size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  s[-1] = reinterpret_cast<uint64_t>(&cuda_emu_fiber_entry);  // return address
  s[-2] = 0;                                                  // rbp
  s[-3] = 0;                                                  // rbx
  s[-4] = reinterpret_cast<uint64_t>(t);                      // r12: the fiber's argument
  s[-5] = 0;                                                  // r13
  s[-6] = 0;                                                  // r14
  s[-7] = 0;                                                  // r15
  s[-8] = mxcsr;
  s[-9] = fcw;
  t->sp = &s[-9];
  t->state = kRunnable;
  t->op = kNone;
  t->open.clear();
  t->groups.clear();
}

std::string describe(const Thread& t) {
  char buf[512];
  snprintf(buf, sizeof buf, "thread %d (warp %d lane %d) %s (%d) mask 0x%08x at %s:%d", t.tid,
           t.warp, t.lane, op_name(t.op), (int)t.op, t.mask, t.file, t.line);
  return buf;
}

bool is_aligned_op(Op op) { return op == kLdmatrixX4 || op == kMmaF16 || op == kMmaBf16; }

float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
float f16_bits_to_float(uint16_t h) {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (int i = 0; i < 65536; ++i) t[i] = __half2float(__ushort_as_half(static_cast<uint16_t>(i)));
    return t;
  }();
  return table[h];
}

// PTX ISA, "Matrix Fragments for mma.m16n8k16" (f16/bf16 inputs, f32 accumulators):
// groupID = lane >> 2, tig = lane & 3;
// A (16x16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
// B (16x8, col):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
// C/D (16x8):     c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1); the low 16 bits hold the lower index
void resolve_mma(Thread* const* lanes, Op op) {
  double A[16][16], B[16][8], C[16][8];
  auto cvt = [op](uint16_t h) {
    return static_cast<double>(op == kMmaF16 ? f16_bits_to_float(h) : bf16_bits_to_float(h));
  };
  for (int l = 0; l < 32; ++l) {
    const Thread* t = lanes[l];
    const int g = l >> 2, tg = l & 3;
    for (int r = 0; r < 4; ++r) {
      const uint32_t v = t->regs[r];
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * tg + ((r & 2) ? 8 : 0);
      A[row][col] = cvt(static_cast<uint16_t>(v & 0xffffu));
      A[row][col + 1] = cvt(static_cast<uint16_t>(v >> 16));
    }
    for (int r = 0; r < 2; ++r) {
      const uint32_t v = t->b[r];
      const int k = 2 * tg + (r ? 8 : 0);
      B[k][g] = cvt(static_cast<uint16_t>(v & 0xffffu));
      B[k + 1][g] = cvt(static_cast<uint16_t>(v >> 16));
    }
    C[g][2 * tg] = t->d[0];
    C[g][2 * tg + 1] = t->d[1];
    C[g + 8][2 * tg] = t->d[2];
    C[g + 8][2 * tg + 1] = t->d[3];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, tg = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * tg, 2 * tg + 1, 2 * tg, 2 * tg + 1};
    for (int r = 0; r < 4; ++r) {
      double s = C[rows[r]][cols[r]];
      for (int k = 0; k < 16; ++k) s += A[rows[r]][k] * B[k][cols[r]];
      lanes[l]->d[r] = static_cast<float>(s);
    }
  }
}

// ldmatrix .x4 (no .trans): lanes 8i..8i+7 give the row addresses of matrix i; register i of
// lane l receives row l/4 of matrix i, elements 2*(l%4) and 2*(l%4)+1
void resolve_ldmatrix(Thread* const* lanes) {
  for (int l = 0; l < 32; ++l)
    if (lanes[l]->addr & 15u)
      fail("ldmatrix row address 0x%x of lane %d is not 16-byte aligned at %s:%d",
           lanes[l]->addr, l, lanes[l]->file, lanes[l]->line);
  uint32_t out[32][4];
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const Thread* src = lanes[8 * i + l / 4];
      const char* row = static_cast<const char*>(smem_pointer(src->addr, 16, src->file, src->line));
      memcpy(&out[l][i], row + 4 * (l % 4), 4);
    }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) lanes[l]->regs[i] = out[l][i];
}

uint64_t resolve_shfl(Thread* const* lanes, const Thread* t) {
  const int w = t->width;
  const int base = t->lane & ~(w - 1);
  int src = t->lane;
  switch (t->op) {
    case kShfl: src = base + (t->arg & (w - 1)); break;
    case kShflUp: src = t->lane - t->arg < base ? t->lane : t->lane - t->arg; break;
    case kShflDown: src = t->lane + t->arg >= base + w ? t->lane : t->lane + t->arg; break;
    case kShflXor: {
      const int s = t->lane ^ t->arg;
      src = s >= base + w ? t->lane : s;
      break;
    }
    default: break;
  }
  if (src < 0 || src > 31 || !((t->mask >> src) & 1u) || lanes[src] == nullptr)
    fail("%s reads lane %d, which is not in its mask: %s", op_name(t->op), src,
         describe(*t).c_str());
  return lanes[src]->value;
}

// Resolves every complete warp operation of warp w; returns whether one was resolved.
bool resolve_warp(int w) {
  bool progress = false;
  const int first = 32 * w, last = std::min(first + 32, g_nthreads);
  for (int i = first; i < last; ++i) {
    Thread* t = &g_threads[i];
    if (t->state != kWaitWarp) continue;
    const unsigned mask = t->mask;
    bool ready = true;
    Thread* lanes[32] = {};
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      if (first + l >= last)
        fail("%s names lane %d, past the end of the block: %s", op_name(t->op), l,
             describe(*t).c_str());
      Thread* u = &g_threads[first + l];
      if (u->state == kExited && is_aligned_op(t->op))
        fail(".aligned operation run by part of the warp: lane %d has exited; %s", l,
             describe(*t).c_str());
      if (u->state == kExited)
        fail("lane %d exited but is named in the mask of %s", l, describe(*t).c_str());
      if (u->state != kWaitWarp) {
        ready = false;
        break;
      }
      lanes[l] = u;
    }
    if (!ready) continue;
    for (int l = 0; l < 32; ++l) {
      const Thread* u = lanes[l];
      if (u == nullptr) continue;
      if (u->op != t->op || u->mask != t->mask)
        fail("warp operations do not match:\n  %s\n  %s", describe(*t).c_str(),
             describe(*u).c_str());
      if (u->op != kSyncwarp && u->op != kBallot && u->op != kAny && u->op != kAll &&
          !is_aligned_op(u->op) && u->width != t->width)
        fail("shuffle widths differ:\n  %s\n  %s", describe(*t).c_str(), describe(*u).c_str());
      if (is_aligned_op(u->op) && (u->file != t->file || u->line != t->line))
        fail(".aligned operation reached at different places:\n  %s\n  %s",
             describe(*t).c_str(), describe(*u).c_str());
    }
    switch (t->op) {
      case kLdmatrixX4: resolve_ldmatrix(lanes); break;
      case kMmaF16:
      case kMmaBf16: resolve_mma(lanes, t->op); break;
      case kBallot:
      case kAny:
      case kAll: {
        unsigned bits = 0;
        for (int l = 0; l < 32; ++l)
          if (lanes[l] && lanes[l]->value) bits |= 1u << l;
        const uint64_t r = t->op == kBallot ? bits : t->op == kAny ? (bits != 0) : (bits == mask);
        for (int l = 0; l < 32; ++l)
          if (lanes[l]) lanes[l]->result = r;
        break;
      }
      case kSyncwarp: break;
      default: {
        uint64_t r[32];
        for (int l = 0; l < 32; ++l)
          if (lanes[l]) r[l] = resolve_shfl(lanes, lanes[l]);
        for (int l = 0; l < 32; ++l)
          if (lanes[l]) lanes[l]->result = r[l];
      }
    }
    for (int l = 0; l < 32; ++l)
      if (lanes[l]) {
        lanes[l]->state = kRunnable;
        lanes[l]->op = kNone;
      }
    progress = true;
  }
  return progress;
}

bool resolve_barrier() {
  int waiting = 0, exited = 0;
  const Thread* ref = nullptr;
  for (int i = 0; i < g_nthreads; ++i) {
    const Thread& t = g_threads[i];
    if (t.state == kWaitBar) {
      ++waiting;
      if (ref == nullptr) ref = &t;
    } else if (t.state == kExited) {
      ++exited;
    } else {
      return false;
    }
  }
  if (waiting == 0) return false;
  if (exited > 0)
    fail("__syncthreads at %s:%d reached by %d threads while %d threads of the block have "
         "exited", ref->file, ref->line, waiting, exited);
  for (int i = 0; i < g_nthreads; ++i) {
    const Thread& t = g_threads[i];
    if (t.file != ref->file || t.line != ref->line)
      fail("barrier divergence: threads wait at different __syncthreads:\n  %s\n  %s",
           describe(*ref).c_str(), describe(t).c_str());
  }
  for (int i = 0; i < g_nthreads; ++i) {
    g_threads[i].state = kRunnable;
    g_threads[i].op = kNone;
  }
  return true;
}

[[noreturn]] void deadlock() {
  std::string msg = "deadlock: no thread can run; waiting threads:";
  int shown = 0;
  for (int i = 0; i < g_nthreads; ++i) {
    const Thread& t = g_threads[i];
    if (t.state == kExited) continue;
    if (shown++ < 16) msg += "\n  " + describe(t);
  }
  if (shown > 16) msg += "\n  ... " + std::to_string(shown - 16) + " more";
  fail("%s", msg.c_str());
}

void poison_shared() {
  if (__start_cuda_emu_shared == nullptr) return;
  volatile char* p = __start_cuda_emu_shared;
  const size_t n = static_cast<size_t>(__stop_cuda_emu_shared - __start_cuda_emu_shared);
#if defined(CUDA_EMU_ASAN)
  // skip the redzones ASan puts between the shared variables (found once: they never move)
  static std::vector<std::pair<size_t, size_t>> ranges;
  static bool scanned = false;
  if (!scanned) {
    scanned = true;
    size_t i = 0;
    while (i < n) {
      while (i < n && __asan_address_is_poisoned(const_cast<char*>(p) + i)) ++i;
      size_t j = i;
      while (j < n && !__asan_address_is_poisoned(const_cast<char*>(p) + j)) ++j;
      if (j > i) ranges.emplace_back(i, j - i);
      i = j;
    }
  }
  for (const auto& r : ranges) memset(const_cast<char*>(p) + r.first, 0xff, r.second);
#else
  memset(const_cast<char*>(p), 0xff, n);
#endif
}

void run_block() {
  for (int i = 0; i < g_nthreads; ++i) init_thread(&g_threads[i]);
  poison_shared();
  const int nwarps = (g_nthreads + 31) / 32;
  std::vector<int> order(g_nthreads);
  for (;;) {
    bool progress = false;
    int only_warp = -1;
    if (g_policy == kWarpAlone) {
      // the first warp that can move runs alone: its warp operations are resolved first, and
      // no other warp runs until it waits at a block barrier or has exited
      for (int w = 0; w < nwarps && only_warp < 0; ++w) {
        bool can_run = resolve_warp(w);
        progress |= can_run;
        for (int i = 32 * w; i < std::min(32 * w + 32, g_nthreads) && !can_run; ++i)
          can_run = g_threads[i].state == kRunnable;
        if (can_run) only_warp = w;
      }
    } else if (g_policy == kRandom && (g_rng() & 1)) {
      only_warp = static_cast<int>(g_rng() % nwarps);
    }
    for (int i = 0; i < g_nthreads; ++i) order[i] = i;
    if (g_policy == kReversed) std::reverse(order.begin(), order.end());
    if (g_policy == kRandom) std::shuffle(order.begin(), order.end(), g_rng);
    for (int i : order) {
      Thread* t = &g_threads[i];
      if (t->state != kRunnable || (only_warp >= 0 && t->warp != only_warp)) continue;
      resume(t);
      progress = true;
    }
    if (only_warp >= 0) {
      progress |= resolve_warp(only_warp);
    } else if (g_policy == kReversed) {
      for (int w = nwarps - 1; w >= 0; --w) progress |= resolve_warp(w);
    } else {
      for (int w = 0; w < nwarps; ++w) progress |= resolve_warp(w);
    }
    if (progress) continue;
    if (only_warp >= 0 && g_policy == kRandom) continue;  // that warp had nothing to do
    bool all_exited = true;
    for (int i = 0; i < g_nthreads; ++i) all_exited &= g_threads[i].state == kExited;
    if (all_exited) break;
    if (!resolve_barrier()) deadlock();
  }
}

}  // namespace

namespace cuda_emu {

void run_grid(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t smem,
              const char* file, int line) {
  if (smem != 0) fail("dynamic shared memory is not emulated (launch at %s:%d)", file, line);
  const long n = static_cast<long>(block.x) * block.y * block.z;
  if (n < 1 || n > kMaxThreads) fail("block of %ld threads at %s:%d", n, file, line);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid at %s:%d", file, line);
  g_body = body;
  g_ctx = ctx;
  g_launch_file = file;
  g_launch_line = line;
  g_nthreads = static_cast<int>(n);
  g_block_dim = block;
  g_grid_dim = grid;
  for (int i = 0; i < g_nthreads; ++i) {
    Thread& t = g_threads[i];
    t.tid = i;
    t.lane = i & 31;
    t.warp = i >> 5;
    t.tidx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  // blocks one after another, in a schedule-dependent order
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3(x, y, z));
  if (g_policy == kReversed) std::reverse(blocks.begin(), blocks.end());
  if (g_policy == kRandom) std::shuffle(blocks.begin(), blocks.end(), g_rng);
  for (const dim3& b : blocks) {
    g_block_idx = b;
    run_block();
  }
}

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                 int line) {
  Thread* t = g_cur;
  if (t == nullptr) fail("%s called outside a kernel at %s:%d", op_name(op), file, line);
  t->op = op;
  t->mask = mask;
  t->value = value;
  t->arg = arg;
  t->width = width;
  t->file = file;
  t->line = line;
  if (!((mask >> t->lane) & 1u))
    fail("lane %d executes %s with a mask that does not contain it: %s", t->lane, op_name(op),
         describe(*t).c_str());
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("shuffle width %d is not a power of two in [1, 32]: %s", width, describe(*t).c_str());
  t->state = kWaitWarp;
  switch_to_scheduler(t, false);
  return t->result;
}

void syncthreads(const char* file, int line) {
  Thread* t = g_cur;
  if (t == nullptr) fail("__syncthreads called outside a kernel at %s:%d", file, line);
  t->op = kSyncthreads;
  t->mask = 0;
  t->file = file;
  t->line = line;
  t->state = kWaitBar;
  switch_to_scheduler(t, false);
}

uint32_t smem_offset(const void* p, const char* file, int line) {
  const char* c = static_cast<const char*>(p);
  if (__start_cuda_emu_shared == nullptr || c < __start_cuda_emu_shared ||
      c >= __stop_cuda_emu_shared)
    fail("__cvta_generic_to_shared of %p, which is not shared memory, at %s:%d", p, file, line);
  return static_cast<uint32_t>(c - __start_cuda_emu_shared);
}

void* smem_pointer(uint32_t off, int bytes, const char* file, int line) {
  if (__start_cuda_emu_shared == nullptr ||
      static_cast<size_t>(off) + bytes >
          static_cast<size_t>(__stop_cuda_emu_shared - __start_cuda_emu_shared))
    fail("shared address 0x%x (+%d bytes) is outside shared memory at %s:%d", off, bytes, file,
         line);
  return __start_cuda_emu_shared + off;
}

void cp_async16(uint32_t dst, const void* src, int src_bytes, const char* file, int line) {
  Thread* t = g_cur;
  if (dst & 15u) fail("cp.async destination 0x%x is not 16-byte aligned at %s:%d", dst, file, line);
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size %d at %s:%d", src_bytes, file, line);
  if (src_bytes > 0 && (reinterpret_cast<uintptr_t>(src) & 15u))
    fail("cp.async source %p is not 16-byte aligned at %s:%d", src, file, line);
  void* d = smem_pointer(dst, 16, file, line);
  memset(d, 0xff, 16);  // garbage until the wait_group that covers this copy
  t->open.push_back(CopyOp{d, src, src_bytes});
}

void cp_async_commit() {
  Thread* t = g_cur;
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}

void cp_async_wait(int n, const char* file, int line) {
  Thread* t = g_cur;
  if (n < 0) fail("cp.async.wait_group %d at %s:%d", n, file, line);
  while (static_cast<int>(t->groups.size()) > n) {
    for (const CopyOp& c : t->groups.front()) {
      if (c.src_bytes > 0) memcpy(c.dst, c.src, c.src_bytes);
      memset(static_cast<char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    }
    t->groups.erase(t->groups.begin());
  }
}

void ldmatrix_x4(uint32_t addr, uint32_t* r, const char* file, int line) {
  Thread* t = g_cur;
  t->addr = addr;
  t->regs = r;
  warp_op(kLdmatrixX4, 0xffffffffu, 0, 0, 32, file, line);
}

void mma_m16n8k16(Op type, float* d, const uint32_t* a, const uint32_t* b, const char* file,
                  int line) {
  Thread* t = g_cur;
  t->regs = const_cast<uint32_t*>(a);
  t->b = b;
  t->d = d;
  warp_op(type, 0xffffffffu, 0, 0, 32, file, line);
}

}  // namespace cuda_emu

// ---- the runtime calls the kernels' launchers and the harnesses make ----
namespace {
cudaError_t g_last_error = cudaSuccess;
}

extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return g_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "cuda_emu error";
}
cudaError_t cudaMallocManaged(void** p, size_t n, unsigned int) {
  // exact size (no rounding up) so that ASan sees a read one past the end
  *p = malloc(n == 0 ? 1 : n);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMalloc(void** p, size_t n) { return cudaMallocManaged(p, n, 0); }
cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, enum cudaMemcpyKind) {
  memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
}
