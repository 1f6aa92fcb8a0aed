"""The pieces every top-K backend shares (the backends never import each other): the ranking
in the documented order, the gathers and the post-processing epilogue (the reference's own
math), and the one fake/autograd convention of the selection ops (native and Triton): their
gathers of the caller's tensors are torch ops, so their gradients are torch's; the gradient of
the scores goes through ``select_backward``, which matches ``logits.amax(-1)`` (shared evenly
between tied maxima).

Order: scores descending; equal scores are ordered by the lower index (a stable sort), NaN
scores rank below every real score (-inf included).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def rank(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
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


def select_setup_context(ctx, inputs, output) -> None:
    logits, _ = inputs
    scores, idx = output
    ctx.save_for_backward(logits, scores, idx)


def select_backward(ctx, grad_scores, grad_idx):
    logits, scores, idx = ctx.saved_tensors
    C = logits.shape[-1]
    where = idx.unsqueeze(-1).expand(-1, -1, C)
    rows = logits.gather(1, where)
    s = scores.unsqueeze(-1)
    # the anchors' maxima share the gradient, as torch.amax's backward does
    hit = (rows == s) | (rows.isnan() & s.isnan())
    share = hit.to(grad_scores.dtype) / hit.sum(-1, keepdim=True).clamp_min(1).to(
        grad_scores.dtype)
    grad = torch.zeros_like(logits).scatter(1, where, share * grad_scores.unsqueeze(-1))
    return grad, None


def select_fake(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    B = logits.shape[0]
    return logits.new_empty(B, k), logits.new_empty(B, k, dtype=torch.int64)


def detections_fake(scores, boxes, image_sizes, k):
    B = scores.shape[0]
    return (scores.new_empty(B, k), scores.new_empty(B, k, dtype=torch.int64),
            boxes.new_empty(B, k, 4))
