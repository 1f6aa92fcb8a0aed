"""Stateless hot operations of RT-DETR, each with a pure-PyTorch reference.

Model code calls only these functions; which implementation runs is decided in
:mod:`rtdetr_fast.ops._backend` (``with ops.backend("reference"): ...`` or
``RTDETR_FAST_BACKEND=reference``). Inputs are validated once (here; ms_deform_attn and
topk_select in their packages' __init__.py), in the words of the dimension glossary: B batch,
Q queries, H heads, L levels, P points, D channels per head, S = sum of H_l*W_l, C classes,
N anchors, K selected.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _export  # noqa: F401
from ._backend import available_backends, backend, register
# binds ops.ms_deform_attn to the function, after the import machinery bound it to the package
from .ms_deform_attn import ms_deform_attn
from .max_pool import max_pool_3x3_s2
from .rep_conv import ACTIVATIONS, rep_conv_reference
from .topk_select import topk_detections, topk_select

__all__ = [
    "max_pool_3x3_s2",
    "ms_deform_attn",
    "topk_select",
    "topk_detections",
    "rep_conv",
    "backend",
    "available_backends",
]


def _always(device_type: str) -> bool:
    return True


register("rep_conv", "reference", _always)(rep_conv_reference)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def rep_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str = "silu") -> torch.Tensor:
    """Folded RepConv: act(conv3x3(x, weight, stride 1, padding 1) + bias).

    x [B,C_in,H,W] (channels_last is the kernels' layout); weight [C_out,C_in,3,3]; bias [C_out].
    activation is one of 'silu', 'relu', 'identity'.

    Under torch.autocast on x's device, x, weight and bias are cast to the autocast dtype first,
    as autocast does for F.conv2d (a float32 weight meets a bfloat16 activation in a model
    deployed and then run under ``torch.autocast("cpu", torch.bfloat16)``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C_in, H, W], got {_shape(x)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [C_out, C_in, 3, 3] with C_in={x.shape[1]}, got "
                         f"{_shape(weight)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [C_out] = [{weight.shape[0]}], got {_shape(bias)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    fn = _backend.select("rep_conv", x.device.type)
    return fn(x, weight, bias, activation)
