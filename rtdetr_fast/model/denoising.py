"""Contrastive denoising groups (DINO-style, as in RT-DETR).

Each group holds a positive copy of every ground-truth box (small noise: it must be
reconstructed) and a negative copy (noise of 1-2x the half size: it must be rejected).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def contrastive_denoising_group(targets: List[Dict[str, torch.Tensor]], num_classes: int,
                                num_queries: int, class_embed: nn.Embedding,
                                num_denoising: int = 100, label_noise_ratio: float = 0.5,
                                box_noise_scale: float = 1.0
                                ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict]]:
    """``targets``: per image ``labels`` [N] and ``boxes`` [N,4] cxcywh normalised.

    Returns (query embeddings [B,G*2*M,D], unactivated boxes [B,G*2*M,4], attention mask
    [G*2*M+Q, G*2*M+Q] with True = may not attend, meta) or None when there is nothing to
    denoise. M is the largest number of boxes in an image, G the number of groups."""
    if num_denoising <= 0:
        return None
    num_gts = [len(t["labels"]) for t in targets]
    max_gt = max(num_gts) if num_gts else 0
    if max_gt == 0:
        return None
    device = class_embed.weight.device
    num_group = max(num_denoising // max_gt, 1)
    bs = len(targets)
    labels = torch.full([bs, max_gt], num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros([bs, max_gt, 4], device=device)
    pad_mask = torch.zeros([bs, max_gt], dtype=torch.bool, device=device)
    for i, n in enumerate(num_gts):
        if n:
            labels[i, :n] = targets[i]["labels"]
            boxes[i, :n] = targets[i]["boxes"].to(boxes.dtype)
            pad_mask[i, :n] = True
    labels = labels.tile([1, 2 * num_group])
    boxes = boxes.tile([1, 2 * num_group, 1])
    pad_mask = pad_mask.tile([1, 2 * num_group])
    # within each group of 2*M: the first M are positives, the next M negatives
    negative = torch.zeros([bs, max_gt * 2, 1], device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, num_group, 1])
    positive = (1 - negative).squeeze(-1) * pad_mask
    dn_positive_idx = torch.nonzero(positive)[:, 1]
    dn_positive_idx = list(torch.split(dn_positive_idx, [n * num_group for n in num_gts]))
    total = int(max_gt * 2 * num_group)

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < (label_noise_ratio * 0.5)
        new = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & pad_mask, new, labels)

    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        diff = torch.tile(boxes[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(boxes)
        # negatives move by 1-2 half-sizes, positives by less than one
        part = (part + 1.0) * negative + part * (1 - negative)
        xyxy = (xyxy + part * sign * diff).clip(min=0.0, max=1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)
    boxes_unact = inverse_sigmoid(boxes)
    queries = class_embed(labels)

    size = total + num_queries
    mask = torch.zeros([size, size], dtype=torch.bool, device=device)
    # matching queries cannot see the denoising ones
    mask[total:, :total] = True
    # denoising groups cannot see each other
    g = max_gt * 2
    for i in range(num_group):
        mask[g * i: g * (i + 1), g * (i + 1): total] = True
        mask[g * i: g * (i + 1), : g * i] = True
    meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
            "dn_num_split": [total, num_queries]}
    return queries, boxes_unact, mask, meta
