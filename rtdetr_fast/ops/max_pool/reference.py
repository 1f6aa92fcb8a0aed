"""The reference of the 3x3 stride-2 max pool: torch's own."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def max_pool_3x3_s2_reference(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
