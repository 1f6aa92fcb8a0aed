// The Python module rtdetr_fast._C. Importing it loads this library, whose TORCH_LIBRARY
// blocks (one per op, in csrc/<op>/<op>.cpp) register the ops under torch.ops.rtdetr_fast.
#include <torch/extension.h>

#include <string>

#include "common/codes.h"
#include "common/cpu_isa.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef RTDETR_FAST_WITH_CUDA
  info["cuda"] = true;
#ifdef CUDA_VERSION
  info["cuda_version"] = std::to_string(CUDA_VERSION);
#endif
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef RTDETR_FAST_TORCH_VERSION
  info["torch_version"] = RTDETR_FAST_TORCH_VERSION;
#endif
#ifdef RTDETR_FAST_CUDA_ARCHS
  info["cuda_archs"] = RTDETR_FAST_CUDA_ARCHS;
#endif
  info["compiler"] = std::string(__VERSION__);
  return info;
}

// limits of the kernels, read by the Python bindings (one definition: common/codes.h)
pybind11::dict limits() {
  pybind11::dict d;
  d["topk_max_k"] = rtdetr_fast::limits::kTopkMaxK;
  d["topk_max_chunk"] = rtdetr_fast::limits::kTopkMaxChunk;
  return d;
}

// which builds of the CPU kernels run on this machine (chosen at run time, common/cpu_isa.h)
pybind11::dict cpu_kernels() {
  pybind11::dict d;
  d["avx2"] = rtdetr_fast::use_avx2();
  d["avx512"] = rtdetr_fast::use_avx512();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rtdetr_fast native kernels";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("limits", &limits, "Limits of the native kernels (e.g. the largest top-K K)");
  m.def("cpu_kernels", &cpu_kernels, "Which builds of the CPU kernels run here (avx2, avx512)");
}
