// Schemas of folded RepConv, act(conv3x3(x, weight, pad 1) + bias), and the boundary checks:
// rtdetr_fast::rep_conv (the CUDA kernel, cuda/rep_conv_cuda_glue.cpp) and
// rtdetr_fast::winograd_conv3x3 (the CPU kernel, cpu/winograd_cpu.cpp, which takes the
// Winograd-transformed weight).
//
// Layouts: x [B, C_in, H, W] and weight [C_out, C_in, 3, 3] in the channels_last memory format
// (NHWC and [C_out][3][3][C_in] in memory), bias [C_out] contiguous or None; the result is
// [B, C_out, H, W] channels_last. The Python binding (rtdetr_fast/ops/rep_conv/native.py) converts
// to these layouts and routes what the kernel does not cover to the reference before calling.
//
// rep_conv has only a CUDA kernel; on the CPU, ops.rep_conv calls winograd_conv3x3 with the
// weight's kept transform (rtdetr_fast/ops/rep_conv/winograd.py), or the reference.
#include <torch/library.h>

#include <climits>
#include <string>

#include "common/checks.h"
#include "common/codes.h"

namespace rtdetr_fast {
namespace rep_conv {

int activation_code(c10::string_view activation) {
  if (activation == "identity") return kActIdentity;
  if (activation == "relu") return kActRelu;
  if (activation == "silu") return kActSilu;
  TORCH_CHECK(false, "activation must be one of ('silu', 'relu', 'identity'), got '",
              std::string(activation), "'");
  return -1;
}

void check_args(const at::Tensor& x, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias) {
  RTDETR_CHECK_DIM(x, 4, "[B, C_in, H, W]");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "weight must be [C_out, C_in, 3, 3] with C_in=", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "rtdetr_fast::rep_conv runs float16 or bfloat16, got ", x.scalar_type());
  RTDETR_CHECK_DTYPE(weight, x);
  RTDETR_CHECK_DEVICE(weight, x);
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be channels_last (NHWC) contiguous");
  TORCH_CHECK(weight.is_contiguous(at::MemoryFormat::ChannelsLast),
              "weight must be channels_last ([C_out][3][3][C_in]) contiguous");
  // 16-byte cp.async rows of input channels
  TORCH_CHECK(x.size(1) % 8 == 0, "rtdetr_fast::rep_conv needs C_in % 8 == 0, got C_in=",
              x.size(1));
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) < INT_MAX,
              "B*H*W must be below 2^31, got ", x.size(0) * x.size(2) * x.size(3));
  TORCH_CHECK(weight.size(0) < INT_MAX / 9 && x.size(1) < INT_MAX / 9,
              "C_in and C_out must be below 2^31 / 9");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must be [C_out] = [",
                weight.size(0), "], got ", b.sizes());
    RTDETR_CHECK_DTYPE(b, x);
    RTDETR_CHECK_DEVICE(b, x);
    RTDETR_CHECK_CONTIGUOUS(b);
  }
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  if (x.numel() > 0 && weight.numel() > 0)
    TORCH_CHECK(aligned(x) && aligned(weight), "x and weight must be 16-byte aligned");
}

}  // namespace rep_conv
}  // namespace rtdetr_fast

TORCH_LIBRARY_FRAGMENT(rtdetr_fast, m) {
  m.def("rep_conv(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
  // the CPU kernel of folded RepConv (cpu/winograd_cpu.cpp): the weight comes Winograd-
  // transformed ([36, C_out, C_in], made once per weight on the Python side), NCHW float32/64
  m.def(
      "winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
}
