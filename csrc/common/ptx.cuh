// Every inline-PTX wrapper of the package, in one place. Under nvcc each is one asm statement;
// under the CPU emulator of tests/cuda_emu (RTDETR_CUDA_EMU) each calls an emulation written
// from the PTX ISA's definitions (fragment layouts of ldmatrix and mma, cp.async groups), with
// the caller's file:line for the emulator's checks.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#if defined(RTDETR_CUDA_EMU)
#define RTDETR_PTX_LOC_FIRST const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define RTDETR_PTX_LOC , RTDETR_PTX_LOC_FIRST
#else
#define RTDETR_PTX_LOC_FIRST
#define RTDETR_PTX_LOC
#endif

namespace rtdetr_fast {
namespace ptx {

// address in the shared window, as the .shared instructions take it
__device__ __forceinline__ uint32_t smem_addr(const void* p RTDETR_PTX_LOC) {
#if defined(RTDETR_CUDA_EMU)
  return ::cuda_emu::smem_offset(p, emu_file, emu_line);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// 16-byte async copy global -> shared; src_bytes < 16 zero-fills the rest (0: all zeros)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src,
                                           int src_bytes RTDETR_PTX_LOC) {
#if defined(RTDETR_CUDA_EMU)
  ::cuda_emu::cp_async16(dst, src, src_bytes, emu_file, emu_line);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(RTDETR_CUDA_EMU)
  ::cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// waits until at most N of this thread's committed groups are pending
template <int N>
__device__ __forceinline__ void cp_async_wait(RTDETR_PTX_LOC_FIRST) {
#if defined(RTDETR_CUDA_EMU)
  ::cuda_emu::cp_async_wait(N, emu_file, emu_line);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3 RTDETR_PTX_LOC) {
#if defined(RTDETR_CUDA_EMU)
  uint32_t r[4];
  ::cuda_emu::ldmatrix_x4(addr, r, emu_file, emu_line);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}

// d (16x8 f32) += a (16x16, row) * b (16x8, col), f16 inputs
__device__ __forceinline__ void mma_m16n8k16_f16(float* d, const uint32_t* a,
                                                 const uint32_t* b RTDETR_PTX_LOC) {
#if defined(RTDETR_CUDA_EMU)
  ::cuda_emu::mma_m16n8k16(::cuda_emu::kMmaF16, d, a, b, emu_file, emu_line);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// the same with bf16 inputs
__device__ __forceinline__ void mma_m16n8k16_bf16(float* d, const uint32_t* a,
                                                  const uint32_t* b RTDETR_PTX_LOC) {
#if defined(RTDETR_CUDA_EMU)
  ::cuda_emu::mma_m16n8k16(::cuda_emu::kMmaBf16, d, a, b, emu_file, emu_line);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace ptx
}  // namespace rtdetr_fast
