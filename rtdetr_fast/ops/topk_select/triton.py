"""Triton top-K query selection and detection post-processing.

Two launches per call: stage 1 runs one program per (image, block of anchors), computes the
per-anchor max over C, turns each anchor into a 64-bit key and keeps the block's best KP keys
(KP = K rounded up to a power of two); stage 2 runs one program per image, merges the block
candidates into a running top-KP and writes scores and indices (and, for post-processing, labels
and pixel boxes).

The key makes the order exact without comparing floats: the high 32 bits are the score's bits
mapped so that unsigned order is float order (NaN lowest, below -inf; -0 folded into +0), the low
32 bits are ``0xFFFFFFFF - index``, so equal scores put the lower index first. Every key is
distinct, so "the KP largest keys" is one well-defined set and the order is the reference's.

Importing this module does not import triton: the kernels are built on first use, which is also
what lets tests set ``TRITON_INTERPRET=1`` before triton decorates them.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch

from . import _common as _shared

# stage 2 sorts 2*KP keys in one program; past this K is a full sort, not a top-K, and runs on
# the torch ops of the reference (same order, same keys)
MAX_K = 2048
# the order key is built from float32 bits, exact for these; float64 takes the torch path
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _stage1(logits_ptr, cand_ptr, N, C, NBLK,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_C)
        base = logits_ptr + b * N * C
        kmax = tl.zeros([BLOCK_N], dtype=tl.uint32)
        for c0 in range(0, C, BLOCK_C):
            m = rmask[:, None] & ((c0 + cols) < C)[None, :]
            x = tl.load(base + rows[:, None].to(tl.int64) * C + (c0 + cols)[None, :], mask=m,
                        other=0.0).to(tl.float32)
            # float32 -> uint32 whose unsigned order is the float order; -0 ties with +0 as
            # in torch; NaN -> 0xFFFFFFFF so the max over classes propagates it as torch.amax
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x == 0.0, tl.zeros_like(bits), bits)
            k = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
            k = tl.where(x != x, tl.full(k.shape, 0xFFFFFFFF, tl.uint32), k)
            k = tl.where(m, k, tl.zeros_like(k))
            kmax = tl.maximum(kmax, tl.max(k, axis=1))
        # NaN (0xFFFFFFFF after the max) ranks below -inf: give it the lowest key
        ok = tl.where(kmax == 0xFFFFFFFF, tl.zeros_like(kmax), kmax)
        low = (0xFFFFFFFF - rows.to(tl.int64)).to(tl.uint64)
        key = (ok.to(tl.uint64) << 32) | low
        key = tl.where(rmask, key, tl.zeros_like(key))  # padding loses to every anchor
        top = tl.topk(key, KP)
        out = cand_ptr + (b * NBLK + blk) * KP + tl.arange(0, KP)
        tl.store(out, top.to(tl.int64, bitcast=True))

    @triton.jit
    def _stage2(cand_ptr, NCAND, K, scores_ptr, idx_ptr,
                boxes_ptr, sizes_ptr, labels_ptr, xyxy_ptr, C_DET, Q_DET,
                KP: tl.constexpr, DET: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, KP)
        src = cand_ptr + b * NCAND
        run = tl.sort(tl.load(src + offs).to(tl.uint64, bitcast=True), descending=True)
        for t in range(KP, NCAND, KP):
            tile = tl.load(src + t + offs).to(tl.uint64, bitcast=True)
            both = tl.reshape(tl.join(run, tile), [2 * KP])
            run = tl.topk(both, KP)
        keep = offs < K
        ok = (run >> 32).to(tl.uint32)
        idx = (0xFFFFFFFF - (run & 0xFFFFFFFF)).to(tl.int64)
        # inverse of the order key (after the NaN remap, 0 is NaN)
        bits = tl.where((ok >> 31) != 0, ok ^ 0x80000000, ~ok)
        score = tl.where(ok == 0, float("nan"), bits.to(tl.float32, bitcast=True))
        tl.store(scores_ptr + b * K + offs, score.to(scores_ptr.dtype.element_ty), mask=keep)
        if DET:
            label = idx % C_DET
            q = idx // C_DET
            bp = boxes_ptr + (b * Q_DET + q) * 4
            cx = tl.load(bp + 0, mask=keep, other=0.0)
            cy = tl.load(bp + 1, mask=keep, other=0.0)
            w = tl.load(bp + 2, mask=keep, other=0.0)
            h = tl.load(bp + 3, mask=keep, other=0.0)
            ty = xyxy_ptr.dtype.element_ty
            # sizes converted to the boxes dtype first and every product rounded to it, as the
            # reference's torch ops do
            H = tl.load(sizes_ptr + b * 2).to(tl.float32).to(ty).to(tl.float32)
            W = tl.load(sizes_ptr + b * 2 + 1).to(tl.float32).to(ty).to(tl.float32)
            hw = 0.5 * w.to(tl.float32)
            hh = 0.5 * h.to(tl.float32)
            cxf = cx.to(tl.float32)
            cyf = cy.to(tl.float32)
            x1 = (cxf - hw).to(ty).to(tl.float32) * W
            y1 = (cyf - hh).to(ty).to(tl.float32) * H
            x2 = (cxf + hw).to(ty).to(tl.float32) * W
            y2 = (cyf + hh).to(ty).to(tl.float32) * H
            o = xyxy_ptr + (b * K + offs) * 4
            tl.store(o + 0, x1.to(ty), mask=keep)
            tl.store(o + 1, y1.to(ty), mask=keep)
            tl.store(o + 2, x2.to(ty), mask=keep)
            tl.store(o + 3, y2.to(ty), mask=keep)
            tl.store(labels_ptr + b * K + offs, label, mask=keep)
        else:
            tl.store(idx_ptr + b * K + offs, idx, mask=keep)

    return _stage1, _stage2


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _candidates(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, int]:
    """Stage 1: [B, NBLK*KP] int64 keys, the best KP of every block of anchors."""
    B, N, C = logits.shape
    kp = max(_pow2(k), 16)
    block_n = max(kp, 1024)
    nblk = -(-N // block_n)
    cand = torch.empty(B, nblk * kp, dtype=torch.int64, device=logits.device)
    stage1, _ = _kernels()
    stage1[(B, nblk)](logits, cand, N, C, nblk, BLOCK_N=block_n,
                      BLOCK_C=min(_pow2(C), 32), KP=kp)
    return cand, kp


def select_indices(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    B = logits.shape[0]
    if k > MAX_K or logits.dtype not in KERNEL_DTYPES:
        return _shared.rank(logits.amax(-1), k)
    cand, kp = _candidates(logits, k)
    scores = torch.empty(B, k, dtype=logits.dtype, device=logits.device)
    idx = torch.empty(B, k, dtype=torch.int64, device=logits.device)
    _, stage2 = _kernels()
    stage2[(B,)](cand, cand.shape[1], k, scores, idx, scores, scores, idx, scores, 1, 1,
                 KP=kp, DET=False)
    return scores, idx


def detections(scores: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor, k: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores`` are the sigmoid scores [B, Q, C] (torch's sigmoid, so the ranking key is
    bit-identical to the reference's)."""
    B, Q, C = scores.shape
    flat = scores.contiguous().view(B, Q * C, 1)
    boxes = boxes.contiguous()
    image_sizes = image_sizes.contiguous()
    if k > MAX_K or scores.dtype not in KERNEL_DTYPES:
        s, idx = _shared.rank(flat[..., 0], k)
        return _shared.detections_epilogue(s, idx, boxes, image_sizes, C)
    cand, kp = _candidates(flat, k)
    out_s = torch.empty(B, k, dtype=scores.dtype, device=scores.device)
    labels = torch.empty(B, k, dtype=torch.int64, device=scores.device)
    xyxy = torch.empty(B, k, 4, dtype=boxes.dtype, device=scores.device)
    _, stage2 = _kernels()
    stage2[(B,)](cand, cand.shape[1], k, out_s, labels, boxes, image_sizes, labels, xyxy, C, Q,
                 KP=kp, DET=True)
    return out_s, labels, xyxy


# -- torch.library ops, so torch.compile and CUDA graphs see one opaque call -------------------

@torch.library.custom_op("rtdetr_fast::topk_select_indices_triton", mutates_args=())
def _select_op(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return select_indices(logits, k)


@torch.library.custom_op("rtdetr_fast::topk_detections_triton", mutates_args=())
def _detections_op(scores: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor, k: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return detections(scores, boxes, image_sizes, k)


_select_op.register_fake(_shared.select_fake)
_detections_op.register_fake(_shared.detections_fake)
_select_op.register_autograd(_shared.select_backward,
                             setup_context=_shared.select_setup_context)


def topk_select_triton(logits: torch.Tensor, k: int, tensors: Sequence[torch.Tensor] = ()
                       ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    scores, idx = _select_op(logits, k)
    return scores, idx, _shared.gather_rows(idx, tensors)


def topk_detections_triton(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor,
                           k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch's sigmoid: the ranking key is then bit-identical to the reference's (see native.py)
    return _detections_op(torch.sigmoid(logits), boxes, image_sizes, k)
