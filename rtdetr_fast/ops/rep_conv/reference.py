"""Pure-PyTorch folded RepConv: 3x3 conv (stride 1, padding 1) + bias + activation."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import ACTIVATIONS, apply_activation, conv_act

__all__ = ["ACTIVATIONS", "apply_activation", "rep_conv_reference"]


def rep_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str = "silu") -> torch.Tensor:
    return conv_act(x, weight, bias, activation)
