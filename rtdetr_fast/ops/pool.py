"""The deployed CPU stem's max pool: ``rtdetr_fast::max_pool3x3s2`` (csrc/pool/).

  rtdetr_fast::max_pool3x3s2(Tensor x) -> Tensor

``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)`` for NCHW float32/float64 CPU inference:
after ``deploy()`` runs the stem's 3x3 convolutions as Winograd kernels, whose outputs are NCHW,
torch's NCHW max pool was the slow step of the stem, many times its channels_last pool
(benchmarks/model/bench_rtdetr_cpu.py measures the deployed stem). Same values as torch's, NaN
included; no gradient (calls that need one run torch's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend

_registered = False
_kernel = False  # whether the loaded extension has the kernel (set when it loads)


def _fake(x):
    return x.new_empty((x.shape[0], x.shape[1], (x.shape[2] - 1) // 2 + 1,
                        (x.shape[3] - 1) // 2 + 1))


def _register_python_side() -> None:
    global _registered, _kernel
    if _registered:
        return
    _kernel = _backend.registered("max_pool3x3s2", "cpu")
    if _kernel:
        torch.library.register_fake("rtdetr_fast::max_pool3x3s2")(_fake)
    _registered = True


_backend.on_extension_load(_register_python_side)


def available() -> bool:
    """Whether the extension's kernel exists (loads the extension; not for compiled code)."""
    _backend.extension()
    return _kernel


def max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride=2, padding=1)``; the extension's kernel on the calls it
    covers (CPU, float32/float64, contiguous [N, C, H, W], no gradient), torch's elsewhere."""
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
            and x.shape[2] >= 1 and x.shape[3] >= 1
            and not (torch.is_grad_enabled() and x.requires_grad) and _kernel):
        return torch.ops.rtdetr_fast.max_pool3x3s2(x)
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
