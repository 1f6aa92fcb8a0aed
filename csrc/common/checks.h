// Boundary checks shared by every op's .cpp. Kernels assume what these establish.
#pragma once
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#define RTDETR_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define RTDETR_CHECK_DEVICE(x, ref)                                              \
  TORCH_CHECK((x).device() == (ref).device(), #x " is on ", (x).device(), ", ", \
              #ref " on ", (ref).device())
#define RTDETR_CHECK_DTYPE(x, ref)                                                \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), #x " dtype ", (x).scalar_type(), \
              " differs from " #ref " dtype ", (ref).scalar_type())
#define RTDETR_CHECK_DIM(x, n, what) \
  TORCH_CHECK((x).dim() == (n), #x " must be " what ", got ", (x).sizes())
