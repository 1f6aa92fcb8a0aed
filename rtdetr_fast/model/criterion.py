"""The RT-DETR loss: varifocal classification loss with IoU targets, L1 and GIoU box losses, on
the final layer, every auxiliary decoder layer, the encoder's top-K proposals and the denoising
groups."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy, elementwise_box_iou
from .matcher import HungarianMatcher

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def varifocal_loss(logits: torch.Tensor, target_score: torch.Tensor, one_hot: torch.Tensor,
                   num_boxes: float, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """VFL: BCE towards the IoU-valued target, negatives down-weighted by alpha * p^gamma.
    logits, target_score, one_hot [B,Q,C]."""
    pred = torch.sigmoid(logits).detach()
    weight = alpha * pred.pow(gamma) * (1 - one_hot) + target_score
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


class RTDETRCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 weight_vfl: float = 1.0, weight_bbox: float = 5.0, weight_giou: float = 2.0,
                 alpha: float = 0.75, gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_vfl": weight_vfl, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.alpha, self.gamma = alpha, gamma

    @staticmethod
    def _src_idx(indices: Indices):
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    def layer_losses(self, outputs: Dict[str, torch.Tensor], targets, indices: Indices,
                     num_boxes: float) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        device = logits.device
        b, q = self._src_idx(indices)
        b, q = b.to(device), q.to(device)
        src_boxes = boxes[b, q]
        tgt_boxes = torch.cat([t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices)]
                              ).to(src_boxes.dtype)
        tgt_labels = torch.cat([t["labels"][j.to(device)] for t, (_, j) in zip(targets, indices)])
        iou, giou = elementwise_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))

        # the class count comes from the logits, so the loss follows class heads re-initialised
        # for another class count (fine-tuning) whatever ``self.num_classes`` says
        num_classes = logits.shape[-1]
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=device)
        classes[b, q] = tgt_labels
        one_hot = F.one_hot(classes, num_classes + 1)[..., :-1].to(logits.dtype)
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=device)
        score[b, q] = iou.detach()
        vfl = varifocal_loss(logits, score.unsqueeze(-1) * one_hot, one_hot, num_boxes,
                             self.alpha, self.gamma)
        l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou_loss = (1 - giou).sum() / num_boxes
        return {"loss_vfl": vfl * self.weights["loss_vfl"],
                "loss_bbox": l1 * self.weights["loss_bbox"],
                "loss_giou": giou_loss * self.weights["loss_giou"]}

    @staticmethod
    def num_boxes(targets, device) -> float:
        """Boxes per rank averaged over ranks, at least 1 (the loss normaliser)."""
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    @staticmethod
    def denoising_indices(dn_meta: Dict, targets) -> Indices:
        out = []
        for pos, t in zip(dn_meta["dn_positive_idx"], targets):
            n = len(t["labels"])
            gt = torch.arange(n, dtype=torch.int64, device=pos.device).tile(dn_meta["dn_num_group"])
            out.append((pos, gt))
        return out

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
        """``targets``: per image ``labels`` [N] int64 and ``boxes`` [N,4] cxcywh normalised."""
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        losses = self.layer_losses(outputs, targets, self.matcher(outputs, targets), num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            for k, v in self.layer_losses(aux, targets, self.matcher(aux, targets),
                                          num_boxes).items():
                losses[f"{k}_aux_{i}"] = v
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            enc_targets = targets
            if outputs.get("enc_meta", {}).get("class_agnostic", False):
                # RT-DETRv2's class-agnostic proposals: one class, every box its target. (The
                # official matches them against the real labels, which indexes past its one
                # score column; matching the zeroed labels is what its loss uses.)
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            for k, v in self.layer_losses(enc, enc_targets, self.matcher(enc, enc_targets),
                                          num_boxes).items():
                losses[f"{k}_enc"] = v
        if "dn_aux_outputs" in outputs:
            meta = outputs["dn_meta"]
            indices = self.denoising_indices(meta, targets)
            dn_boxes = num_boxes * meta["dn_num_group"]
            for i, aux in enumerate(outputs["dn_aux_outputs"]):
                for k, v in self.layer_losses(aux, targets, indices, dn_boxes).items():
                    losses[f"{k}_dn_{i}"] = v
        return losses
