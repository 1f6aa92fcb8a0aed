"""Backend selection and import without optional pieces."""
import os
import subprocess
import sys

import pytest
import torch

from rtdetr_fast import ops
from rtdetr_fast.ops import _backend


def test_reference_always_available():
    for op in ("ms_deform_attn", "topk_select", "topk_detections", "rep_conv"):
        assert "reference" in ops.available_backends("cpu", op)
    assert ops.available_backends("cpu")[-1] == "reference"


def test_forced_backend_context_and_env(monkeypatch):
    with ops.backend("reference"):
        assert _backend.current() == "reference"
        assert _backend.select("rep_conv", "cpu").__name__ == "rep_conv_reference"
    assert _backend.current() == "auto"
    monkeypatch.setenv("RTDETR_FAST_BACKEND", "reference")
    assert _backend.current() == "reference"
    monkeypatch.setenv("RTDETR_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.current()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.backend("cuda"):
            pass


def test_forced_backend_without_implementation_raises(monkeypatch):
    # every op has a native CPU kernel in a built checkout: an op of this test's own, with a
    # reference only and a native kernel that cannot run on the CPU, stands in
    monkeypatch.setitem(_backend._REGISTRY, "test_only_op", {
        "reference": (lambda: "ref", lambda device_type: True)})
    with ops.backend("native"), pytest.raises(RuntimeError, match="no implementation"):
        _backend.select("test_only_op", "cpu")
    monkeypatch.setitem(_backend._REGISTRY["test_only_op"], "native",
                        (lambda: "native", lambda device_type: device_type == "cuda"))
    with ops.backend("native"), pytest.raises(RuntimeError, match="cannot run"):
        _backend.select("test_only_op", "cpu")
    assert _backend.select("test_only_op", "cpu")() == "ref"


def test_import_without_extension_or_triton():
    """import rtdetr_fast and a forward pass work with neither the extension nor triton."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['rtdetr_fast._C'] = None\n"
        "import torch, rtdetr_fast\n"
        "from rtdetr_fast import ops\n"
        "assert ops.available_backends('cpu') == ['reference'], ops.available_backends('cpu')\n"
        "m = rtdetr_fast.RTDETR.from_name('rtdetr_r18vd').eval()\n"
        "with torch.no_grad():\n"
        "    out = m(torch.rand(1, 3, 128, 128))\n"
        "assert out['pred_boxes'].shape == (1, 300, 4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("RTDETR_FAST_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_info_runs():
    res = subprocess.run([sys.executable, "-m", "rtdetr_fast.info"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "ms_deform_attn" in res.stdout


def test_backends_of_an_op_never_import_each_other():
    """reference.py, native.py, triton.py and export.py of an op share pieces only through the
    op's _common.py (or the package-level _backend)."""
    import ast
    import pathlib

    import rtdetr_fast.ops as ops_pkg

    backends = {"reference", "native", "triton", "export"}
    root = pathlib.Path(ops_pkg.__file__).parent
    seen = 0
    for op_dir in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        for path in sorted(op_dir.glob("*.py")):
            if path.stem not in backends:
                continue
            seen += 1
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.level == 1:
                    names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    first = name.split(".")[0]
                    assert first not in backends or first == path.stem, (
                        f"{path.relative_to(root)} imports the {first} backend")
    assert seen >= 10
