// Boundary of the multi-scale deformable attention op, shared by its CPU and CUDA registrations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <vector>

namespace rtdetr_fast {
namespace msda {

// Sizes of one call in the glossary's words; N is the total number of points over levels.
struct Dims {
  int64_t B, S, H, D, Q, L, N;
  int uniform_p;                 // P when every level has P points, else 0
  std::vector<int> point_start;  // L + 1 prefix sums of num_points
  int method;                    // Method code (ms_deform_attn_math.h)
};

// Validates the arguments of rtdetr_fast::ms_deform_attn (and, with grad_output, of its
// backward) and returns their sizes. Kernels assume everything checked here.
// spatial_shapes is [2L] = (H_0, W_0, H_1, W_1, ...) and level_start_index [L]: host ints, so
// no call reads tensor data back from the device.
Dims check_args(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                c10::IntArrayRef level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                const at::Tensor* grad_output, c10::string_view method);

// Consistency of spatial_shapes / level_start_index with S (host ints: free on every device).
void check_levels(c10::IntArrayRef spatial_shapes, c10::IntArrayRef level_start_index, int64_t S);

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, c10::IntArrayRef spatial_shapes,
                              c10::IntArrayRef level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                              c10::string_view method);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, c10::IntArrayRef spatial_shapes,
    c10::IntArrayRef level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, c10::IntArrayRef num_points, bool deterministic,
    c10::string_view method);

}  // namespace msda
}  // namespace rtdetr_fast
