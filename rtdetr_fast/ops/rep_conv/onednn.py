"""oneDNN's CPU convolution with the activation applied as it writes its output
(``torch.ops.mkldnn._convolution_pointwise``): one pass over the activations fewer than a conv
followed by ReLU/SiLU, and what inductor emits for a compiled model.

Used on CPU inference calls by the deployed model's convs and by the native CPU backend of
``ops.rep_conv`` for the calls its Winograd kernel does not cover (layers under its channel
minimum, the channels_last stem's among them): the same function as the reference, without the
separate activation pass.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# ops.rep_conv's activation names -> oneDNN's post-op names
_POST_OPS = {"relu": "relu", "silu": "swish", "identity": "none"}
_MKLDNN = torch.backends.mkldnn.is_available()


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            padding_mode: str = "zeros") -> bool:
    """Whether this CPU call can run as oneDNN's convolution with a fused activation: float32,
    zero padding, nothing needing a gradient, not while tracing or exporting (exported graphs
    hold the plain conv)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    if not (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and padding_mode == "zeros"):
        return False
    return not (torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))


def conv_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             groups: int, activation: str) -> torch.Tensor:
    """act(conv2d(x, weight, bias, ...)) in one oneDNN call, for a call :func:`fusable`
    accepts; ``activation`` is one of ops.rep_conv's names ('relu', 'silu', 'identity')."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(padding), list(stride), list(dilation), groups,
        _POST_OPS[activation], [], "")
