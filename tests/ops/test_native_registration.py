"""The Python side of the native ops is registered once, when the extension loads (not lazily
inside a backend probe), and Python reads the kernels' limits from the extension."""
import subprocess
import sys

import pytest

from rtdetr_fast.ops import _backend

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="extension not built")


def _run(code: str) -> str:
    # a fresh interpreter: nothing probed any backend before
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fake_and_autograd_registered_when_the_extension_loads():
    out = _run(
        "import torch\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "from rtdetr_fast.ops import _backend\n"
        "_backend.extension()\n"
        "x = torch.randn(2, 50, 7, requires_grad=True)\n"
        "s, i = torch.ops.rtdetr_fast.topk_select_indices(x, 5)\n"
        "s.sum().backward()\n"
        "print('grad', float(x.grad.sum()))\n"
        "with FakeTensorMode():\n"
        "    f = torch.empty(2, 50, 7)\n"
        "    s, i = torch.ops.rtdetr_fast.topk_select_indices(f, 5)\n"
        "    print('fake', tuple(s.shape), i.dtype)\n")
    assert "grad 10.0" in out
    assert "fake (2, 5) torch.int64" in out


def test_limits_come_from_the_extension():
    from rtdetr_fast.ops.topk_select import native
    lim = _backend.limits()
    assert lim["topk_max_k"] == native.max_k() == 2048
    assert lim["topk_max_chunk"] == 4096


def test_ms_deform_attn_fake_and_autograd_registered_when_the_extension_loads():
    # no backend probe and no ops.ms_deform_attn call: only the extension load
    out = _run(
        "import torch\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "from rtdetr_fast.ops import _backend\n"
        "_backend.extension()\n"
        "op = torch.ops.rtdetr_fast.ms_deform_attn\n"
        "v = torch.randn(1, 6, 2, 4, dtype=torch.float64, requires_grad=True)\n"
        "loc = torch.rand(1, 3, 2, 2, 2, dtype=torch.float64)\n"
        "w = torch.rand(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)\n"
        "out = op(v, [2, 2, 1, 2], [0, 4], loc, w, [1, 1])\n"
        "out.sum().backward()\n"
        "print('grad', v.grad is not None and w.grad is not None, tuple(out.shape))\n"
        "with FakeTensorMode():\n"
        "    f = op(torch.empty(1, 6, 2, 4), [2, 2, 1, 2], [0, 4], torch.empty(1, 3, 2, 2, 2),\n"
        "           torch.empty(1, 3, 2, 2), [1, 1])\n"
        "    print('fake', tuple(f.shape))\n")
    assert "grad True (1, 3, 8)" in out
    assert "fake (1, 3, 8)" in out
