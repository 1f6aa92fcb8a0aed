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
