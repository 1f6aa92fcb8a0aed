"""Build rtdetr_fast and its extension rtdetr_fast._C from csrc/.

- a CUDAExtension when torch is a CUDA build and a CUDA toolkit is found (or FORCE_CUDA=1 with a
  toolkit, for building on a machine without a GPU);
- a CppExtension (CPU kernels, OpenMP) otherwise;
- no extension at all when RTDETR_FAST_NO_EXT=1 or torch is not importable (the package then runs
  on its reference and Triton backends).

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the
torch it will run with, which build isolation would replace with a fresh download.
"""
import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("RTDETR_FAST_NO_EXT", "0") == "1":
        print("rtdetr_fast: RTDETR_FAST_NO_EXT=1, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        print("rtdetr_fast: torch is not importable at build time (build isolation?); "
              "installing without the native extension. Use pip install --no-build-isolation .",
              file=sys.stderr)
        return [], {}

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch is "
                           f"{torch.__version__} (CPU only)")
    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None and (
        force_cuda or torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"))

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    rel = lambda paths: [os.path.relpath(p, root) for p in paths]  # noqa: E731

    macros = [("RTDETR_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        macros += [("RTDETR_FAST_WITH_CUDA", None), ("RTDETR_FAST_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                "-DRTDETR_FAST_WITH_CUDA"]
        ext = CUDAExtension("rtdetr_fast._C", rel(cpp + cu), include_dirs=[csrc],
                            define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=link)
    else:
        ext = CppExtension("rtdetr_fast._C", rel(cpp), include_dirs=[csrc], define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"rtdetr_fast: building the {'CUDA' if with_cuda else 'CPU'} extension", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
