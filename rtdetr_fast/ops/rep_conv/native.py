"""Binding of the extension's folded RepConv kernels (csrc/rep_conv/: cuda/ and, on the CPU, the Winograd kernel in cpu/).

  rtdetr_fast::rep_conv(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor
  rtdetr_fast::winograd_conv3x3(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor

CUDA: ``rep_conv``, x and weight channels_last, float16/bfloat16, C_in % 8 == 0; the result is
channels_last (mma.sync tensor cores, bias + activation in the epilogue). CPU:
``winograd_conv3x3``, Winograd F(4x4, 3x3) for float32/float64 NCHW inference with C_in and
C_out of at least ``winograd.min_channels(dtype)`` (see winograd.py); the float32 inference calls it
does not cover (layers under that width, the channels_last stem's among them) run oneDNN's
convolution with the activation fused (onednn.py), the reference's function in one pass. The
fake (meta) implementations are registered once, when rtdetr_fast._C loads (the schemas exist
only then, see _backend.on_extension_load); nothing imports the extension at module import.

Documented fallbacks to the reference (same result, never a silent wrong one): on CUDA, float32
(torch's cuDNN convolution, TF32 under torch's default ``allow_tf32``) and float64, C_in not a
multiple of 8 (the kernel copies 16-byte rows of channels), inputs that need a gradient
(deploy-time forward only), and B*H*W past 2^31; on the CPU, inputs that need a gradient, other
dtypes, and narrow layers. Mismatched dtypes or devices raise.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from . import onednn as _onednn
from . import winograd as _winograd
from ._common import ACTIVATIONS, check_same, conv_act, empty_output

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_registered = False


def _fake(x, weight, bias, activation):
    return empty_output(x, weight)


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_fake("rtdetr_fast::rep_conv")(_fake)
    _registered = True


_backend.on_extension_load(_register_python_side)


def supports(device_type: str) -> bool:
    if device_type == "cpu":
        return _winograd.available()
    return _backend.extension_has("rep_conv", device_type)


def kernel_covers(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the CUDA kernel runs this call (else the reference does)."""
    if x.dtype not in _KERNEL_DTYPES or x.shape[1] % 8 != 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    B, _, H, W = x.shape
    return B * H * W < 2 ** 31 - 1


def rep_conv_native(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    activation: str = "silu") -> torch.Tensor:
    """Native backend of :func:`rtdetr_fast.ops.rep_conv` (shapes already validated there)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same(x, weight, bias)
    if x.device.type == "cpu":
        if _winograd.covers(x, weight, bias):
            return _winograd.rep_conv_winograd(x, weight, bias, activation)
        if _onednn.fusable(x, weight, bias):
            return _onednn.conv_act(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, activation)
        return conv_act(x, weight, bias, activation)
    if not kernel_covers(x, weight, bias):
        return conv_act(x, weight, bias, activation)
    # no-ops for a channels_last model (RepVggBlock.fold stores its weight channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    return torch.ops.rtdetr_fast.rep_conv(x, weight, None if bias is None else bias.contiguous(),
                                          activation)
