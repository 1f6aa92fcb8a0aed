// Boundary of the multi-scale deformable attention op, shared by its CPU and CUDA registrations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace rtdetr_fast {
namespace msda {

// Sizes of one call in the glossary's words; N is the total number of points over levels.
struct Dims {
  int64_t B, S, H, D, Q, L, N;
  int uniform_p;                 // P when every level has P points, else 0
  std::vector<int> point_start;  // L + 1 prefix sums of num_points
};

// Validates the arguments of rtdetr_fast::ms_deform_attn (and, with grad_output, of its
// backward) and returns their sizes. Kernels assume everything checked here.
Dims check_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights, c10::IntArrayRef num_points,
                const at::Tensor* grad_output);

// Host-side consistency of spatial_shapes / level_start_index with S; only for CPU tensors,
// where reading them costs nothing.
void check_levels_on_host(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                          int64_t S);

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, c10::IntArrayRef num_points);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, c10::IntArrayRef num_points, bool deterministic);

}  // namespace msda
}  // namespace rtdetr_fast
