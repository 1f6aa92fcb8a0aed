"""Post-processing: sigmoid scores, top-K over queries x classes, boxes to image pixels."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from .. import ops


class PostProcessor(nn.Module):
    def __init__(self, num_top_queries: int = 300):
        super().__init__()
        self.num_top_queries = num_top_queries

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], image_sizes: torch.Tensor
                ) -> List[Dict[str, torch.Tensor]]:
        """``image_sizes`` [B,2] as (H, W) of the original images, in pixels.

        Returns per image ``boxes`` [K,4] xyxy in pixels, ``scores`` [K], ``labels`` [K],
        sorted by score."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
        scores, labels, xyxy = ops.topk_detections(logits, boxes, image_sizes.to(boxes.device), k)
        return [{"boxes": b, "scores": s, "labels": lab} for s, lab, b in zip(scores, labels, xyxy)]
