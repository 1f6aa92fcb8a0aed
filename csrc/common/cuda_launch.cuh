// One launch macro for every kernel of the package:
//   RTDETR_LAUNCH(grid, block, smem, stream, kernel<T, G>)(args...);
// is kernel<<<grid, block, smem, stream>>>(args...) under nvcc, and a launch on the CPU
// emulator of tests/cuda_emu (which defines RTDETR_CUDA_EMU) otherwise, so the emulator
// compiles the .cu files as they are.
#pragma once

#if defined(RTDETR_CUDA_EMU)
#define RTDETR_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_emu::make_launch(__VA_ARGS__, grid, block, smem, stream, __FILE__, __LINE__)
#else
#define RTDETR_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
