"""Binding of the extension's ``rtdetr_fast::max_pool_3x3_s2`` CPU kernel (csrc/max_pool/).

The fake kernel is registered when the extension loads (``_backend.on_extension_load``); nothing
here loads the extension at import.
"""
from __future__ import annotations

import torch

from .. import _backend

_registered = False
_kernel = False  # whether the loaded extension has the kernel (set when it loads)


def _fake(x):
    return x.new_empty((x.shape[0], x.shape[1], (x.shape[2] - 1) // 2 + 1,
                        (x.shape[3] - 1) // 2 + 1))


def _register_python_side() -> None:
    global _registered, _kernel
    if _registered:
        return
    _kernel = _backend.registered("max_pool_3x3_s2", "cpu")
    if _kernel:
        torch.library.register_fake("rtdetr_fast::max_pool_3x3_s2")(_fake)
    _registered = True


_backend.on_extension_load(_register_python_side)


def available() -> bool:
    """Whether the extension's kernel exists (loads the extension; not for compiled code)."""
    _backend.extension()
    return _kernel


def covers(x: torch.Tensor) -> bool:
    """Whether the kernel runs ``x``: CPU, float32/float64, contiguous NCHW with a nonempty map,
    no gradient, and the extension loaded with the kernel."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and x.shape[2] >= 1 and x.shape[3] >= 1
            and not (torch.is_grad_enabled() and x.requires_grad) and _kernel)


def max_pool_3x3_s2_native(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.rtdetr_fast.max_pool_3x3_s2(x)
