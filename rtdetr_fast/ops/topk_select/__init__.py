"""Top-K query selection and detection post-processing: the public ops (:func:`topk_select`,
:func:`topk_detections`, which validate their inputs once and dispatch) and their reference,
native and Triton backends; the export forms are :mod:`.export`.

Every backend orders by (score descending, lower index first on ties, NaN below every real
score); see reference.py.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .. import _backend, _export
from .._checks import any_device, shape_str
from . import native as _native
from . import triton as _triton
from .reference import topk_detections_reference, topk_select_reference

__all__ = ["topk_detections", "topk_detections_reference", "topk_select",
           "topk_select_reference"]

_backend.register("topk_select", "native", _native.supports)(_native.topk_select_native)
_backend.register("topk_detections", "native", _native.supports)(_native.topk_detections_native)
_backend.register("topk_select", "triton", _backend.triton_supports)(_triton.topk_select_triton)
_backend.register("topk_detections", "triton", _backend.triton_supports)(
    _triton.topk_detections_triton)
_backend.register("topk_select", "reference", any_device)(topk_select_reference)
_backend.register("topk_detections", "reference", any_device)(topk_detections_reference)


def topk_select(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Top-K query selection.

    logits [B,N,C]; each of ``tensors`` [B,N,*]. Returns (scores [B,K], the max over C sorted
    descending; indices [B,K] int64; [t gathered at the indices, [B,K,*]]). Equal scores are
    ordered by the lower index; NaN ranks below every real score. Gradients flow to ``tensors``
    and to the scores.

    Errors (one-line messages): ``ValueError`` when logits is not a 3-d tensor, ``k`` is not an
    int in [1, N], a tensor of ``tensors`` is not [B, N, ...] or not on logits' device;
    ``RuntimeError`` when the backend in force cannot run the op on that device. Under the export
    switch (:func:`rtdetr_fast.ops._export.export_forms`) the export form runs unchecked.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_select(logits, k, tensors)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        got = shape_str(logits) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"logits must be [B, N, C], got {got}")
    B, N, _ = logits.shape
    if not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}], got {k!r}")
    for i, t in enumerate(tensors):
        if t.dim() < 2 or t.shape[:2] != (B, N):
            raise ValueError(f"tensors[{i}] must be [B, N, ...] = [{B}, {N}, ...], got "
                             f"{shape_str(t)}")
        if t.device != logits.device:
            raise ValueError(f"tensors[{i}] is on {t.device}, logits on {logits.device}")
    fn = _backend.select("topk_select", logits.device.type)
    return fn(logits, k, list(tensors))


def topk_detections(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor,
                    k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detection post-processing: top-K (query, class) pairs by sigmoid score.

    logits [B,Q,C]; boxes [B,Q,4] cxcywh normalised; image_sizes [B,2] as (H, W) in pixels.
    Returns scores [B,K], labels [B,K] int64, boxes [B,K,4] xyxy in pixels.

    Errors (one-line messages): ``ValueError`` when logits is not 3-d, boxes is not [B, Q, 4],
    image_sizes is not [B, 2], or ``k`` is not an int in [1, Q*C]; ``RuntimeError`` when the
    backend in force cannot run the op on logits' device. Under the export switch the export
    form runs unchecked.
    """
    if _export.current is not None:  # under an exporter: the op's export form
        return _export.topk_detections(logits, boxes, image_sizes, k)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, Q, C], got {shape_str(logits)}")
    B, Q, C = logits.shape
    if tuple(boxes.shape) != (B, Q, 4):
        raise ValueError(f"boxes must be [B, Q, 4] = [{B}, {Q}, 4], got {shape_str(boxes)}")
    if tuple(image_sizes.shape) != (B, 2):
        raise ValueError(f"image_sizes must be [B, 2] = [{B}, 2] as (H, W), got "
                         f"{shape_str(image_sizes)}")
    if not isinstance(k, int) or not 1 <= k <= Q * C:
        raise ValueError(f"k must be an int in [1, Q*C={Q * C}], got {k!r}")
    fn = _backend.select("topk_detections", logits.device.type)
    return fn(logits, boxes, image_sizes, k)
