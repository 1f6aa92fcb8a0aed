"""Pure-PyTorch top-K query selection and detection post-processing.

Order: scores descending; equal scores are ordered by the lower index (a stable sort), NaN
scores rank below every real score (-inf included), so a NaN is selected only when fewer than K
real scores exist. Every backend follows this order.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ._common import detections_epilogue, gather_rows, rank


def topk_select_reference(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                          ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """logits [B,N,C] -> (scores [B,K] = max over C, indices [B,K] int64, [t[b, idx] for t])."""
    scores, idx = rank(logits.amax(dim=-1), k)
    return scores, idx, gather_rows(idx, tensors)


def topk_detections_reference(logits: torch.Tensor, boxes: torch.Tensor,
                              image_sizes: torch.Tensor, k: int
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B,Q,C], boxes [B,Q,4] cxcywh in [0,1], image_sizes [B,2] as (H, W) ->
    scores [B,K] (sigmoid), labels [B,K] int64, boxes [B,K,4] xyxy in pixels."""
    scores, flat = rank(torch.sigmoid(logits.flatten(1)), k)
    return detections_epilogue(scores, flat, boxes, image_sizes, logits.shape[-1])
