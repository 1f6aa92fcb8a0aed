"""The ResNet-vd stem's max pool (3x3, stride 2, padding 1): reference and native CPU kernel.

  rtdetr_fast::max_pool_3x3_s2(Tensor x) -> Tensor          (csrc/max_pool/)

After ``deploy()`` runs the stem's 3x3 convolutions as Winograd kernels, whose outputs are NCHW,
torch's NCHW max pool is the slow step of the stem, many times its channels_last pool
(benchmarks/model/bench_rtdetr_cpu.py measures the deployed stem); the kernel reads each input
row at most twice.
"""
from __future__ import annotations

import torch

from .native import available, covers, max_pool_3x3_s2_native
from .reference import max_pool_3x3_s2_reference

__all__ = ["available", "max_pool_3x3_s2", "max_pool_3x3_s2_reference"]


def max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)``.

    x [N, C, H, W]; the result [N, C, (H - 1) // 2 + 1, (W - 1) // 2 + 1], the same values as
    torch's, NaN included (any NaN in a window gives NaN). The extension's kernel runs the calls
    it covers (CPU, float32/float64, contiguous NCHW, no gradient); torch's pool every other.
    The op is not in the backend registry: it has no CUDA or Triton kernel of its own, and a
    forced backend (``ops.backend(...)``) leaves it to this choice.

    Errors: ``ValueError`` (one line) when x is not a 4-d tensor.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [N, C, H, W], got {shape}")
    if covers(x):
        return max_pool_3x3_s2_native(x)
    return max_pool_3x3_s2_reference(x)
