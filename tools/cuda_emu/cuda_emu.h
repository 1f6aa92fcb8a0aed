// CUDA emulation on the CPU, for tests only (never part of the package).
//
// Force-included (g++ -include cuda_emu.h -x c++) in front of the project's UNCHANGED .cu
// files. Every CUDA thread of a block is a fiber; blocks run one after another. A thread runs
// without interruption from one sync point to the next (__syncthreads, every *_sync
// intrinsic, ldmatrix, mma), where it yields to the scheduler (cuda_emu.cpp). The scheduler
// resolves the warp or block operation as PTX defines it and checks it: a lane missing from
// its own mask, mismatched masks or intrinsics within a warp, a lane that exited while named
// in a mask, a shuffle reading a lane outside the mask, .aligned ops run by part of a warp,
// __syncthreads at different places or after some threads exited, deadlock. Each failure
// prints the file:line of the operations involved and ends the process with status 3.
//
// The order in which runnable threads resume is the schedule (round-robin, reversed, one
// warp alone until a block barrier, seeded random): a race between sync points shows as a
// schedule-dependent result.
//
// __shared__ variables live in one linker section (see the build in
// scripts/check_cuda_emu.sh), refilled with 0xFF bytes (NaN in every
// float type) before each block. cp.async (csrc/common/ptx.cuh) poisons its destination the
// same way until the wait_group that covers it. Device memory is host memory, so an
// -fsanitize=address build finds out-of-bounds accesses of the kernels.
#pragma once
#define RTDETR_CUDA_EMU 1

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef CUDA_EMU_ARCH
#define CUDA_EMU_ARCH 800
#endif

// the NVIDIA headers above were read as host code; from here on the sources see a device
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// function-local statics; the build renames their sections (-fdata-sections gives each its
// own .bss._ZZ... section) to cuda_emu_shared, since GCC drops a section attribute on the
// statics of function templates
#define __shared__ static
#define __constant__ static
#define __CUDA_ARCH__ CUDA_EMU_ARCH

namespace cuda_emu {

extern uint3 g_tidx;
extern dim3 g_block_idx, g_block_dim, g_grid_dim;

enum Op : int {
  kNone = 0,
  kSyncthreads,
  kSyncwarp,
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kLdmatrixX4,
  kMmaF16,
  kMmaBf16,
};

// one warp-collective operation of the current thread: blocks until the scheduler resolves it
uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                 int line);
void syncthreads(const char* file, int line);
[[noreturn]] void fail(const char* fmt, ...);

// shared-window addresses (what __cvta_generic_to_shared gives on a GPU)
uint32_t smem_offset(const void* p, const char* file, int line);
void* smem_pointer(uint32_t off, int bytes, const char* file, int line);

// the emulated PTX of csrc/common/ptx.cuh
void cp_async16(uint32_t dst, const void* src, int src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n, const char* file, int line);
void ldmatrix_x4(uint32_t addr, uint32_t* r, const char* file, int line);
void mma_m16n8k16(Op type, float* d, const uint32_t* a, const uint32_t* b, const char* file,
                  int line);

// schedules: "rr", "rev", "warp", "rand:<seed>"
void set_schedule(const char* name);
const char* schedule_name();

void run_grid(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t smem,
              const char* file, int line);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  const char* file;
  int line;
  template <typename... A>
  void operator()(A&&... a) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    run_grid(
        [](void* c) {
          Ctx* x = static_cast<Ctx*>(c);
          std::apply(x->kernel, x->args);  // each thread gets its own copy of the parameters
        },
        &ctx, grid, block, smem, file, line);
  }
};

template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t, const char* file, int line) {
  return Launch<P...>{kernel, grid, block, smem, file, line};
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace cuda_emu

#define threadIdx (static_cast<const uint3&>(::cuda_emu::g_tidx))
#define blockIdx (static_cast<const dim3&>(::cuda_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::g_grid_dim))
#define warpSize 32

#define CUDA_EMU_LOC const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()

// ---- barriers and warp intrinsics (sync points) ----
inline void __syncthreads(CUDA_EMU_LOC) { ::cuda_emu::syncthreads(emu_file, emu_line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, CUDA_EMU_LOC) {
  ::cuda_emu::warp_op(::cuda_emu::kSyncwarp, mask, 0, 0, 32, emu_file, emu_line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, CUDA_EMU_LOC) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(
      ::cuda_emu::kShfl, mask, ::cuda_emu::to_bits(v), src, width, emu_file, emu_line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, CUDA_EMU_LOC) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(::cuda_emu::kShflUp, mask,
                                                      ::cuda_emu::to_bits(v),
                                                      static_cast<int>(delta), width, emu_file,
                                                      emu_line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, CUDA_EMU_LOC) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(::cuda_emu::kShflDown, mask,
                                                      ::cuda_emu::to_bits(v),
                                                      static_cast<int>(delta), width, emu_file,
                                                      emu_line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, CUDA_EMU_LOC) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::warp_op(
      ::cuda_emu::kShflXor, mask, ::cuda_emu::to_bits(v), lane_mask, width, emu_file, emu_line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, CUDA_EMU_LOC) {
  return static_cast<unsigned>(
      ::cuda_emu::warp_op(::cuda_emu::kBallot, mask, pred != 0, 0, 32, emu_file, emu_line));
}
inline int __any_sync(unsigned mask, int pred, CUDA_EMU_LOC) {
  return static_cast<int>(
      ::cuda_emu::warp_op(::cuda_emu::kAny, mask, pred != 0, 0, 32, emu_file, emu_line));
}
inline int __all_sync(unsigned mask, int pred, CUDA_EMU_LOC) {
  return static_cast<int>(
      ::cuda_emu::warp_op(::cuda_emu::kAll, mask, pred != 0, 0, 32, emu_file, emu_line));
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics: the fibers of a process run on one OS thread, so these are exact ----
#define CUDA_EMU_INT_ATOMICS(T)                                                              \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }       \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }       \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }       \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }         \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }     \
  inline T atomicMax(T* p, T v) {                                                            \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                            \
    if (v > old) __atomic_store_n(p, v, __ATOMIC_SEQ_CST);                                   \
    return old;                                                                              \
  }                                                                                          \
  inline T atomicMin(T* p, T v) {                                                            \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                            \
    if (v < old) __atomic_store_n(p, v, __ATOMIC_SEQ_CST);                                   \
    return old;                                                                              \
  }                                                                                          \
  inline T atomicCAS(T* p, T cmp, T v) {                                                     \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
    return cmp;                                                                              \
  }
CUDA_EMU_INT_ATOMICS(int)
CUDA_EMU_INT_ATOMICS(unsigned)
CUDA_EMU_INT_ATOMICS(unsigned long long)
CUDA_EMU_INT_ATOMICS(long long)
#undef CUDA_EMU_INT_ATOMICS
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
#if CUDA_EMU_ARCH >= 900
inline float4 atomicAdd(float4* p, float4 v) {
  const float4 old = *p;
  p->x += v.x;
  p->y += v.y;
  p->z += v.z;
  p->w += v.w;
  return old;
}
#endif

// ---- loads, bit casts, math ----
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }

inline unsigned __float_as_uint(float x) { return ::cuda_emu::from_bits<unsigned>(::cuda_emu::to_bits(x)); }
inline int __float_as_int(float x) { return ::cuda_emu::from_bits<int>(::cuda_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::cuda_emu::from_bits<float>(x); }
inline float __int_as_float(int x) {
  return ::cuda_emu::from_bits<float>(static_cast<uint32_t>(x));
}
inline long long __double_as_longlong(double x) { return ::cuda_emu::from_bits<long long>(::cuda_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::cuda_emu::from_bits<double>(static_cast<uint64_t>(x)); }
// PTX cvt.rni.s64.f64: NaN gives 0x8000000000000000, out-of-range values saturate
inline long long __double2ll_rn(double x) {
  if (x != x) return static_cast<long long>(0x8000000000000000ull);
  if (x >= 9.2233720368547758e18) return 0x7fffffffffffffffll;
  if (x <= -9.2233720368547758e18) return static_cast<long long>(0x8000000000000000ull);
  return static_cast<long long>(std::nearbyint(x));
}
inline int __float2int_rn(float x) {
  if (x != x) return 0;
  if (x >= 2147483648.f) return 0x7fffffff;
  if (x <= -2147483648.f) return static_cast<int>(0x80000000u);
  return static_cast<int>(std::nearbyint(x));
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.f : x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __lanemask_lt() { return (1u << (threadIdx.x & 31u)) - 1u; }

// CUDA's device min/max overloads (the host C++ library has none in the global namespace)
#define CUDA_EMU_MINMAX(T)                                \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
using std::isfinite;
using std::isinf;
using std::isnan;
