"""Pure-PyTorch folded RepConv: 3x3 conv (stride 1, padding 1) + bias + activation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "relu", "identity")


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "relu":
        return F.relu(x)
    return x


def rep_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str = "silu") -> torch.Tensor:
    return apply_activation(F.conv2d(x, weight, bias, stride=1, padding=1), activation)
