// Bilinear sampling (align_corners=False, zero padding) and its gradient: the only copy, shared
// by the CPU kernel and the CUDA kernels so the CPU tests exercise the CUDA arithmetic too.
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

// Corner order: 0 = (y0, x0), 1 = (y0, x0+1), 2 = (y0+1, x0), 3 = (y0+1, x0+1).
template <typename acc_t>
struct Corners {
  int32_t row[4];  // row of value (start + y*W_l + x), -1 for a corner outside the level
  acc_t w[4];      // bilinear weights; zero where row is -1
  acc_t lx, ly;    // fractional position inside the cell, needed by the gradient
};

// Sets up one sample at normalised (x, y) on a level of h x w cells whose rows begin at
// `start` in a value of S rows. Returns false when nothing of the sample lands on the level.
// The range test comes before any float->int conversion: locations may be huge, inf or NaN,
// and converting those is undefined behaviour. A level that would reach past S (inconsistent
// metadata that was not validated on the device) samples zeros instead of reading out of bounds.
template <typename acc_t>
RTDETR_HD bool bilinear_corners(acc_t x, acc_t y, int64_t h, int64_t w, int64_t start, int64_t S,
                                Corners<acc_t>& c) {
  for (int k = 0; k < 4; ++k) {
    c.row[k] = -1;
    c.w[k] = acc_t(0);
  }
  c.lx = acc_t(0);
  c.ly = acc_t(0);
  if (h < 1 || w < 1 || start < 0 || start + h * w > S) return false;
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

}  // namespace msda
}  // namespace rtdetr_fast
