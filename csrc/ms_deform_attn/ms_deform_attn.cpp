// Schema of rtdetr_fast::ms_deform_attn and its backward, and the boundary checks.
//
// The op works on the flattened-points form: sampling_locations [B, Q, H, N, 2] and
// attention_weights [B, Q, H, N], where level l owns num_points[l] consecutive points and
// N = sum(num_points). The [B, Q, H, L, P, 2] form of the paper is a free view of it with
// num_points = [P] * L; RT-DETRv2's per-level point counts need no padding.
// spatial_shapes ([2L]: H_0, W_0, H_1, W_1, ...) and level_start_index ([L]) are host ints,
// never tensors: no call reads data back from the device, and the checks run on every device.
// method is "default" (bilinear) or "discrete" (RT-DETRv2's nearest cell, whose location
// gradient is zero): ms_deform_attn_math.h.
#include "ms_deform_attn/ms_deform_attn.h"

#include <torch/library.h>

#include <climits>
#include <string>

#include "common/checks.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace rtdetr_fast {
namespace msda {

namespace {
int method_code(c10::string_view method) {
  if (method == "default") return kMethodDefault;
  if (method == "discrete") return kMethodDiscrete;
  TORCH_CHECK(false, "method must be one of ('default', 'discrete'), got '", std::string(method),
              "'");
}
}  // namespace

Dims check_args(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                c10::IntArrayRef level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                const at::Tensor* grad_output, c10::string_view method) {
  RTDETR_CHECK_DIM(value, 4, "[B, S, H, D]");
  RTDETR_CHECK_DIM(sampling_locations, 5, "[B, Q, H, N, 2] (N = sum of num_points)");
  RTDETR_CHECK_DIM(attention_weights, 4, "[B, Q, H, N] (N = sum of num_points)");
  Dims d;
  d.B = value.size(0);
  d.S = value.size(1);
  d.H = value.size(2);
  d.D = value.size(3);
  d.Q = sampling_locations.size(1);
  d.L = static_cast<int64_t>(num_points.size());
  d.method = method_code(method);
  TORCH_CHECK(d.L >= 1, "num_points must have one entry per level, got none");
  TORCH_CHECK(static_cast<int64_t>(spatial_shapes.size()) == 2 * d.L,
              "spatial_shapes must be 2L = ", 2 * d.L, " ints (H_0, W_0, H_1, ...), got ",
              spatial_shapes.size());
  TORCH_CHECK(static_cast<int64_t>(level_start_index.size()) == d.L,
              "level_start_index must be L = ", d.L, " ints, got ", level_start_index.size());
  d.point_start.assign(1, 0);
  for (int64_t p : num_points) {
    TORCH_CHECK(p >= 1 && p <= INT_MAX / 2, "num_points entries must be positive, got ",
                num_points);
    d.point_start.push_back(d.point_start.back() + static_cast<int>(p));
    TORCH_CHECK(d.point_start.back() <= INT_MAX / 2, "too many points: ", num_points);
  }
  d.N = d.point_start.back();
  d.uniform_p = static_cast<int>(num_points[0]);
  for (int64_t p : num_points)
    if (p != num_points[0]) d.uniform_p = 0;
  TORCH_CHECK(sampling_locations.size(0) == d.B && sampling_locations.size(2) == d.H &&
                  sampling_locations.size(3) == d.N && sampling_locations.size(4) == 2,
              "sampling_locations must be [B, Q, H, N, 2] with B=", d.B, ", H=", d.H,
              " from value and N=", d.N, " from num_points, got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() ==
                  c10::IntArrayRef({d.B, d.Q, d.H, d.N}),
              "attention_weights must be [B, Q, H, N] = [", d.B, ", ", d.Q, ", ", d.H, ", ", d.N,
              "], got ", attention_weights.sizes());
  if (grad_output != nullptr) {
    TORCH_CHECK(grad_output->sizes() == c10::IntArrayRef({d.B, d.Q, d.H * d.D}),
                "grad_output must be [B, Q, H*D] = [", d.B, ", ", d.Q, ", ", d.H * d.D,
                "], got ", grad_output->sizes());
    RTDETR_CHECK_DTYPE(*grad_output, value);
    RTDETR_CHECK_DEVICE(*grad_output, value);
    RTDETR_CHECK_CONTIGUOUS(*grad_output);
  }
  // 32-bit rows keep the per-corner state small in the CUDA kernels; offsets are 64-bit
  TORCH_CHECK(d.S < INT_MAX, "S = sum of H_l*W_l must be below 2^31, got ", d.S);
  TORCH_CHECK(d.H < INT_MAX && d.D < INT_MAX, "H and D must be below 2^31");
  TORCH_CHECK(value.is_floating_point(), "value must be floating point, got ",
              value.scalar_type());
  RTDETR_CHECK_DTYPE(sampling_locations, value);
  RTDETR_CHECK_DTYPE(attention_weights, value);
  RTDETR_CHECK_DEVICE(sampling_locations, value);
  RTDETR_CHECK_DEVICE(attention_weights, value);
  RTDETR_CHECK_CONTIGUOUS(value);
  RTDETR_CHECK_CONTIGUOUS(sampling_locations);
  RTDETR_CHECK_CONTIGUOUS(attention_weights);
  return d;
}

void check_levels(c10::IntArrayRef spatial_shapes, c10::IntArrayRef level_start_index, int64_t S) {
  const int64_t* shp = spatial_shapes.data();
  const int64_t* start = level_start_index.data();
  int64_t total = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(level_start_index.size()); ++l) {
    TORCH_CHECK(shp[2 * l] >= 1 && shp[2 * l + 1] >= 1,
                "spatial_shapes entries must be positive, got (", shp[2 * l], ", ",
                shp[2 * l + 1], ") at level ", l);
    TORCH_CHECK(start[l] == total, "level_start_index must be the running sum of H_l*W_l: "
                "level ", l, " starts at ", start[l], ", expected ", total);
    total += shp[2 * l] * shp[2 * l + 1];
  }
  TORCH_CHECK(total == S, "sum of H_l*W_l over spatial_shapes is ", total,
              ", but value has S=", S);
}

}  // namespace msda
}  // namespace rtdetr_fast

TORCH_LIBRARY_FRAGMENT(rtdetr_fast, m) {
  m.def(
      "ms_deform_attn(Tensor value, int[] spatial_shapes, int[] level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int[] num_points, "
      "str method=\"default\") -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, "
      "int[] level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "int[] num_points, bool deterministic, str method=\"default\") -> "
      "(Tensor, Tensor, Tensor)");
}
