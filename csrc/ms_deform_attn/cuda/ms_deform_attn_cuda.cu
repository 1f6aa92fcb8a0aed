// CUDA kernels of rtdetr_fast::ms_deform_attn: float32, float16, bfloat16 (float32 accumulation).
//
// Work split: a group of G lanes (G | 32, inside one warp) serves one (b, q, h); each lane owns
// CPT = 16 / sizeof(T) channels, read with one 16-byte load per corner. The location and weight
// math of a point is done by one lane of the group (point j0 + lane) and broadcast with
// shuffles, so it runs once per (q, h, l, p) rather than once per channel. Both sampling
// methods share the kernels: discrete sampling (p.method) uses corner 0 only, and the loops
// over corners stop after it (a condition uniform over the grid, so no lane diverges).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "ms_deform_attn/cuda/ms_deform_attn_cuda.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace rtdetr_fast {
namespace msda {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Element conversion and 16-byte packing without type punning through memory, which would put
// the unpacked values on the stack.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kPerWord = 1;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static void unpack(unsigned w, float* x) { x[0] = __uint_as_float(w); }
  __device__ static unsigned pack(const float* x) { return __float_as_uint(x[0]); }
};

template <>
struct Elem<__half> {
  static constexpr int kPerWord = 2;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static void unpack(unsigned w, float* x) {
    x[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    x[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ static unsigned pack(const float* x) {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(x[0]))) |
           (static_cast<unsigned>(__half_as_ushort(__float2half_rn(x[1]))) << 16);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPerWord = 2;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static void unpack(unsigned w, float* x) {
    x[0] = __uint_as_float(w << 16);
    x[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ static unsigned pack(const float* x) {
    return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(x[0]))) |
           (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(x[1]))) << 16);
  }
};

template <typename T>
struct Chunk {
  static constexpr int kCPT = 16 / sizeof(T);
  static constexpr int kPerWord = Elem<T>::kPerWord;

  // n valid channels; vec: the 16 bytes at p are aligned and all valid (n == kCPT)
  __device__ static void load(const T* __restrict__ p, int n, bool vec, float (&x)[kCPT]) {
    if (vec) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      Elem<T>::unpack(raw.x, x + 0 * kPerWord);
      Elem<T>::unpack(raw.y, x + 1 * kPerWord);
      Elem<T>::unpack(raw.z, x + 2 * kPerWord);
      Elem<T>::unpack(raw.w, x + 3 * kPerWord);
    } else {
#pragma unroll
      for (int i = 0; i < kCPT; ++i) x[i] = i < n ? Elem<T>::to_float(p[i]) : 0.f;
    }
  }

  __device__ static void store(T* __restrict__ p, int n, bool vec, const float (&x)[kCPT]) {
    if (vec) {
      uint4 raw;
      raw.x = Elem<T>::pack(x + 0 * kPerWord);
      raw.y = Elem<T>::pack(x + 1 * kPerWord);
      raw.z = Elem<T>::pack(x + 2 * kPerWord);
      raw.w = Elem<T>::pack(x + 3 * kPerWord);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < kCPT; ++i)
        if (i < n) p[i] = Elem<T>::from_float(x[i]);
    }
  }
};

template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) return 0xffffffffu;
  else return ((1u << G) - 1u) << ((threadIdx.x & 31u) & ~static_cast<unsigned>(G - 1));
}

template <int G, typename V>
__device__ __forceinline__ V group_bcast(unsigned mask, V v, int src) {
  if constexpr (G == 1) return v;
  else return __shfl_sync(mask, v, src, G);
}

// Static indices only: a dynamically indexed kernel parameter array is copied to local memory.
__device__ __forceinline__ int level_of_point(const Problem& p, int j) {
  if (p.uniform_p > 0) return j / p.uniform_p;
  int l = 0;
#pragma unroll
  for (int i = 1; i < kMaxLevels; ++i)
    if (i < p.L && p.point_start[i] <= j) l = i;
  return l;
}

struct Point {
  Corners<float> c;
  float a;
  int64_t h, w;
};

// Location and weight math of point j of `row` (nothing sampled when j >= N).
template <typename T>
__device__ __forceinline__ void setup_point(const Problem& p, const T* __restrict__ loc,
                                            const T* __restrict__ attn, int64_t row, int j,
                                            Point& pt) {
  pt.a = 0.f;
  pt.h = pt.w = 0;
  if (j >= p.N) {
    bilinear_corners<float>(0.f, 0.f, 0, 0, 0, 0, pt.c);  // clears the corners
    return;
  }
  const int l = level_of_point(p, j);
  // static indices into the parameter arrays (see level_of_point)
  int64_t start = 0;
#pragma unroll
  for (int i = 0; i < kMaxLevels; ++i)
    if (i == l) {
      pt.h = p.shapes[2 * i];
      pt.w = p.shapes[2 * i + 1];
      start = p.starts[i];
    }
  const int64_t pj = row * p.N + j;
  sample_corners<float>(p.method, Elem<T>::to_float(loc[2 * pj]),
                        Elem<T>::to_float(loc[2 * pj + 1]), pt.h, pt.w, start, p.S, pt.c);
  pt.a = Elem<T>::to_float(attn[pj]);
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Problem p, const T* __restrict__ value, const T* __restrict__ loc,
                   const T* __restrict__ attn, T* __restrict__ out, const bool vec) {
  constexpr int CPT = Chunk<T>::kCPT;
  const int64_t rows = p.B * p.Q * p.H;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  // a whole group leaves together, so the shuffles below see every lane of their mask
  if (row >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % G);
  const unsigned mask = group_mask<G>();
  const int64_t h = row % p.H, b = row / (p.Q * p.H);
  const int64_t row_stride = p.H * p.D;
  const T* __restrict__ vb = value + (b * p.S * p.H + h) * p.D;
  // channels beyond G * CPT take further passes, repeating the point math (D > 128 or 256)
  const int ncorners = p.method == kMethodDiscrete ? 1 : 4;
  const int64_t first = static_cast<int64_t>(lane) * CPT;
  for (int64_t d0 = first; G < 32 ? d0 == first : d0 - first < p.D; d0 += G * CPT) {
    const int n = static_cast<int>(d0 < p.D ? (p.D - d0 < CPT ? p.D - d0 : CPT) : 0);
    float acc[CPT];
#pragma unroll
    for (int i = 0; i < CPT; ++i) acc[i] = 0.f;
    for (int j0 = 0; j0 < p.N; j0 += G) {
      Point pt;
      setup_point<T>(p, loc, attn, row, j0 + lane, pt);
      const int jn = p.N - j0 < G ? static_cast<int>(p.N - j0) : G;
      for (int k = 0; k < jn; ++k) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (c >= ncorners) break;
          const int r = group_bcast<G>(mask, pt.c.row[c], k);
          const float wa = group_bcast<G>(mask, pt.a * pt.c.w[c], k);
          if (r >= 0 && n > 0) {
            float x[CPT];
            Chunk<T>::load(vb + static_cast<int64_t>(r) * row_stride + d0, n, vec, x);
#pragma unroll
            for (int i = 0; i < CPT; ++i) acc[i] = fmaf(wa, x[i], acc[i]);
          }
        }
      }
    }
    if (n > 0) Chunk<T>::store(out + row * p.D + d0, n, vec, acc);
  }
}

// Fixed-point scale of the deterministic backward: a value element receives at most one
// corner of each of the Q * N samples of its (b, h), each at most max|a| * max|g| over the
// finite a and g (bilinear weights are <= 1, the discrete weight is 1), so scaling that bound to
// 2^61 cannot overflow int64. Integer addition is associative, so the sum is the same whatever
// order the atomics land in.
__device__ __forceinline__ double fixed_scale(const Problem& p, const unsigned* absmax) {
  const float mg = __uint_as_float(absmax[0]), ma = __uint_as_float(absmax[1]);
  const double bound = static_cast<double>(mg) * static_cast<double>(ma) *
                       static_cast<double>(p.Q) * static_cast<double>(p.N);
  if (!(bound > 0.0)) return 1.0;
  return ldexp(1.0, 60 - ilogb(bound));
}

// A non-finite contribution has no fixed-point value: the sums take the finite ones, and
// flag_kernel marks the elements the others reach. Each value element keeps two bits beside its
// sum (32 elements a 64-bit word, after the n sums): +inf seen, -inf seen; NaN sets both. Float
// addition of such values does not depend on their order either (NaN absorbs, inf absorbs the
// finite, +inf with -inf is NaN), so the element becomes exactly what the float atomics and the
// reference give it, and the elements no non-finite contribution reaches keep their sums.
constexpr unsigned long long kPosInf = 1ull, kNegInf = 2ull;

// The flags, one thread per (row, lane) as in backward_kernel: a thread whose channels of
// grad_output and whose row's weights are finite with a finite product of their maxima (the
// bilinear weights are <= 1, so no product overflows) has nothing to flag; any other recomputes
// the backward's products point by point from its own setup_point (the arithmetic of the lane
// whose values the backward broadcast) and flags the non-finite ones. A separate kernel, so the
// backward's registers are not shared with this rare path.
template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    flag_kernel(const Problem p, const T* __restrict__ grad_out, const T* __restrict__ loc,
                const T* __restrict__ attn, unsigned long long* __restrict__ fixed) {
  constexpr int CPT = Chunk<T>::kCPT;
  const int64_t rows = p.B * p.Q * p.H;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  if (row >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % G);
  const int64_t h = row % p.H, b = row / (p.Q * p.H);
  const int64_t row_stride = p.H * p.D;
  const int64_t vbase = (b * p.S * p.H + h) * p.D;
  const int64_t first = static_cast<int64_t>(lane) * CPT;
  const T* __restrict__ go = grad_out + row * p.D;
  bool special = false;
  float mg = 0.f, ma = 0.f;
  for (int64_t d0 = first; G < 32 ? d0 == first : d0 - first < p.D; d0 += G * CPT)
    for (int i = 0; i < CPT && d0 + i < p.D; ++i) {
      const float x = Elem<T>::to_float(go[d0 + i]);
      if (isfinite(x)) mg = fmaxf(mg, fabsf(x)); else special = true;
    }
  for (int j = 0; j < p.N; ++j) {
    const float x = Elem<T>::to_float(attn[row * p.N + j]);
    if (isfinite(x)) ma = fmaxf(ma, fabsf(x)); else special = true;
  }
  if (!special && isfinite(mg * ma)) return;
  const int ncorners = p.method == kMethodDiscrete ? 1 : 4;
  unsigned long long* flags = fixed + p.B * p.S * p.H * p.D;
  for (int j = 0; j < p.N; ++j) {
    Point pt;
    setup_point<T>(p, loc, attn, row, j, pt);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (c >= ncorners) break;
      if (pt.c.row[c] < 0) continue;
      const float wa = pt.a * pt.c.w[c];
      for (int64_t d0 = first; G < 32 ? d0 == first : d0 - first < p.D; d0 += G * CPT) {
        const int64_t off = vbase + static_cast<int64_t>(pt.c.row[c]) * row_stride + d0;
        for (int i = 0; i < CPT && d0 + i < p.D; ++i) {
          const float v = wa * Elem<T>::to_float(go[d0 + i]);
          if (isfinite(v)) continue;
          const unsigned long long code =
              isnan(v) ? (kPosInf | kNegInf) : (v > 0.f ? kPosInf : kNegInf);
          atomicOr(flags + (off + i) / 32, code << (2 * ((off + i) % 32)));
        }
      }
    }
  }
}

__device__ __forceinline__ void add_fixed(unsigned long long* dst, float v, double scale) {
  atomicAdd(dst, static_cast<unsigned long long>(__double2ll_rn(static_cast<double>(v) * scale)));
}

template <int CPT>
__device__ __forceinline__ void add_float(float* dst, int n, bool vec, float wa,
                                          const float (&g)[CPT]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (vec) {
#pragma unroll
    for (int i = 0; i < CPT; i += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(wa * g[i], wa * g[i + 1], wa * g[i + 2], wa * g[i + 3]));
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < CPT; ++i)
    if (i < n) atomicAdd(dst + i, wa * g[i]);
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Problem p, const T* __restrict__ grad_out, const T* __restrict__ value,
                    const T* __restrict__ loc, const T* __restrict__ attn,
                    float* __restrict__ grad_value_acc,
                    unsigned long long* __restrict__ grad_value_fixed,
                    const unsigned* __restrict__ absmax, T* __restrict__ grad_loc,
                    T* __restrict__ grad_attn, const bool vec, const bool deterministic) {
  constexpr int CPT = Chunk<T>::kCPT;
  const int64_t rows = p.B * p.Q * p.H;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / G;
  if (row >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % G);
  const unsigned mask = group_mask<G>();
  const int64_t h = row % p.H, b = row / (p.Q * p.H);
  const int64_t row_stride = p.H * p.D;
  const int64_t vbase = (b * p.S * p.H + h) * p.D;
  const T* __restrict__ go = grad_out + row * p.D;
  const double scale = deterministic ? fixed_scale(p, absmax) : 1.0;
  const int ncorners = p.method == kMethodDiscrete ? 1 : 4;
  // the first channel chunk of grad_output stays in registers; wider D reloads (L1 hits)
  const int64_t first = static_cast<int64_t>(lane) * CPT;
  const int n_first = static_cast<int>(first < p.D ? (p.D - first < CPT ? p.D - first : CPT) : 0);
  float g_first[CPT];
  Chunk<T>::load(go + first, n_first, vec && n_first == CPT, g_first);

  for (int j0 = 0; j0 < p.N; j0 += G) {
    Point pt;
    setup_point<T>(p, loc, attn, row, j0 + lane, pt);
    float my_dot[4] = {0.f, 0.f, 0.f, 0.f};
    const int jn = p.N - j0 < G ? static_cast<int>(p.N - j0) : G;
    for (int k = 0; k < jn; ++k) {
      int r[4];
      float wa[4], dot[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        r[c] = -1;
        wa[c] = 0.f;
        dot[c] = 0.f;
        if (c >= ncorners) continue;
        r[c] = group_bcast<G>(mask, pt.c.row[c], k);
        wa[c] = group_bcast<G>(mask, pt.a * pt.c.w[c], k);
      }
      // G < 32 is only chosen when G * CPT >= D: one chunk, whose grad_output is in registers
      for (int64_t d0 = first; G < 32 ? d0 == first : d0 - first < p.D; d0 += G * CPT) {
        const int n = static_cast<int>(d0 < p.D ? (p.D - d0 < CPT ? p.D - d0 : CPT) : 0);
        if (n == 0) continue;
        float g[CPT];
        if (G < 32 || d0 == first) {
#pragma unroll
          for (int i = 0; i < CPT; ++i) g[i] = g_first[i];
        } else {
          Chunk<T>::load(go + d0, n, vec, g);
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (r[c] < 0) continue;
          const int64_t off = vbase + static_cast<int64_t>(r[c]) * row_stride + d0;
          float x[CPT];
          Chunk<T>::load(value + off, n, vec, x);
          float s = 0.f;
#pragma unroll
          for (int i = 0; i < CPT; ++i) s = fmaf(g[i], x[i], s);
          dot[c] += s;
          if (deterministic) {
#pragma unroll
            for (int i = 0; i < CPT; ++i)
              if (i < n) {
                const float v = wa[c] * g[i];
                if (isfinite(v)) add_fixed(grad_value_fixed + off + i, v, scale);
              }
          } else {
            add_float<CPT>(grad_value_acc + off, n, vec, wa[c], g);
          }
        }
      }
      // butterfly over the group in a fixed pattern: the same sum on every lane, every run
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (c >= ncorners) break;
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) dot[c] += __shfl_xor_sync(mask, dot[c], off, G);
        if (lane == k) my_dot[c] = dot[c];
      }
    }
    const int j = j0 + lane;
    if (j < p.N) {
      float ga, gx, gy;
      sample_backward<float>(p.method, pt.c, my_dot, pt.a, pt.h, pt.w, &ga, &gx, &gy);
      const int64_t pj = row * p.N + j;
      grad_attn[pj] = Elem<T>::from_float(ga);
      grad_loc[2 * pj] = Elem<T>::from_float(gx);
      grad_loc[2 * pj + 1] = Elem<T>::from_float(gy);
    }
  }
}

// max |x| over the finite x as float bits: for non-negative floats the bit patterns order like
// the values, so an integer max is exact and order-independent. The non-finite x are left out:
// their contributions take the flags, not the fixed-point sums.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const T* __restrict__ x, int64_t n, unsigned* __restrict__ out) {
  unsigned m = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
  {
    const unsigned bits = __float_as_uint(Elem<T>::to_float(x[i])) & 0x7fffffffu;
    if (bits < 0x7f800000u) m = max(m, bits);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31u) == 0) atomicMax(out, m);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fixed_to_value_kernel(const Problem p, const unsigned long long* __restrict__ fixed,
                          const unsigned* __restrict__ absmax, T* __restrict__ out, int64_t n) {
  const double scale = fixed_scale(p, absmax);
  const unsigned long long* flags = fixed + n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const unsigned long long code = (flags[i / 32] >> (2 * (i % 32))) & (kPosInf | kNegInf);
    float v;
    if (code == 0) {
      v = static_cast<float>(static_cast<double>(static_cast<long long>(fixed[i])) / scale);
    } else if (code == kPosInf) {
      v = __int_as_float(0x7f800000);
    } else if (code == kNegInf) {
      v = __int_as_float(static_cast<int>(0xff800000u));
    } else {
      v = __int_as_float(0x7fc00000);
    }
    out[i] = Elem<T>::from_float(v);
  }
}

int group_size(int64_t D, int cpt) {
  const int64_t need = (D + cpt - 1) / cpt;
  int g = 1;
  while (g < need && g < 32) g *= 2;
  return g;
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

unsigned grid_stride_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 4096 ? (b < 1 ? 1 : b) : 4096);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int G>
void launch_forward(const Problem& p, const T* value, const T* loc, const T* attn, T* out,
                    bool vec, cudaStream_t stream) {
  const int64_t threads = p.B * p.Q * p.H * G;
  RTDETR_LAUNCH(blocks_for(threads), kThreads, 0, stream, forward_kernel<T, G>)(p, value, loc, attn,
                                                                              out, vec);
}

template <typename T>
cudaError_t forward_typed(const Problem& p, const void* value, const void* loc, const void* attn,
                          void* out, cudaStream_t stream) {
  if (p.B * p.Q * p.H * p.D == 0) return cudaSuccess;
  constexpr int CPT = Chunk<T>::kCPT;
  const bool vec = p.D % CPT == 0 && aligned16(value) && aligned16(out);
  const T* v = static_cast<const T*>(value);
  const T* l = static_cast<const T*>(loc);
  const T* a = static_cast<const T*>(attn);
  T* o = static_cast<T*>(out);
  switch (group_size(p.D, CPT)) {
    case 1: launch_forward<T, 1>(p, v, l, a, o, vec, stream); break;
    case 2: launch_forward<T, 2>(p, v, l, a, o, vec, stream); break;
    case 4: launch_forward<T, 4>(p, v, l, a, o, vec, stream); break;
    case 8: launch_forward<T, 8>(p, v, l, a, o, vec, stream); break;
    case 16: launch_forward<T, 16>(p, v, l, a, o, vec, stream); break;
    default: launch_forward<T, 32>(p, v, l, a, o, vec, stream); break;
  }
  return cudaGetLastError();
}

template <typename T, int G>
void launch_backward(const Problem& p, const T* go, const T* value, const T* loc, const T* attn,
                     float* acc, unsigned long long* fixed, const unsigned* absmax, T* gl,
                     T* ga, bool vec, bool det, cudaStream_t stream) {
  const int64_t threads = p.B * p.Q * p.H * G;
  RTDETR_LAUNCH(blocks_for(threads), kThreads, 0, stream, backward_kernel<T, G>)(
      p, go, value, loc, attn, acc, fixed, absmax, gl, ga, vec, det);
  if (det)
    RTDETR_LAUNCH(blocks_for(threads), kThreads, 0, stream, flag_kernel<T, G>)(p, go, loc, attn,
                                                                              fixed);
}

template <typename T>
cudaError_t backward_typed(const Problem& p, const void* grad_out, const void* value,
                           const void* loc, const void* attn, float* acc,
                           unsigned long long* fixed, unsigned* absmax, void* grad_value_out,
                           void* grad_loc, void* grad_attn, bool det, cudaStream_t stream) {
  const int64_t rows = p.B * p.Q * p.H;
  if (rows == 0) return cudaSuccess;
  constexpr int CPT = Chunk<T>::kCPT;
  const T* go = static_cast<const T*>(grad_out);
  const T* a = static_cast<const T*>(attn);
  if (det) {
    const int64_t n_go = rows * p.D, n_a = rows * p.N;
    RTDETR_LAUNCH(grid_stride_blocks(n_go), kThreads, 0, stream, absmax_kernel<T>)(go, n_go,
                                                                                  absmax);
    RTDETR_LAUNCH(grid_stride_blocks(n_a), kThreads, 0, stream, absmax_kernel<T>)(a, n_a,
                                                                                 absmax + 1);
  }
  const bool vec = p.D % CPT == 0 && aligned16(value) && aligned16(grad_out) &&
                   (det || aligned16(acc));
  const T* v = static_cast<const T*>(value);
  const T* l = static_cast<const T*>(loc);
  T* gl = static_cast<T*>(grad_loc);
  T* ga = static_cast<T*>(grad_attn);
  switch (group_size(p.D, CPT)) {
    case 1: launch_backward<T, 1>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
    case 2: launch_backward<T, 2>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
    case 4: launch_backward<T, 4>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
    case 8: launch_backward<T, 8>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
    case 16: launch_backward<T, 16>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
    default: launch_backward<T, 32>(p, go, v, l, a, acc, fixed, absmax, gl, ga, vec, det, stream); break;
  }
  if (det) {
    const int64_t n = p.B * p.S * p.H * p.D;
    if (n > 0)
      RTDETR_LAUNCH(grid_stride_blocks(n), kThreads, 0, stream, fixed_to_value_kernel<T>)(
          p, fixed, absmax, static_cast<T*>(grad_value_out), n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(DType dtype, const Problem& p, const void* value, const void* loc,
                    const void* attn, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_typed<float>(p, value, loc, attn, out, stream);
    case DType::kFloat16: return forward_typed<__half>(p, value, loc, attn, out, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p, value, loc, attn, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const Problem& p, const void* grad_out, const void* value,
                     const void* loc, const void* attn, float* grad_value_acc,
                     unsigned long long* grad_value_fixed, unsigned int* absmax,
                     void* grad_value_out, void* grad_loc, void* grad_attn, bool deterministic,
                     cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(p, grad_out, value, loc, attn, grad_value_acc,
                                   grad_value_fixed, absmax, grad_value_out, grad_loc, grad_attn,
                                   deterministic, stream);
    case DType::kFloat16:
      return backward_typed<__half>(p, grad_out, value, loc, attn, grad_value_acc,
                                    grad_value_fixed, absmax, grad_value_out, grad_loc, grad_attn,
                                    deterministic, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, grad_out, value, loc, attn, grad_value_acc,
                                           grad_value_fixed, absmax, grad_value_out, grad_loc,
                                           grad_attn, deterministic, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace msda
}  // namespace rtdetr_fast
