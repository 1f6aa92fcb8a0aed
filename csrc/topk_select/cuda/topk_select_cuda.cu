// Fused top-K query selection: per-anchor max over C, exact top-K, sort, gather of the outputs,
// in one kernel launch.
//
// Order: every anchor becomes a distinct 64-bit key, (order key of its score) << 32 | ~index,
// where the order key's unsigned order is the float order with NaN lowest (below -inf) and -0
// folded into +0. Larger key = earlier; equal scores put the lower index first. Keys are
// distinct, so "the K largest keys" is one set and the order matches the reference bit for bit.
//
// Grid (G, B): G CTAs share one image so that a small batch still fills the chip. Each CTA
// takes a chunk of anchors, selects its best min(K, chunk) keys by radix select in shared memory
// and writes them to a workspace; the last CTA of the image to finish (atomic counter, reset by
// that CTA so the next launch and CUDA graph replays start from zero) radix-selects the K best
// of the G*K candidates, bitonic-sorts them and writes scores, indices and, for detection
// post-processing, labels and pixel boxes.
//
// Raw pointers and cudaStream_t only: no torch headers, so nvcc compiles this file alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/cuda_launch.cuh"
#include "topk_select/cuda/topk_select_cuda.h"

namespace rtdetr_fast {
namespace topk {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// NaN maps to 0xFFFFFFFF here so that the max over classes propagates it, as torch.amax does;
// it is remapped to 0 (below -inf, whose key is 0x007FFFFF) before ranking
__device__ __forceinline__ uint32_t max_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  uint32_t bits = x == 0.0f ? 0u : __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t ok) {
  if (ok == 0u) return __uint_as_float(0x7FC00000u);
  return __uint_as_float((ok & 0x80000000u) ? (ok ^ 0x80000000u) : ~ok);
}

struct Shared {
  uint32_t okey[kMaxChunk];
  unsigned long long sel[kMaxK];
  uint32_t hist[256];
  unsigned long long prefix, mask;
  int remaining, done, count, last;
};

// Block-wide radix select, 8 bits a pass from the top: leaves (prefix, mask) such that the
// kk largest of the n keys are exactly those with (key & mask) >= prefix. Stops early once the
// bin holding the kk-th key holds exactly the keys still needed.
template <typename GetKey>
__device__ void radix_select(Shared& s, GetKey get, int n, int kk) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    s.prefix = 0;
    s.mask = 0;
    s.remaining = kk;
    s.done = kk >= n;
  }
  __syncthreads();
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (s.done) break;  // uniform: written by thread 0 before the barrier
    for (int i = tid; i < 256; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    const unsigned long long prefix = s.prefix, mask = s.mask;
    for (int i = tid; i < n; i += blockDim.x) {
      const unsigned long long key = get(i);
      if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // every lane reads the count still needed BEFORE the scan's shuffles: the lane that
      // owns the selected bin rewrites it below, and a lane reading it after that write
      // (lanes of a warp are not in lockstep) could match a second bin and select too many
      const uint32_t rem = static_cast<uint32_t>(s.remaining);
      // lane l owns digits 255-8l ... 248-8l, so lanes in order walk the digits downwards
      uint32_t c[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = s.hist[255 - (tid * 8 + j)];
        sum += c[j];
      }
      uint32_t incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (tid >= o) incl += v;
      }
      uint32_t before = incl - sum;
      if (before < rem && incl >= rem) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (before + c[j] >= rem) {
            const unsigned long long d = 255 - (tid * 8 + j);
            s.prefix = prefix | (d << shift);
            s.mask = mask | (0xFFull << shift);
            s.remaining = static_cast<int>(rem - before);
            s.done = c[j] == rem - before;
            break;
          }
          before += c[j];
        }
      }
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ float load_as_float(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == kDTypeFloat32) return load_as_float<float>(p, i);
  if (dtype == kDTypeFloat16) return load_as_float<__half>(p, i);
  return load_as_float<__nv_bfloat16>(p, i);
}
// rounds through the boxes dtype, as the reference's per-op torch arithmetic does
__device__ __forceinline__ float round_to(float x, int dtype) {
  if (dtype == kDTypeFloat32) return x;
  if (dtype == kDTypeFloat16) return __half2float(__float2half_rn(x));
  return __bfloat162float(__float2bfloat16_rn(x));
}
__device__ __forceinline__ void store_any(void* p, int dtype, int64_t i, float x) {
  if (dtype == kDTypeFloat32)
    static_cast<float*>(p)[i] = x;
  else if (dtype == kDTypeFloat16)
    static_cast<__half*>(p)[i] = __float2half_rn(x);
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_kernel(Params p) {
  __shared__ Shared s;
  const int tid = threadIdx.x;
  const int g = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(g) * p.chunk;
  const int len = static_cast<int>(p.N - row0 < p.chunk ? p.N - row0 : p.chunk);
  const T* x = static_cast<const T*>(p.logits) + (b * p.N + row0) * p.C;

  for (int i = tid; i < len; i += blockDim.x) s.okey[i] = 0;
  __syncthreads();
  // the chunk's rows are contiguous: a flat, coalesced walk over len*C values
  const int64_t total = static_cast<int64_t>(len) * p.C;
  for (int64_t e = tid; e < total; e += blockDim.x) {
    atomicMax(&s.okey[static_cast<int>(e / p.C)], max_key(to_float(x[e])));
  }
  __syncthreads();
  for (int i = tid; i < len; i += blockDim.x)
    if (s.okey[i] == 0xFFFFFFFFu) s.okey[i] = 0;  // NaN ranks below every real score
  __syncthreads();

  const uint32_t low0 = 0xFFFFFFFFu - static_cast<uint32_t>(row0);
  auto chunk_key = [&](int i) -> unsigned long long {
    return (static_cast<unsigned long long>(s.okey[i]) << 32) | (low0 - static_cast<uint32_t>(i));
  };
  const int kk = min(p.K, len);
  radix_select(s, chunk_key, len, kk);
  const unsigned long long prefix = s.prefix, mask = s.mask;
  if (tid == 0) s.count = 0;
  __syncthreads();

  // with one CTA per image the chunk's selection is the answer: it goes straight to shared
  unsigned long long* out =
      p.G == 1 ? s.sel : p.workspace + (b * p.G + g) * static_cast<int64_t>(p.K);
  for (int i = tid; i < len; i += blockDim.x) {
    const unsigned long long key = chunk_key(i);
    if ((key & mask) >= prefix) out[atomicAdd(&s.count, 1)] = key;
  }
  if (p.G > 1) {
    // key 0 is below every anchor's key (the low word of a real key is never 0 for N < 2^32)
    for (int i = kk + tid; i < p.K; i += blockDim.x) out[i] = 0;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      const unsigned int seen = atomicAdd(&p.counters[b], 1u);
      s.last = seen == static_cast<unsigned int>(p.G - 1);
      if (s.last) p.counters[b] = 0;  // ready for the next launch / graph replay
    }
    __syncthreads();
    if (!s.last) return;
    __threadfence();
    const unsigned long long* cand = p.workspace + b * p.G * static_cast<int64_t>(p.K);
    // other CTAs wrote these: read through L2, never a stale L1 line
    auto cand_key = [&](int i) -> unsigned long long { return __ldcg(cand + i); };
    const int n = p.G * p.K;
    radix_select(s, cand_key, n, p.K);
    const unsigned long long mprefix = s.prefix, mmask = s.mask;
    if (tid == 0) s.count = 0;
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x) {
      const unsigned long long key = cand_key(i);
      if ((key & mmask) >= mprefix) s.sel[atomicAdd(&s.count, 1)] = key;
    }
  }
  // pad to a power of two with keys that sort last, then bitonic sort descending
  int ks = 1;
  while (ks < p.K) ks <<= 1;
  for (int i = p.K + tid; i < ks; i += blockDim.x) s.sel[i] = 0;
  __syncthreads();
  for (int size = 2; size <= ks; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < ks / 2; t += blockDim.x) {
        const int pos = 2 * t - (t & (stride - 1));
        const unsigned long long a = s.sel[pos], c = s.sel[pos + stride];
        const bool desc = (pos & size) == 0;
        if ((a < c) == desc) {
          s.sel[pos] = c;
          s.sel[pos + stride] = a;
        }
      }
      __syncthreads();
    }
  }

  for (int j = tid; j < p.K; j += blockDim.x) {
    const unsigned long long key = s.sel[j];
    const int64_t idx = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
    const int64_t o = b * p.K + j;
    static_cast<T*>(p.scores)[o] = from_float<T>(key_to_float(static_cast<uint32_t>(key >> 32)));
    if (p.boxes == nullptr) {
      p.indices[o] = idx;
      continue;
    }
    const int64_t q = idx / p.C_det;
    p.labels[o] = idx - q * p.C_det;
    const int64_t bi = (b * p.Q_det + q) * 4;
    const int dt = p.box_dtype;
    const float cx = load_any(p.boxes, dt, bi), cy = load_any(p.boxes, dt, bi + 1);
    const float hw = 0.5f * load_any(p.boxes, dt, bi + 2), hh = 0.5f * load_any(p.boxes, dt, bi + 3);
    const float H = round_to(static_cast<float>(p.sizes[2 * b]), dt);
    const float W = round_to(static_cast<float>(p.sizes[2 * b + 1]), dt);
    store_any(p.xyxy, dt, 4 * o + 0, round_to(cx - hw, dt) * W);
    store_any(p.xyxy, dt, 4 * o + 1, round_to(cy - hh, dt) * H);
    store_any(p.xyxy, dt, 4 * o + 2, round_to(cx + hw, dt) * W);
    store_any(p.xyxy, dt, 4 * o + 3, round_to(cy + hh, dt) * H);
  }
}

cudaError_t launch_topk(const Params& p, int dtype, int64_t B, cudaStream_t stream) {
  const dim3 grid(p.G, static_cast<unsigned int>(B));
  if (dtype == kDTypeFloat32)
    RTDETR_LAUNCH(grid, kThreads, 0, stream, topk_kernel<float>)(p);
  else if (dtype == kDTypeFloat16)
    RTDETR_LAUNCH(grid, kThreads, 0, stream, topk_kernel<__half>)(p);
  else
    RTDETR_LAUNCH(grid, kThreads, 0, stream, topk_kernel<__nv_bfloat16>)(p);
  return cudaGetLastError();
}

}  // namespace topk
}  // namespace rtdetr_fast
