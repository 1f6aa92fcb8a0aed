"""Stateless hot operations of RT-DETR, each with a pure-PyTorch reference.

Model code calls only these functions; which implementation runs is decided in
:mod:`rtdetr_fast.ops._backend` (``with ops.backend("reference"): ...`` or
``RTDETR_FAST_BACKEND=reference``). Inputs are validated once (here; ms_deform_attn in its
package's __init__.py), in the words of the dimension glossary: B batch, Q queries, H heads,
L levels, P points, D channels per head, S = sum of H_l*W_l, C classes, N anchors, K selected.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _backend, _export
from ._backend import available_backends, backend, register
# binds ops.ms_deform_attn to the function, after the import machinery bound it to the package
from .ms_deform_attn import ms_deform_attn
from .max_pool import max_pool_3x3_s2
from .rep_conv import ACTIVATIONS, rep_conv_reference
from .topk_select import topk_detections_reference, topk_select_reference

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


register("topk_select", "reference", _always)(topk_select_reference)
register("topk_detections", "reference", _always)(topk_detections_reference)
register("rep_conv", "reference", _always)(rep_conv_reference)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def topk_select(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Top-K query selection.

    logits [B,N,C]; each of ``tensors`` [B,N,*]. Returns (scores [B,K], the max over C sorted
    descending; indices [B,K] int64; [t gathered at the indices, [B,K,*]]). Equal scores are
    ordered by the lower index; NaN ranks below every real score. Gradients flow to ``tensors``
    and to the scores.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_select(logits, k, tensors)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [B, N, C], got "
                         f"{_shape(logits) if isinstance(logits, torch.Tensor) else type(logits)}")
    B, N, _ = logits.shape
    if not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}], got {k!r}")
    for i, t in enumerate(tensors):
        if t.dim() < 2 or t.shape[:2] != (B, N):
            raise ValueError(f"tensors[{i}] must be [B, N, ...] = [{B}, {N}, ...], got {_shape(t)}")
        if t.device != logits.device:
            raise ValueError(f"tensors[{i}] is on {t.device}, logits on {logits.device}")
    fn = _backend.select("topk_select", logits.device.type)
    return fn(logits, k, list(tensors))


def topk_detections(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor,
                    k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detection post-processing: top-K (query, class) pairs by sigmoid score.

    logits [B,Q,C]; boxes [B,Q,4] cxcywh normalised; image_sizes [B,2] as (H, W) in pixels.
    Returns scores [B,K], labels [B,K] int64, boxes [B,K,4] xyxy in pixels.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_detections(logits, boxes, image_sizes, k)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, Q, C], got {_shape(logits)}")
    B, Q, C = logits.shape
    if tuple(boxes.shape) != (B, Q, 4):
        raise ValueError(f"boxes must be [B, Q, 4] = [{B}, {Q}, 4], got {_shape(boxes)}")
    if tuple(image_sizes.shape) != (B, 2):
        raise ValueError(f"image_sizes must be [B, 2] = [{B}, 2] as (H, W), got "
                         f"{_shape(image_sizes)}")
    if not isinstance(k, int) or not 1 <= k <= Q * C:
        raise ValueError(f"k must be an int in [1, Q*C={Q * C}], got {k!r}")
    fn = _backend.select("topk_detections", logits.device.type)
    return fn(logits, boxes, image_sizes, k)


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
