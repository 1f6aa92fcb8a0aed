"""Hungarian matching of predictions to ground truth (focal class cost, L1 and GIoU box costs)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, tgt_labels: torch.Tensor,
                    tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Cost [Q, M] of assigning each of Q predictions to each of M targets (one image or
        a flattened batch)."""
        prob = torch.sigmoid(logits)[:, tgt_labels]
        # focal-loss shaped class cost: what matching this class would cost minus not matching
        neg = (1 - self.alpha) * prob ** self.gamma * (-(1 - prob + 1e-8).log())
        pos = self.alpha * (1 - prob) ** self.gamma * (-(prob + 1e-8).log())
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * (pos - neg) + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image (prediction indices, target indices), both int64, of equal length."""
        # imported here: inference (import rtdetr_fast) must not need scipy, only training
        from scipy.optimize import linear_sum_assignment

        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            c = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"].float())
            # a diverged model yields NaN costs; match anyway so the loss reports the NaN
            c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
            i, j = linear_sum_assignment(c.cpu().numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out
