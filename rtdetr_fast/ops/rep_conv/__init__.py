"""Folded RepConv, act(conv3x3(x, weight, stride 1, padding 1) + bias): the public op
(:func:`rep_conv`, which validates its inputs once and dispatches) and its reference, native
(CUDA mma.sync) and Triton (implicit GEMM) backends. Each kernel module documents the calls it
routes to the reference instead."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import any_device, shape_str
from . import native as _native
from . import triton as _triton
from .reference import ACTIVATIONS, apply_activation, rep_conv_reference  # noqa: F401

__all__ = ["ACTIVATIONS", "apply_activation", "rep_conv", "rep_conv_reference"]

_backend.register("rep_conv", "native", _native.supports)(_native.rep_conv_native)
_backend.register("rep_conv", "triton", _backend.triton_supports)(_triton.rep_conv_triton)
_backend.register("rep_conv", "reference", any_device)(rep_conv_reference)


def rep_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: str = "silu") -> torch.Tensor:
    """Folded RepConv: act(conv3x3(x, weight, stride 1, padding 1) + bias).

    x [B,C_in,H,W] (channels_last is the kernels' layout); weight [C_out,C_in,3,3]; bias [C_out].
    activation is one of 'silu', 'relu', 'identity'.

    Under torch.autocast on x's device, x, weight and bias are cast to the autocast dtype first,
    as autocast does for F.conv2d (a float32 weight meets a bfloat16 activation in a model
    deployed and then run under ``torch.autocast("cpu", torch.bfloat16)``).

    Errors (one-line messages): ``ValueError`` when ``activation`` is not one of
    :data:`ACTIVATIONS`, x is not 4-d, weight is not [C_out, C_in, 3, 3] with x's C_in, or bias
    is not None or [C_out]; ``RuntimeError`` when the backend in force cannot run the op on x's
    device. Under the export switch the reference (a plain conv) runs.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C_in, H, W], got {shape_str(x)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [C_out, C_in, 3, 3] with C_in={x.shape[1]}, got "
                         f"{shape_str(weight)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [C_out] = [{weight.shape[0]}], got {shape_str(bias)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    fn = _backend.select("rep_conv", x.device.type)
    return fn(x, weight, bias, activation)
