// Sampling of one point and its gradient, both methods: bilinear (align_corners=False, zero
// padding) and RT-DETRv2's discrete nearest cell. The only copy, shared by the CPU kernel and
// the CUDA kernels so the CPU tests exercise the CUDA arithmetic too.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RTDETR_HD __host__ __device__ __forceinline__
#else
#define RTDETR_HD inline
#endif

namespace rtdetr_fast {
namespace msda {

RTDETR_HD float floor_(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}
RTDETR_HD double floor_(double v) {
#if defined(__CUDA_ARCH__)
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

// The schema's `str method`, as the kernels see it (ms_deform_attn.cpp maps the names).
enum Method : int { kMethodDefault = 0, kMethodDiscrete = 1 };

// A product and a sum each rounded to acc_t, never contracted into one FMA (nvcc fuses by
// default, g++ does for C++ on an FMA target): the discrete cell is floor(x*w + 0.5), and
// where x*w + 0.5 lands within an ulp of an integer a fused and an unfused evaluation pick
// different cells. Rounded separately, every backend picks the cell PyTorch's reference does.
RTDETR_HD float mul_rn(float a, float b) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float r = a * b;
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(r));  // materialised: the multiply cannot fuse with what uses it
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#endif
  return r;
#endif
}
RTDETR_HD double mul_rn(double a, double b) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double r = a * b;
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(r));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#endif
  return r;
#endif
}

// Discrete sampling's cell along one axis of n cells: clamp(floor(t*n + 0.5), 0, n-1), the
// official int64(t*n + 0.5) (truncation, then a clamp at 0 that makes it a floor). The clamp
// happens in floating point, before the conversion, so huge and infinite t convert nothing
// out of range; NaN takes cell 0 (it fails the first comparison).
template <typename acc_t>
RTDETR_HD int64_t nearest_cell(acc_t t, int64_t n) {
  const acc_t f = floor_(mul_rn(t, acc_t(n)) + acc_t(0.5));
  if (!(f >= acc_t(0))) return 0;
  if (f >= acc_t(n - 1)) return n - 1;
  return static_cast<int64_t>(f);
}

// Corner order: 0 = (y0, x0), 1 = (y0, x0+1), 2 = (y0+1, x0), 3 = (y0+1, x0+1).
template <typename acc_t>
struct Corners {
  int32_t row[4];  // row of value (start + y*W_l + x), -1 for a corner outside the level
  acc_t w[4];      // bilinear weights; zero where row is -1
  acc_t lx, ly;    // fractional position inside the cell, needed by the gradient
};

// Every corner unused (row -1, weight 0); returns whether a level of h x w cells starting at
// row `start` lies inside a value of S rows (inconsistent metadata, not validated on the
// device, samples nothing instead of reading out of bounds).
template <typename acc_t>
RTDETR_HD bool clear_corners(int64_t h, int64_t w, int64_t start, int64_t S, Corners<acc_t>& c) {
  for (int k = 0; k < 4; ++k) {
    c.row[k] = -1;
    c.w[k] = acc_t(0);
  }
  c.lx = acc_t(0);
  c.ly = acc_t(0);
  return h >= 1 && w >= 1 && start >= 0 && start + h * w <= S;
}

// Sets up one sample at normalised (x, y) on a level of h x w cells whose rows begin at
// `start` in a value of S rows. Returns false when nothing of the sample lands on the level.
// The range test comes before any float->int conversion: locations may be huge, inf or NaN,
// and converting those is undefined behaviour. A level that would reach past S (inconsistent
// metadata that was not validated on the device) samples zeros instead of reading out of bounds.
template <typename acc_t>
RTDETR_HD bool bilinear_corners(acc_t x, acc_t y, int64_t h, int64_t w, int64_t start, int64_t S,
                                Corners<acc_t>& c) {
  if (!clear_corners(h, w, start, S, c)) return false;
  // grid_sample with align_corners=False maps normalised 0 and 1 to the outer cell edges
  const acc_t ix = x * acc_t(w) - acc_t(0.5);
  const acc_t iy = y * acc_t(h) - acc_t(0.5);
  if (!(ix >= acc_t(-1) && ix <= acc_t(w) && iy >= acc_t(-1) && iy <= acc_t(h))) return false;
  const acc_t fx = floor_(ix), fy = floor_(iy);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const acc_t lx = ix - fx, ly = iy - fy;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  c.lx = lx;
  c.ly = ly;
  // ix == w (or iy == h) exactly passes the range test above and floors to x0 == w: that
  // corner lies outside the level and must not be read, so both bounds are checked
  const bool x0_in = x0 >= 0 && x0 < w, x1_in = x0 + 1 >= 0 && x0 + 1 < w;
  const bool y0_in = y0 >= 0 && y0 < h, y1_in = y0 + 1 >= 0 && y0 + 1 < h;
  const int64_t base = start + y0 * w + x0;
  if (y0_in && x0_in) { c.row[0] = static_cast<int32_t>(base);         c.w[0] = hy * hx; }
  if (y0_in && x1_in) { c.row[1] = static_cast<int32_t>(base + 1);     c.w[1] = hy * lx; }
  if (y1_in && x0_in) { c.row[2] = static_cast<int32_t>(base + w);     c.w[2] = ly * hx; }
  if (y1_in && x1_in) { c.row[3] = static_cast<int32_t>(base + w + 1); c.w[3] = ly * lx; }
  return c.row[0] >= 0 || c.row[1] >= 0 || c.row[2] >= 0 || c.row[3] >= 0;
}

// Discrete sampling: corner 0 is the nearest cell with weight 1, the others are unused. Each
// axis is clamped to its own extent (the official clamps x to H_l - 1 too, which reads the
// wrong cell on non-square levels). Every location reads a cell; only a level reaching past S
// (inconsistent metadata) samples nothing.
template <typename acc_t>
RTDETR_HD bool discrete_corner(acc_t x, acc_t y, int64_t h, int64_t w, int64_t start, int64_t S,
                               Corners<acc_t>& c) {
  if (!clear_corners(h, w, start, S, c)) return false;
  c.row[0] = static_cast<int32_t>(start + nearest_cell(y, h) * w + nearest_cell(x, w));
  c.w[0] = acc_t(1);
  return true;
}

// The corners of one sample by `method` (a Method code).
template <typename acc_t>
RTDETR_HD bool sample_corners(int method, acc_t x, acc_t y, int64_t h, int64_t w, int64_t start,
                              int64_t S, Corners<acc_t>& c) {
  if (method == kMethodDiscrete) return discrete_corner(x, y, h, w, start, S, c);
  return bilinear_corners(x, y, h, w, start, S, c);
}

// Gradient of a * sum_k w_k * <g, v_k> given dot[k] = <g, v_k> (zero for outside corners):
// d/da, and d/dx, d/dy of the normalised location.
template <typename acc_t>
RTDETR_HD void bilinear_backward(const Corners<acc_t>& c, const acc_t dot[4], acc_t a, int64_t h,
                                 int64_t w, acc_t* grad_a, acc_t* grad_x, acc_t* grad_y) {
  const acc_t lx = c.lx, ly = c.ly, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  *grad_a = c.w[0] * dot[0] + c.w[1] * dot[1] + c.w[2] * dot[2] + c.w[3] * dot[3];
  const acc_t d_ix = hy * (dot[1] - dot[0]) + ly * (dot[3] - dot[2]);
  const acc_t d_iy = hx * (dot[2] - dot[0]) + lx * (dot[3] - dot[1]);
  *grad_x = a * d_ix * acc_t(w);
  *grad_y = a * d_iy * acc_t(h);
}

// The gradient of one sample by `method`. Discrete sampling is piecewise constant in the
// location: its location gradient is zero (the official detaches the offsets in that mode).
template <typename acc_t>
RTDETR_HD void sample_backward(int method, const Corners<acc_t>& c, const acc_t dot[4], acc_t a,
                               int64_t h, int64_t w, acc_t* grad_a, acc_t* grad_x,
                               acc_t* grad_y) {
  if (method == kMethodDiscrete) {
    *grad_a = c.w[0] * dot[0];
    *grad_x = acc_t(0);
    *grad_y = acc_t(0);
    return;
  }
  bilinear_backward(c, dot, a, h, w, grad_a, grad_x, grad_y);
}

}  // namespace msda
}  // namespace rtdetr_fast
