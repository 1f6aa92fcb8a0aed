"""The pieces every folded-RepConv backend shares (the backends never import each other)."""
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


def conv_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str = "silu") -> torch.Tensor:
    """act(conv2d(x, weight, bias, stride 1, padding 1)) in torch: the reference's math, which
    the kernels also run on the calls they do not cover."""
    return apply_activation(F.conv2d(x, weight, bias, stride=1, padding=1), activation)


def check_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The dtype/device agreement the public function leaves to the backend."""
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias is on {bias.device}, x on {x.device}")


def empty_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    B, _, H, W = x.shape
    return torch.empty((B, weight.shape[0], H, W), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)
