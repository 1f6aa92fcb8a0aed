"""The export form of ``ops.topk_select`` and ``ops.topk_detections``: ``torch.topk`` (ONNX TopK,
which orders equal values by the lower index, as the kernels do) and torch gathers, the sizes
taken from the tensors' shapes.

``ops.topk_select`` and ``ops.topk_detections`` run these inside ``ops._export.export_forms``.
A NaN score ranks first here (torch.topk's order), not last as in the kernels.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ._common import detections_epilogue, gather_rows

__all__ = ["topk_select_export", "topk_detections_export"]


def topk_select_export(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """logits [B,N,C] -> (scores [B,K] = max over C, indices [B,K] int64, [t[b, idx] for t])."""
    scores, idx = torch.topk(logits.amax(dim=-1), k, dim=1, largest=True, sorted=True)
    return scores, idx, gather_rows(idx, tensors)


def topk_detections_export(logits: torch.Tensor, boxes: torch.Tensor,
                           image_sizes: torch.Tensor, k: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B,Q,C], boxes [B,Q,4] cxcywh in [0,1], image_sizes [B,2] as (H, W) ->
    scores [B,K] (sigmoid), labels [B,K] int64, boxes [B,K,4] xyxy in pixels."""
    scores, flat = torch.topk(torch.sigmoid(logits.flatten(1)), k, dim=1, largest=True,
                              sorted=True)
    return detections_epilogue(scores, flat, boxes, image_sizes, logits.shape[-1])
