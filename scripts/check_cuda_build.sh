#!/usr/bin/env bash
# The CUDA build, checked on a machine without a GPU, in a throwaway venv (removed afterwards).
#
# Default: the newest torch. Install the newest CUDA build of torch from the registry, build
# this package exactly as the README says (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST="8.0;9.0", pip
# install --no-build-isolation), check that the extension reports CUDA and that every op has a
# CUDA kernel registered (the CPU-only Winograd kernel of rep_conv and the stem's max pool: a
# CPU one), then run PYTEST_ARGS on that build (default: nothing; the CPU suite runs on the
# oldest torch below and on the README's torch in CI's first step).
#
# IMAGE=1: the GPU machine's image, as near as the registry allows: Python 3.12 when the
# machine runs it (else this Python), torch 2.11.0 (the oldest supported, a CUDA build), triton
# 3.6.0, numpy 2.5 (or the nearest below), pytest, pytest-benchmark, onnx, onnxruntime; no
# pycocotools, no tensorrt (the test dependencies scipy, pillow, tqdm, safetensors and
# onnxscript are added for the CPU suite; tests/test_gpu_suite.py checks that the package
# imports without them). In a copy of the tree: scripts/gpu_suite.sh --dry-run (the CUDA build
# in place, every op registered, the harnesses compiled by nvcc, each test and benchmark
# selection collected, the CPU benchmark cases once, the summary on a sample), then the CPU
# test suite less the slow tests on that build and torch, so a torch API change shows up here,
# not at a user's install.
#   env: RTDETR_FAST_CI_TORCH=2.15.0 to pin the torch release (default: newest on the registry,
#        2.11.0 with IMAGE=1); KEEP=1 keeps the venv; PYTEST_ARGS="tests/ops" sets the test
#        selection (default: none; with IMAGE=1 the whole suite but the slow tests)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rtdetr_fast_cuda_build.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
# A pip constraint file on the machine may cap torch below the newest release; this check is
# about the newest, so it reads its own (empty) constraints.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
IMAGE=${IMAGE:-0}
if [ "$IMAGE" = 1 ]; then
    # the image's Python when this machine runs it (a pyenv shim may exist and fail)
    if python3.12 -c "import venv" >/dev/null 2>&1; then PY=python3.12; fi
    TORCH=${RTDETR_FAST_CI_TORCH:-2.11.0}
else
    TORCH=${RTDETR_FAST_CI_TORCH:-$("$PY" -m pip index versions torch 2>/dev/null |
        sed -n 's/^torch (\(.*\))$/\1/p' | head -1)}
fi
[ -n "$TORCH" ] || { echo "check_cuda_build: cannot find torch on the registry" >&2; exit 2; }
echo "check_cuda_build: torch==$TORCH ($("$PY" --version 2>&1), image=$IMAGE) in $WORK"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
if [ "$IMAGE" = 1 ]; then
    "$VPY" -m pip install -q "torch==$TORCH" "triton==3.6.0" "numpy<2.6" pytest pytest-benchmark \
        onnx onnxruntime setuptools wheel ninja pybind11 scipy pillow tqdm safetensors onnxscript
    "$VPY" -c "import numpy, triton; print('numpy', numpy.__version__, 'triton', triton.__version__)"
    if "$VPY" -c "import pycocotools" 2>/dev/null; then
        echo "check_cuda_build: pycocotools is installed, the image has none" >&2; exit 1
    fi
else
    "$VPY" -m pip install -q "torch==$TORCH" setuptools wheel ninja pybind11
fi
"$VPY" -c "import torch; v = torch.version.cuda; print('torch', torch.__version__, 'CUDA', v); assert v, 'the registry gave a CPU build of torch'"
echo "check_cuda_build: torch installed at $((SECONDS - t0)) s"

# a copy of what a clone holds (tracked and new files), so no build output of this tree leaks in
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | tar -cf - --null -T - | tar -xf - -C "$WORK/src"
cd "$WORK/src"
if [ "$IMAGE" = 1 ]; then
    # the GPU suite's dry run builds the extension in place (CUDA, sm_90) and checks it
    t1=$SECONDS
    if ! PYTHON=$VPY RESULTS_DIR=$WORK/results MAX_JOBS=${MAX_JOBS:-2} \
            bash scripts/gpu_suite.sh --dry-run >"$WORK/dry_run.log" 2>&1; then
        grep -vE "^ *(\*|!!|By 20|or your|See https|Please use|corresp)" "$WORK/dry_run.log" | tail -80
        echo "check_cuda_build: the GPU suite's dry run failed" >&2; exit 1
    fi
    grep -E "^(gpu_suite|plan|collect|check):|^ *rtdetr_fast::" "$WORK/dry_run.log"
    echo "check_cuda_build: GPU suite dry run passed in $((SECONDS - t1)) s"
    if [ -n "${PYTEST_ARGS:-}" ]; then read -r -a ARGS <<<"$PYTEST_ARGS"; else ARGS=(tests -m "not slow"); fi
    # the in-place build of the dry run, imported from the tree; the package is not installed,
    # so the tests' child processes (python -m rtdetr_fast, from other folders) find it by path
    if ! PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}" \
            "$VPY" -m pytest -q -p no:cacheprovider -rsfE "${ARGS[@]}" >"$WORK/tests.log" 2>&1; then
        # the failures' tracebacks, then each failing test on one line (the skips left out)
        grep -vE "^SKIPPED" "$WORK/tests.log" | tail -120
        echo "check_cuda_build: tests failed (torch $TORCH)" >&2; exit 1
    fi
    # the skips other than the CUDA ones (pycocotools, the Triton interpreter), and the count
    grep -E "^SKIPPED" "$WORK/tests.log" | grep -v "needs a CUDA device" || true
    tail -1 "$WORK/tests.log"
    echo "check_cuda_build: passed in $((SECONDS - t0)) s (torch $TORCH, GPU image)"
    exit 0
fi
# -v: the build prints what it detected (torch, CUDA_HOME, nvcc, archs) into the CI log
if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
        "$VPY" -m pip install -v --no-build-isolation ".[test]" >"$WORK/build.log" 2>&1; then
    grep -v "^WARNING: Location" "$WORK/build.log" | tail -60
    echo "check_cuda_build: the CUDA build failed" >&2; exit 1
fi
grep -E "^ *rtdetr_fast:" "$WORK/build.log" || true
"$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" ||
    { echo "check_cuda_build: installing the package replaced torch $TORCH" >&2; exit 1; }
echo "check_cuda_build: CUDA extension built at $((SECONDS - t0)) s"
cd "$WORK"   # import the installed package, not the copy
"$VPY" - <<'PY'
import torch
import rtdetr_fast._C as C
from rtdetr_fast.ops import _backend

info = C.build_info()
print("build_info:", info)
assert info["cuda"] is True, "extension built without CUDA"
# the extension's ops; the *_triton ops are Python custom ops whose one implementation serves
# every device, so they have no CUDA-specific kernel to look for
ops = sorted(n for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("rtdetr_fast::") and "_triton" not in n)
assert ops, "no rtdetr_fast ops registered"
# CPU-only by design: the CPU kernel of rep_conv (Winograd; on CUDA rep_conv has its own) and
# the deployed CPU stem's NCHW max pool (CUDA runs torch's)
CPU_ONLY = {"rtdetr_fast::winograd_conv3x3", "rtdetr_fast::max_pool_3x3_s2"}
for n in sorted(CPU_ONLY):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"), f"{n} has no CPU kernel"
missing = [n for n in ops if n not in CPU_ONLY
           and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print("ops with a CUDA kernel:",
      ", ".join(n for n in ops if n not in missing and n not in CPU_ONLY))
print("CPU-only ops:", ", ".join(sorted(CPU_ONLY)))
assert not missing, f"ops without a CUDA kernel: {missing}"
print("backends:", _backend.table())
PY
"$VPY" -m rtdetr_fast.info | sed -n '1,9p'
cd "$WORK/src"
rm -rf rtdetr_fast   # the tests must import the installed build
# Tests on this build only when asked (PYTEST_ARGS, e.g. "tests/ops"): CI runs the suite on
# the README's torch and, less the slow tests, on the oldest supported (IMAGE=1).
if [ -n "${PYTEST_ARGS:-}" ]; then
    read -r -a ARGS <<<"$PYTEST_ARGS"
    "$VPY" -m pytest -q -p no:cacheprovider "${ARGS[@]}"
fi
echo "check_cuda_build: passed in $((SECONDS - t0)) s (torch $TORCH)"
