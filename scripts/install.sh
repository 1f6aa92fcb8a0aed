#!/usr/bin/env bash
# Install rtdetr_fast and its test tools into the current Python, building the native extension
# against the torch that is already there. torch is installed only when missing, pinned to
# the CPU build so that no CUDA packages are pulled in; bring your own CUDA torch for GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install: torch missing, installing torch==2.13.0 (CPU)"
    "$PY" -m pip install -q "torch==2.13.0"
fi
# the build imports torch, so it must see this environment's torch: no build isolation
"$PY" -m pip install -q setuptools wheel ninja pybind11
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
"$PY" -m rtdetr_fast.info | sed -n '1,9p'
