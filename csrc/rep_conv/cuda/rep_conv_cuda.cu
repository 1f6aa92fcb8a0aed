// Folded RepConv forward on tensor cores: y = act(conv3x3(x, w, stride 1, pad 1) + bias).
//
// Implicit GEMM, C[M, N] = A[M, K] * B[K, N] with M = B*H*W output pixels, N = C_out and
// K = 9*C_in ordered (tap, channel). x is NHWC, w is [C_out][3][3][C_in] (the channels_last
// weight), y is NHWC: a K tile of one tap is 32 contiguous channels of one input pixel (A) and of
// one output channel's weights (B), so both tiles are 16-byte cp.async copies with no transpose.
//
// CTA 128x128x32, 8 warps as 2 (M) x 4 (N), warp tile 64x32 = 4x4 mma.sync m16n8k16 with float32
// accumulators, a 3-stage cp.async pipeline (48 KiB of static shared memory, the most a kernel
// gets without opting in). Shared tiles are rows of 64 bytes (four 16-byte chunks); the chunk is
// XOR-swizzled with (row >> 1) & 3 so that the 8 rows one ldmatrix phase reads land in 8
// different 16-byte bank groups.
//
// mma.sync runs on sm_80 and sm_90 alike; wgmma (sm_90a only) is not used.
//
// Requirements the caller (rep_conv_cuda_glue.cpp, after the checks in rep_conv.cpp) establishes:
// C_in % 8 == 0 (16-byte rows), pointers 16-byte aligned, contiguous NHWC tensors, M and
// per-tensor extents below 2^31 elements. C_out, H, W and M are arbitrary: rows and columns past
// the end are zero-filled on load and masked on store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/cuda_launch.cuh"
#include "common/ptx.cuh"
#include "rep_conv/cuda/rep_conv_cuda.h"

namespace rtdetr_fast {
namespace rep_conv {
namespace {

constexpr int BM = 128;
constexpr int BN = 128;
constexpr int BK = 32;
constexpr int STAGES = 3;
constexpr int THREADS = 256;
constexpr int WARP_M = 64;
constexpr int WARP_N = 32;
constexpr int MT = WARP_M / 16;  // m16 tiles per warp
constexpr int NT = WARP_N / 8;   // n8 tiles per warp
constexpr int CHUNKS = BK / 8;   // 16-byte chunks per tile row
// rows of the A (or B) tile each thread copies per stage
constexpr int ROWS_PER_THREAD = BM * CHUNKS / THREADS;
static_assert(BM == BN, "the A and B copy loops share one row mapping");
static_assert(ROWS_PER_THREAD * THREADS == BM * CHUNKS, "copy loop must cover the tile");

__device__ __forceinline__ int swz(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::smem_addr;

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    ptx::mma_m16n8k16_f16(d, a, b);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    ptx::mma_m16n8k16_bf16(d, a, b);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <int ACT>
__device__ __forceinline__ float activate(float v) {
  if (ACT == kRelu) return fmaxf(v, 0.f);
  // x * sigmoid(x); __expf(-x) -> inf for very negative x gives x / inf = -0, the limit
  if (ACT == kSilu) return v / (1.f + __expf(-v));
  return v;
}

template <typename T, int ACT, bool HAS_BIAS>
__global__ void __launch_bounds__(THREADS)
    rep_conv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                    T* __restrict__ y, int M, int C_in, int C_out, int H, int W, int n_tiles) {
  __shared__ __align__(128) T sA[STAGES][BM * BK];
  __shared__ __align__(128) T sB[STAGES][BN * BK];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp >> 2;  // 0..1
  const int warp_n = warp & 3;   // 0..3
  // consecutive CTAs share the pixel tile (A) and sweep the output channels, so A is read from
  // DRAM once and the (small) weights stay in L2
  const int tile_m = blockIdx.x / n_tiles;
  const int tile_n = blockIdx.x - tile_m * n_tiles;
  const int m0 = tile_m * BM;
  const int n0 = tile_n * BN;
  const int HW = H * W;

  // this thread's copy rows: row = tid / CHUNKS + i * (THREADS / CHUNKS), chunk = tid % CHUNKS
  const int chunk = tid % CHUNKS;
  int a_oh[ROWS_PER_THREAD], a_ow[ROWS_PER_THREAD];
  int64_t a_img[ROWS_PER_THREAD];  // element offset of the row's image
  int64_t b_row[ROWS_PER_THREAD];  // element offset of the row's output channel, -1 past C_out
#pragma unroll
  for (int i = 0; i < ROWS_PER_THREAD; ++i) {
    const int row = tid / CHUNKS + i * (THREADS / CHUNKS);
    const int m = m0 + row;
    if (m < M) {
      const int b = m / HW;
      const int r = m - b * HW;
      a_oh[i] = r / W;
      a_ow[i] = r - a_oh[i] * W;
      a_img[i] = static_cast<int64_t>(b) * HW * C_in;
    } else {
      a_oh[i] = -0x40000000;  // every tap of a row past M falls outside the map
      a_ow[i] = 0;
      a_img[i] = 0;
    }
    const int n = n0 + row;
    b_row[i] = n < C_out ? static_cast<int64_t>(n) * 9 * C_in : -1;
  }

  const int c_tiles = (C_in + BK - 1) / BK;
  const int k_tiles = 9 * c_tiles;

  auto load_stage = [&](int stage, int kt) {
    const int tap = kt / c_tiles;
    const int c = (kt - tap * c_tiles) * BK + chunk * 8;
    const int kh = tap / 3 - 1;
    const int kw = tap - (tap / 3) * 3 - 1;
    const bool c_ok = c < C_in;  // C_in % 8 == 0: a chunk is wholly in or out
#pragma unroll
    for (int i = 0; i < ROWS_PER_THREAD; ++i) {
      const int row = tid / CHUNKS + i * (THREADS / CHUNKS);
      const int ih = a_oh[i] + kh;
      const int iw = a_ow[i] + kw;
      const bool ok = c_ok && ih >= 0 && ih < H && iw >= 0 && iw < W;
      const T* src = ok ? x + a_img[i] + (static_cast<int64_t>(ih) * W + iw) * C_in + c : x;
      cp_async16(smem_addr(&sA[stage][row * BK + swz(row, chunk) * 8]), src, ok ? 16 : 0);
      const bool okb = c_ok && b_row[i] >= 0;
      const T* srcb = okb ? w + b_row[i] + static_cast<int64_t>(tap) * C_in + c : w;
      cp_async16(smem_addr(&sB[stage][row * BK + swz(row, chunk) * 8]), srcb, okb ? 16 : 0);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait counts uniform
  }

  // ldmatrix addressing: lanes 0-15 give rows 0-15 of the k-low half, 16-31 the k-high half
  const int lrow = lane & 15;
  const int lhalf = lane >> 4;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int next = kt + STAGES - 1;
      if (next < k_tiles) load_stage(next % STAGES, next);
      cp_async_commit();
    }
    const int stage = kt % STAGES;
    const T* tA = sA[stage];
    const T* tB = sB[stage];
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[MT][4];
      uint32_t bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = warp_m * WARP_M + i * 16 + lrow;
        const int ch = kk * 2 + lhalf;
        ldmatrix_x4(smem_addr(&tA[row * BK + swz(row, ch) * 8]), af[i][0], af[i][1], af[i][2],
                    af[i][3]);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        // four 8x8 matrices: (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi)
        const int row = warp_n * WARP_N + j * 8 + (lane & 7) + ((lane >> 4) << 3);
        const int ch = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(smem_addr(&tB[row * BK + swz(row, ch) * 8]), bf[j][0], bf[j][1],
                    bf[j + 1][0], bf[j + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) Mma<T>::run(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // epilogue on the float32 accumulators: bias, activation, one rounding, one store
  const int group = lane >> 2;
  const int tig = lane & 3;
  const bool pairs = (C_out & 1) == 0;  // two adjacent channels are one aligned 4-byte store
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = n0 + warp_n * WARP_N + j * 8 + tig * 2;
    float b0 = 0.f, b1 = 0.f;
    if (HAS_BIAS) {
      if (n < C_out) b0 = Mma<T>::to_float(bias[n]);
      if (n + 1 < C_out) b1 = Mma<T>::to_float(bias[n + 1]);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + warp_m * WARP_M + i * 16 + group + h * 8;
        if (m >= M || n >= C_out) continue;
        const float v0 = activate<ACT>(acc[i][j][2 * h] + b0);
        const float v1 = activate<ACT>(acc[i][j][2 * h + 1] + b1);
        T* dst = y + static_cast<int64_t>(m) * C_out + n;
        if (pairs) {
          *reinterpret_cast<uint32_t*>(dst) = Mma<T>::pack(v0, v1);
        } else {
          dst[0] = Mma<T>::from_float(v0);
          if (n + 1 < C_out) dst[1] = Mma<T>::from_float(v1);
        }
      }
    }
  }
}

template <typename T, int ACT>
cudaError_t launch_act(const T* x, const T* w, const T* bias, T* y, int M, int C_in, int C_out,
                       int H, int W, cudaStream_t stream) {
  const int n_tiles = (C_out + BN - 1) / BN;
  const int64_t blocks = static_cast<int64_t>((M + BM - 1) / BM) * n_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(blocks));
  if (bias != nullptr)
    RTDETR_LAUNCH(grid, THREADS, 0, stream, rep_conv_kernel<T, ACT, true>)(
        x, w, bias, y, M, C_in, C_out, H, W, n_tiles);
  else
    RTDETR_LAUNCH(grid, THREADS, 0, stream, rep_conv_kernel<T, ACT, false>)(
        x, w, bias, y, M, C_in, C_out, H, W, n_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const T* x, const T* w, const T* bias, T* y, int M, int C_in,
                         int C_out, int H, int W, int act, cudaStream_t stream) {
  switch (act) {
    case kRelu:
      return launch_act<T, kRelu>(x, w, bias, y, M, C_in, C_out, H, W, stream);
    case kSilu:
      return launch_act<T, kSilu>(x, w, bias, y, M, C_in, C_out, H, W, stream);
    default:
      return launch_act<T, kIdentity>(x, w, bias, y, M, C_in, C_out, H, W, stream);
  }
}

}  // namespace

cudaError_t rep_conv_forward_cuda(const void* x, const void* w, const void* bias, void* y,
                                  int dtype, int B, int C_in, int H, int W, int C_out, int act,
                                  cudaStream_t stream) {
  const int64_t M = static_cast<int64_t>(B) * H * W;
  if (M == 0 || C_out == 0) return cudaSuccess;
  if (M > 0x7fffffff || C_in % 8 != 0) return cudaErrorInvalidValue;
  if (dtype == kDTypeFloat16)
    return launch_typed(static_cast<const __half*>(x), static_cast<const __half*>(w),
                        static_cast<const __half*>(bias), static_cast<__half*>(y),
                        static_cast<int>(M), C_in, C_out, H, W, act, stream);
  if (dtype == kDTypeBFloat16)
    return launch_typed(static_cast<const __nv_bfloat16*>(x),
                        static_cast<const __nv_bfloat16*>(w),
                        static_cast<const __nv_bfloat16*>(bias),
                        static_cast<__nv_bfloat16*>(y), static_cast<int>(M), C_in, C_out, H, W,
                        act, stream);
  return cudaErrorInvalidValue;
}

}  // namespace rep_conv
}  // namespace rtdetr_fast
