"""Build rtdetr_fast and its extension rtdetr_fast._C from csrc/.

- a CUDAExtension when torch is a CUDA build and a CUDA toolkit is found (or FORCE_CUDA=1 with a
  toolkit, for building on a machine without a GPU);
- a CppExtension (CPU kernels, OpenMP) otherwise;
- no extension at all when RTDETR_FAST_NO_EXT=1 or torch is not importable (the package then runs
  on its reference and Triton backends).

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the
torch it will run with, which build isolation would replace with a fresh download.

The C++ standard is left to torch's build helpers (torch 2.11 and 2.12 compile extensions as
C++17, torch 2.13 and newer as C++20, and their headers need it), so the same flags work for
every supported torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

# Oldest torch the extension is built and tested against (CI builds the CUDA extension against it
# and runs the test suite on it); CI also builds against the newest release on the registry
# (scripts/check_cuda_build.sh).
TORCH_MIN = (2, 11)
TORCH_TESTED_MAX = (2, 15)

HINT = """\
rtdetr_fast: the native extension failed to build. What was detected is printed above.
  - CUDA build: set CUDA_HOME to the toolkit root (the folder holding bin/nvcc and
    include/cuda_runtime.h), e.g. CUDA_HOME=/usr/local/cuda-13.0, and TORCH_CUDA_ARCH_LIST
    (e.g. "8.0;9.0") when no GPU is visible; the toolkit's major version must match torch's CUDA.
  - CPU build only: unset FORCE_CUDA and TORCH_CUDA_ARCH_LIST, or install a CPU build of torch.
  - No compiler at all: RTDETR_FAST_NO_EXT=1 pip install --no-build-isolation .
    installs the package with its reference and Triton backends only."""


def _say(msg):
    print(f"rtdetr_fast: {msg}", file=sys.stderr)


def _toolkit_root(nvcc):
    """The CUDA toolkit root behind an nvcc on PATH. nvcc may be a wrapper script outside the
    toolkit (then the folder above it holds no CUDA headers); nvcc's dry run names its real TOP."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _has_headers(root):
    return root is not None and (
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        or bool(glob.glob(os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))))


def _detect_cuda_home():
    """CUDA_HOME as the user set it, else the root of the toolkit whose nvcc is on PATH, else
    /usr/local/cuda. Set in the environment before torch.utils.cpp_extension reads it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            root = os.environ[var]
            if not _has_headers(root):
                _say(f"warning: {var}={root} holds no include/cuda_runtime.h")
            return root, var
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root(nvcc)
        if _has_headers(root):
            os.environ["CUDA_HOME"] = root
            return root, f"nvcc -dryrun of {nvcc}"
    if _has_headers("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return "/usr/local/cuda", "the default location"
    return None, "nothing found"


def _version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:2])


def _extensions():
    if os.environ.get("RTDETR_FAST_NO_EXT", "0") == "1":
        _say("RTDETR_FAST_NO_EXT=1, skipping the native extension")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable at build time (build isolation?); installing without the "
             "native extension. Use pip install --no-build-isolation .")
        return [], {}

    tv = _version_tuple(torch.__version__)
    if tv < TORCH_MIN:
        raise RuntimeError(
            f"rtdetr_fast needs torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]} to build its extension; "
            f"this environment has torch {torch.__version__}. Upgrade torch, or install without "
            "the extension: RTDETR_FAST_NO_EXT=1 pip install --no-build-isolation .")
    if tv > TORCH_TESTED_MAX:
        _say(f"warning: torch {torch.__version__} is newer than the newest tested "
             f"({TORCH_TESTED_MAX[0]}.{TORCH_TESTED_MAX[1]}); building anyway")

    cuda_home, cuda_src = (None, "not looked for (CPU build of torch)")
    if torch.version.cuda is not None:
        cuda_home, cuda_src = _detect_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'}), "
         f"CUDA_HOME={cuda_home} (from {cuda_src}), nvcc={nvcc or 'not found'}, "
         f"TORCH_CUDA_ARCH_LIST={archs or '(unset)'}, FORCE_CUDA={int(force_cuda)}")
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch is "
                           f"{torch.__version__} (CPU only). Install a CUDA torch, or unset "
                           "FORCE_CUDA for the CPU extension.")
    if force_cuda and not _has_headers(cuda_home):
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit with headers was found; set CUDA_HOME "
                           "to the toolkit root (the folder with bin/nvcc and "
                           "include/cuda_runtime.h)")
    with_cuda = _has_headers(cuda_home) and torch.version.cuda is not None and bool(
        force_cuda or torch.cuda.is_available() or archs)

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(root, "csrc")
    cpp = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    rel = lambda paths: [os.path.relpath(p, root) for p in paths]  # noqa: E731

    macros = [("RTDETR_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if with_cuda:
        macros += [("RTDETR_FAST_WITH_CUDA", None), ("RTDETR_FAST_CUDA_ARCHS", f'"{archs}"')]
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-DRTDETR_FAST_WITH_CUDA"]
        ext = CUDAExtension("rtdetr_fast._C", rel(cpp + cu), include_dirs=[csrc],
                            define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags},
                            extra_link_args=link)
    else:
        ext = CppExtension("rtdetr_fast._C", rel(cpp), include_dirs=[csrc], define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    _say(f"building the {'CUDA' if with_cuda else 'CPU'} extension")

    class Build(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception:
                print(HINT, file=sys.stderr)
                raise

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
