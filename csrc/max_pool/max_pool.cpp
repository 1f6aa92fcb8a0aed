// Schema of rtdetr_fast::max_pool_3x3_s2: F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
// for NCHW float32/float64 CPU inference, the ResNet-vd stem's pool after deploy() (its kernel:
// cpu/max_pool_cpu.cpp; the Python side: rtdetr_fast/ops/max_pool/). No CUDA kernel: CUDA runs
// torch's pool.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rtdetr_fast, m) {
  m.def("max_pool_3x3_s2(Tensor x) -> Tensor");
}
