"""Pure-PyTorch top-K query selection and detection post-processing.

Order: scores descending; equal scores are ordered by the lower index (a stable sort), NaN
scores rank below every real score (-inf included), so a NaN is selected only when fewer than K
real scores exist. Every backend follows this order.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def _rank(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``scores`` [B, N] in the documented order."""
    nan = torch.isnan(scores)
    # NaN sorts above +inf in a descending sort; rank it below -inf instead: a stable sort
    # putting real scores first, then a stable descending sort on the score with NaN as -inf,
    # orders by (score desc, real before NaN, index asc)
    order = torch.argsort(nan.to(torch.int8), dim=1, stable=True)
    key = torch.where(nan, torch.full_like(scores, float("-inf")), scores).gather(1, order)
    idx = order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))[:, :k]
    return scores.gather(1, idx), idx


def gather_rows(idx: torch.Tensor, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """t[b, idx[b, j]] for each [B, N, *] tensor: differentiable torch gathers."""
    return [t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(
        -1, -1, *t.shape[2:])) for t in tensors]


def detections_epilogue(scores: torch.Tensor, idx: torch.Tensor, boxes: torch.Tensor,
                        image_sizes: torch.Tensor, C: int):
    """Labels and xyxy pixel boxes from flat (query, class) indices [B,K]."""
    labels = idx % C
    b = boxes.gather(1, (idx // C).unsqueeze(-1).expand(-1, -1, 4))
    cx, cy, w, h = b.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    hw = image_sizes.to(xyxy.dtype)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1).unsqueeze(1)
    return scores, labels, xyxy * scale


def topk_select_reference(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                          ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """logits [B,N,C] -> (scores [B,K] = max over C, indices [B,K] int64, [t[b, idx] for t])."""
    scores, idx = _rank(logits.amax(dim=-1), k)
    return scores, idx, gather_rows(idx, tensors)


def topk_detections_reference(logits: torch.Tensor, boxes: torch.Tensor,
                              image_sizes: torch.Tensor, k: int
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B,Q,C], boxes [B,Q,4] cxcywh in [0,1], image_sizes [B,2] as (H, W) ->
    scores [B,K] (sigmoid), labels [B,K] int64, boxes [B,K,4] xyxy in pixels."""
    scores, flat = _rank(torch.sigmoid(logits.flatten(1)), k)
    return detections_epilogue(scores, flat, boxes, image_sizes, logits.shape[-1])
