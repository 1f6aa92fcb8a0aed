"""Post-processing: sigmoid scores, top-K over queries x classes, boxes to image pixels."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .. import ops


class PostProcessor(nn.Module):
    def __init__(self, num_top_queries: int = 300):
        super().__init__()
        self.num_top_queries = num_top_queries

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-K (query, class) pairs by sigmoid score, batched: ``logits`` [B,Q,C],
        ``boxes`` [B,Q,4] cxcywh normalised, ``image_sizes`` [B,2] as (H, W) in pixels ->
        scores [B,K], labels [B,K] int64, boxes [B,K,4] xyxy in pixels, K =
        min(num_top_queries, Q*C). The exported graphs end in this too."""
        k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
        return ops.topk_detections(logits, boxes, image_sizes.to(boxes.device), k)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], image_sizes: torch.Tensor
                ) -> List[Dict[str, torch.Tensor]]:
        """``image_sizes`` [B,2] as (H, W) of the original images, in pixels.

        Returns per image ``boxes`` [K,4] xyxy in pixels, ``scores`` [K], ``labels`` [K],
        sorted by score."""
        scores, labels, xyxy = self.detections(outputs["pred_logits"], outputs["pred_boxes"],
                                               image_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for s, lab, b in zip(scores, labels, xyxy)]
