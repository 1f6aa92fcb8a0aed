"""RT-DETR's query selection: the encoder heads score every memory token (one per anchor), the
top-K tokens become the decoder's queries, their boxes its initial reference points.

Used by :class:`~rtdetr_fast.model.decoder.RTDETRDecoder` in every mode (training, eval, the
deployed model, the exported graphs: ``ops.topk_select`` takes its export form there).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .. import ops

__all__ = ["select_queries"]


def select_queries(memory: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor,
                   enc_output: nn.Module, enc_score_head: nn.Module, enc_bbox_head: nn.Module,
                   num_queries: int, box_head_on_selected: bool = False,
                   gather_memory: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The top ``num_queries`` of ``memory`` [B,N,C] by encoder score.

    ``anchors`` [1,N,4] unactivated (+inf where invalid) and ``valid`` [1,N,1] (1/0, masks the
    memory the encoder heads see). Tokens are ranked by their best class score
    (``enc_score_head``'s output, one column when class-agnostic). Returns

    - ``ref_unact`` [B,K,4]: ``enc_bbox_head`` of the selected tokens plus their anchors, the
      decoder's initial reference boxes before the sigmoid;
    - ``enc_topk_logits`` [B,K,C']: the selected tokens' encoder scores (the encoder loss);
    - the selected tokens of ``enc_output(memory)`` [B,K,C], detached (the decoder's initial
      queries), or None without ``gather_memory`` (learnt queries).

    ``box_head_on_selected`` (the deployed model in eval mode): the box head, row by row, runs
    on the K selected rows only instead of on all N; the same rows of the same function.
    """
    B = memory.shape[0]
    memory = valid.to(memory.dtype) * memory
    output_memory = enc_output(memory)
    enc_class = enc_score_head(output_memory)
    if box_head_on_selected:
        _, _, (picked, picked_anchors, enc_topk_logits) = ops.topk_select(
            enc_class, num_queries,
            [output_memory, anchors.expand(B, -1, -1).contiguous(), enc_class])
        ref_unact = enc_bbox_head(picked) + picked_anchors
        return ref_unact, enc_topk_logits, picked.detach()
    enc_coord_unact = enc_bbox_head(output_memory) + anchors
    targets = [enc_coord_unact, enc_class]
    if gather_memory:
        targets.append(output_memory.detach())
    _, _, gathered = ops.topk_select(enc_class, num_queries, targets)
    return gathered[0], gathered[1], (gathered[2] if gather_memory else None)
