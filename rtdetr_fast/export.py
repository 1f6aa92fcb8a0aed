"""Deployment exports: ONNX with dynamic batch and image size, torch.export, AOTInductor.

Every exporter sees the same module, :class:`DeployModel`: the eval-mode detector with RepConv
folded and the post-processing inside, under the graph contract of the official RT-DETR export

    inputs   images             [B, 3, H, W] float32, RGB in [0, 1] (H, W multiples of 32)
             orig_target_sizes  [B, 2] int64, (w, h) of the original images in pixels
    outputs  labels             [B, K] int64
             boxes              [B, K, 4] float32, xyxy in those pixels
             scores             [B, K] float32 (sigmoid), sorted descending

with K = num_top_queries (300 by default). The custom ops are replaced by their export forms,
plain torch ops that every exporter translates:

- deformable attention: ``F.grid_sample`` per level (ONNX GridSample, opset >= 16), or with
  ``grid_sample=False`` a gather-based bilinear sampler (Gather, no GridSample node) for
  runtimes that lack or mis-compile GridSample. RT-DETRv2's options are the eager model's: per-
  level point counts, ``offset_scale`` and the ``num_points_scale`` buffer in the sampling
  locations, and ``cross_attn_method="discrete"`` as a nearest-cell gather in both forms (no
  GridSample node);
- top-K query selection and the detections' top-K: ``torch.topk`` (ONNX TopK, which orders equal
  values by the lower index, as the eager ops do);
- RepConv: a plain 3x3 conv with bias after :meth:`RTDETR.deploy` folded it.

Everything shape-dependent (anchors, position embeddings, per-level sizes) is computed in the
graph from the input's shape, so no size is baked in by tracing: one file serves every batch
size and every image size that is a multiple of 32 (and gives at least ``num_queries`` anchors:
128x128 or larger for 300 queries).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .model.common import inverse_sigmoid

__all__ = [
    "DeployModel",
    "ExportError",
    "export_onnx",
    "export_program",
    "export_aoti",
    "load_aoti",
    "deform_attn_grid_sample",
    "deform_attn_gather",
    "deform_attn_discrete",
    "DEFAULT_OPSET",
    "OPSETS",
    "EXPORTERS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
]

DEFAULT_OPSET = 17
OPSETS = tuple(range(16, 21))
EXPORTERS = ("dynamo", "torchscript")
# the TorchScript-based exporter is the default: it writes opsets 16-17 natively and exports in
# seconds; the dynamo exporter's translations start at opset 18 (its conversion down to 17 fails
# on this graph) and it takes minutes on a CPU. Both give the same detections (tests).
DEFAULT_EXPORTER = "torchscript"
DYNAMO_MIN_OPSET = 18
FORMATS = ("onnx",)
SIZE_MULTIPLE = 32
INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")
# the largest batch and image side (in units of 32 px) the dynamic dimensions declare
MAX_BATCH = 1024
MAX_SIDE32 = 256


class ExportError(ValueError):
    """A bad export request (size, opset, format, exporter); the message is one line."""


# ------------------------------------------------------------------------------ validation
def check_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) from an int or a pair; both positive multiples of 32."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) for s in size):
        raise ExportError(f"size must be (H, W) as two ints, got {size!r}")
    if not all(s >= SIZE_MULTIPLE and s % SIZE_MULTIPLE == 0 for s in size):
        raise ExportError(f"size {size[0]}x{size[1]} is not a multiple of {SIZE_MULTIPLE}: "
                          f"H and W must be positive multiples of {SIZE_MULTIPLE}")
    return size  # type: ignore[return-value]


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or opset not in OPSETS:
        raise ExportError(f"opset {opset!r} is not supported: choose {OPSETS[0]}-{OPSETS[-1]} "
                          f"(default {DEFAULT_OPSET})")
    return opset


def check_batch(batch: int) -> int:
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive int, got {batch!r}")
    return batch


def check_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    return exporter


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


# ------------------------------------------------------------------ export forms of the ops
def _split_levels(value: torch.Tensor, shapes: Sequence[Tuple]) -> List[torch.Tensor]:
    return list(value.split([h * w for h, w in shapes], dim=1))


def _points_by_level(sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     num_points_list: Optional[Sequence[int]]
                     ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per level: locations [B,Q,H,P_l,2] and weights [B,Q,H,P_l], from either layout of
    ``ops.ms_deform_attn``: [B,Q,H,L,P,2] / [B,Q,H,L,P] (one count for every level), or
    [B,Q,H,N,2] / [B,Q,H,N] with ``num_points_list`` (RT-DETRv2's per-level counts, level l
    owning num_points_list[l] consecutive points)."""
    if num_points_list is None:
        L = sampling_locations.shape[3]
        return ([sampling_locations[:, :, :, lvl] for lvl in range(L)],
                [attention_weights[:, :, :, lvl] for lvl in range(L)])
    counts = [int(p) for p in num_points_list]
    return (list(sampling_locations.split(counts, dim=3)),
            list(attention_weights.split(counts, dim=3)))


def deform_attn_grid_sample(value: torch.Tensor, shapes: Sequence[Tuple],
                            sampling_locations: torch.Tensor,
                            attention_weights: torch.Tensor,
                            num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Multi-scale deformable attention with one ``grid_sample`` per level (ONNX GridSample).

    The reference formulation with the level sizes ``shapes`` [(H_l, W_l)] taken from the
    feature maps' shapes (symbolic under export) instead of a tensor read on the host.
    value [B,S,H,D]; sampling_locations [B,Q,H,L,P,2] and attention_weights [B,Q,H,L,P], or
    [B,Q,H,N,2] and [B,Q,H,N] with ``num_points_list`` -> [B,Q,H*D]."""
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    locs, weights = _points_by_level(sampling_locations, attention_weights, num_points_list)
    sampled = []
    for v, (h, w), loc in zip(_split_levels(value, shapes), shapes, locs):
        v = v.permute(0, 2, 3, 1).reshape(B * H, D, h, w)
        g = (2 * loc - 1).transpose(1, 2).flatten(0, 1)  # [B*H, Q, P_l, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*H, D, Q, P_l]
    # [B, Q, H, N] -> [B*H, 1, Q, N], the points in the order of the sampled columns
    weights = torch.cat(weights, dim=-1).transpose(1, 2).reshape(B * H, 1, Q, -1)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # [B*H, D, Q]
    return out.view(B, H * D, Q).transpose(1, 2)


def deform_attn_gather(value: torch.Tensor, shapes: Sequence[Tuple],
                       sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor,
                       num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The same bilinear sampling (align_corners=False, zeros outside) written with gathers of
    the four corners: no GridSample node in an ONNX graph. Layouts as
    :func:`deform_attn_grid_sample`."""
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    locs, weights = _points_by_level(sampling_locations, attention_weights, num_points_list)
    out = None
    for v, (h, w), loc, aw in zip(_split_levels(value, shapes), shapes, locs, weights):
        # rows of one (batch, head) are contiguous: [B*H*h*w, D]
        v = v.permute(0, 2, 1, 3).reshape(-1, D)
        loc = loc.transpose(1, 2)  # [B, H, Q, P_l, 2]
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
        base = (torch.arange(B * H, device=value.device, dtype=torch.int64) * (h * w)).view(
            B, H, 1, 1)
        acc = None
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                cw = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
                valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                idx = torch.where(valid, base + yi * w + xi, torch.zeros_like(xi))
                corner = v.index_select(0, idx.reshape(-1)).view(B, H, Q, -1, D)
                term = corner * (cw * valid.to(cw.dtype)).unsqueeze(-1)
                acc = term if acc is None else acc + term
        aw = aw.transpose(1, 2).unsqueeze(-1)  # [B, H, Q, P_l, 1]
        lvl_out = (acc * aw).sum(3)  # [B, H, Q, D]
        out = lvl_out if out is None else out + lvl_out
    return out.permute(0, 2, 1, 3).reshape(B, Q, H * D)


def _discrete_cell(t: torch.Tensor, n) -> torch.Tensor:
    """clamp(floor(t*n + 0.5), 0, n-1) as int64, NaN -> 0 (``reference.discrete_cells``, whose
    ``clamp(0, n - 1)`` needs an int ``n``; here ``n`` may be a traced size)."""
    f = torch.floor(t * n + 0.5)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    return f.clamp(0, n - 1).to(torch.int64)


def deform_attn_discrete(value: torch.Tensor, shapes: Sequence[Tuple],
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                         num_points_list: Optional[Sequence[int]] = None) -> torch.Tensor:
    """RT-DETRv2's discrete (nearest-cell) sampling as gathers, the export form of
    ``ops.ms_deform_attn(..., method="discrete")`` whatever ``grid_sample`` says (there is no
    interpolation to hand to GridSample): on level l of H_l x W_l cells, location (x, y) reads
    the value row of cell ix = clamp(floor(x*W_l + 0.5), 0, W_l-1), iy = clamp(floor(y*H_l +
    0.5), 0, H_l-1), each axis clamped to its own extent, times its weight; a NaN coordinate
    reads cell 0 of its axis. Layouts as :func:`deform_attn_grid_sample`."""
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    locs, weights = _points_by_level(sampling_locations, attention_weights, num_points_list)
    out = None
    for v, (h, w), loc, aw in zip(_split_levels(value, shapes), shapes, locs, weights):
        v = v.permute(0, 2, 1, 3).reshape(-1, D)  # [B*H*h*w, D]
        loc = loc.transpose(1, 2)  # [B, H, Q, P_l, 2]
        ix, iy = _discrete_cell(loc[..., 0], w), _discrete_cell(loc[..., 1], h)
        base = (torch.arange(B * H, device=value.device, dtype=torch.int64) * (h * w)).view(
            B, H, 1, 1)
        cell = v.index_select(0, (base + iy * w + ix).reshape(-1)).view(B, H, Q, -1, D)
        lvl_out = (cell * aw.transpose(1, 2).unsqueeze(-1)).sum(3)  # [B, H, Q, D]
        out = lvl_out if out is None else out + lvl_out
    return out.permute(0, 2, 1, 3).reshape(B, Q, H * D)


def _topk_rows(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, descending (ONNX TopK: equal values by the lower index)."""
    return torch.topk(scores, k, dim=1, largest=True, sorted=True)


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


# ----------------------------------------------------------------------- the exported module
# The two shape-dependent tables below are the only copies of model code in this module, kept
# because the model's own functions bake the traced size into the graph:
# - encoder.sincos_position_embedding calls int(w), int(h): under the TorchScript exporter's
#   trace that records the traced size as a constant (a file traced at 160x128 then fails in
#   ONNX Runtime at 128x192), and under torch.export int() of a symbolic size specialises it
#   (the export stops on a guard on the image width);
# - RTDETRDecoder.generate_anchors divides by torch.tensor([w, h]), which the TorchScript
#   exporter's trace records as a constant too (the file then gives wrong detections at other
#   sizes; torch.export alone would handle it).
# Each computes the same values with the sizes kept as graph values; the tests compare the
# exported graphs with the eager model at sizes other than the traced one.
def _sincos_embedding(w, h, embed_dim: int, temperature: float, dtype, device) -> torch.Tensor:
    """encoder.sincos_position_embedding with the grid built in the graph (same layout)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32, device=device),
                                    torch.arange(h, dtype=torch.float32, device=device),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32, device=device)
                                   / pos_dim))
    out_w = grid_w.flatten()[:, None] @ omega[None]
    out_h = grid_h.flatten()[:, None] @ omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None].to(dtype)


def _anchors(shapes, grid_size: float, eps: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """decoder.generate_anchors with the grid built in the graph (same values)."""
    anchors = []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device),
                                indexing="ij")
        xy = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], -1)
        wh = torch.ones_like(xy) * grid_size * (2.0 ** lvl)
        anchors.append(torch.cat([xy, wh], -1).reshape(1, -1, 4))
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > eps) * (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid, anchors, torch.full_like(anchors, float("inf")))
    return anchors, valid


# the export form of each (cross_attn_method, grid_sample): discrete sampling is a gather in
# both forms (nothing to interpolate, so no GridSample node)
_METHODS = ("default", "discrete")
_DEFORM_ATTN_FORMS = {"GridSample": deform_attn_grid_sample,
                      "bilinear gathers": deform_attn_gather,
                      "discrete gathers": deform_attn_discrete}


def _attn_form(method: str, grid_sample: bool) -> str:
    if method == "discrete":
        return "discrete gathers"
    return "GridSample" if grid_sample else "bilinear gathers"


class DeployModel(nn.Module):
    """The exported graph: ``(images, orig_target_sizes) -> (labels, boxes, scores)``.

    Holds a deployed (RepConv-folded) eval-mode copy of ``model``; the caller's model is not
    changed. Mirrors ``RTDETR.forward`` in eval mode followed by the post-processor, with the
    shape-dependent pieces computed from the input's shape and the custom ops in their export
    forms (see the module docstring). ``grid_sample`` picks the bilinear deformable-attention
    form; a model with ``cross_attn_method="discrete"`` is exported as gathers either way
    (``deform_attn_form`` names the form used).
    """

    def __init__(self, model: nn.Module, grid_sample: bool = True):
        super().__init__()
        if model.training:
            warnings.warn("export: the model is in training mode; exporting its eval mode "
                          "(RepConv folded, the final decoder layer's detections)", stacklevel=3)
        model = copy.deepcopy(model).float().eval()
        model.deploy()
        # the exported graph keeps value_proj before the sampling (the export forms and their
        # runtimes were measured that way) and plain aten ops in the stem (no extension op)
        for m in model.modules():
            if hasattr(m, "project_after_sampling"):
                m.project_after_sampling = False
        if hasattr(model.backbone, "winograd_stem"):
            model.backbone.winograd_stem = False
        self.model = model
        self.grid_sample = bool(grid_sample)
        # one sampling method per model (every decoder layer is a copy of one layer)
        methods = {layer.cross_attn.method for layer in model.decoder.decoder.layers}
        unknown = sorted(methods - set(_METHODS))
        if unknown:
            raise ExportError(f"no export form for cross_attn_method {unknown[0]!r}: the "
                              f"exporters know {', '.join(_METHODS)}")
        self.deform_attn_form = ", ".join(sorted(_attn_form(m, self.grid_sample)
                                                 for m in methods))
        self.num_top_queries = int(model.postprocessor.num_top_queries)
        self.eval()

    def train(self, mode: bool = True) -> "DeployModel":
        # always eval: torch.onnx.export restores the top module's mode recursively afterwards,
        # which would otherwise put the batch norms into training mode
        return super().train(False)

    # the encoder: HybridEncoder.forward with the position embedding built in the graph
    def _encode(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        enc = self.model.encoder
        proj = [enc.input_proj[i](f) for i, f in enumerate(feats)]
        if enc.num_encoder_layers > 0:
            for i, idx in enumerate(enc.use_encoder_idx):
                h, w = proj[idx].shape[2:]
                src = proj[idx].flatten(2).permute(0, 2, 1)
                pos = _sincos_embedding(w, h, enc.hidden_dim, enc.pe_temperature, src.dtype,
                                        src.device)
                memory = enc.encoder[i](src, pos)
                proj[idx] = memory.permute(0, 2, 1).reshape(-1, enc.hidden_dim, h, w)
        n = len(enc.in_channels)
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            high = enc.lateral_convs[n - 1 - idx](inner[0])
            inner[0] = high
            low = proj[idx - 1]
            up = F.interpolate(high, size=low.shape[-2:], mode="nearest")
            inner.insert(0, enc.fpn_blocks[n - 1 - idx](torch.cat([up, low], dim=1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            down = enc.downsample_convs[idx](outs[-1])
            outs.append(enc.pan_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return outs

    def _deform_attn(self, attn, query, reference_points, value, shapes):
        """MSDeformableAttention.forward (eval, box reference points) with the export form of
        the sampling: the module's own location arithmetic (v1's ``offsets / P * wh * 0.5``
        where the module keeps it, else v2's ``offsets * num_points_scale * wh *
        offset_scale``), its per-level point counts and its sampling method."""
        B, Q = query.shape[:2]
        H, N = attn.num_heads, sum(attn.num_points_list)
        value = attn.value_proj(value).reshape(B, value.shape[1], H, attn.head_dim)
        offsets = attn.sampling_offsets(query).reshape(B, Q, H, N, 2)
        weights = F.softmax(attn.attention_weights(query).reshape(B, Q, H, N), dim=-1)
        xy, wh = reference_points[:, :, None, :, :2], reference_points[:, :, None, :, 2:]
        if attn._v1_math:
            locations = xy + offsets / attn.num_points * wh * 0.5
        else:
            scale = attn.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
            locations = xy + offsets * scale * wh * attn.offset_scale
        fn = _DEFORM_ATTN_FORMS[_attn_form(attn.method, self.grid_sample)]
        out = fn(value, shapes, locations, weights, num_points_list=attn.num_points_list)
        return attn.output_proj(out)

    def _decoder_layer(self, layer, tgt, reference_points, memory, shapes, query_pos):
        q = k = tgt + query_pos
        attn, _ = layer.self_attn(q, k, value=tgt, need_weights=False)
        tgt = layer.norm1(tgt + attn)
        cross = self._deform_attn(layer.cross_attn, tgt + query_pos, reference_points, memory,
                                  shapes)
        tgt = layer.norm2(tgt + cross)
        ffn = layer.linear2(layer.activation(layer.linear1(tgt)))
        return layer.norm3(tgt + ffn)

    def _decode(self, feats: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """RTDETRDecoder.forward in eval mode -> (pred_logits [B,Q,C], pred_boxes [B,Q,4])."""
        dec = self.model.decoder
        proj = [dec.input_proj[i](f) for i, f in enumerate(feats)]
        for i in range(len(proj), dec.num_levels):
            proj.append(dec.input_proj[i](feats[-1] if i == len(feats) else proj[-1]))
        shapes = [(p.shape[2], p.shape[3]) for p in proj]
        memory = torch.cat([p.flatten(2).permute(0, 2, 1) for p in proj], dim=1)
        B = memory.shape[0]

        anchors, valid = _anchors(shapes, 0.05, dec.eps, memory.device)
        # the encoder heads see the memory masked to valid anchors, the decoder layers the whole
        # memory (as the official model does)
        output_memory = dec.enc_output(valid.to(memory.dtype) * memory)
        enc_class = dec.enc_score_head(output_memory)
        enc_coord_unact = dec.enc_bbox_head(output_memory) + anchors
        _, idx = _topk_rows(enc_class.amax(-1), dec.num_queries)
        ref_unact = _gather_rows(enc_coord_unact, idx)
        if dec.learnt_init_query:
            target = dec.tgt_embed.weight.unsqueeze(0).tile([B, 1, 1])
        else:
            target = _gather_rows(output_memory, idx)

        layers = dec.decoder
        output = target
        ref = torch.sigmoid(ref_unact)
        for i, layer in enumerate(layers.layers):
            query_pos = dec.query_pos_head(ref)
            output = self._decoder_layer(layer, output, ref.unsqueeze(2), memory, shapes,
                                         query_pos)
            inter_ref = torch.sigmoid(dec.dec_bbox_head[i](output) + inverse_sigmoid(ref))
            if i == layers.eval_idx:
                return dec.dec_score_head[i](output), inter_ref
            ref = inter_ref
        raise RuntimeError(f"eval_idx {layers.eval_idx} is past the decoder's "
                           f"{len(layers.layers)} layers")

    def _postprocess(self, logits, boxes, orig_target_sizes):
        """The official post-processor: top-K (query, class) pairs by sigmoid score."""
        C = logits.shape[-1]
        k = min(self.num_top_queries, logits.shape[1] * C)
        scores, index = _topk_rows(torch.sigmoid(logits).flatten(1), k)
        labels = index % C
        query = index // C
        cx, cy, w, h = _gather_rows(boxes, query).unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        scale = orig_target_sizes.to(xyxy.dtype).repeat(1, 2).unsqueeze(1)  # (w, h, w, h)
        return labels, xyxy * scale, scores

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # RepVggBlocks call ops.rep_conv: the reference is the plain conv every exporter knows
        with ops.backend("reference"):
            feats = self._encode(self.model.backbone(images))
        logits, boxes = self._decode(feats)
        return self._postprocess(logits, boxes, orig_target_sizes)


# ------------------------------------------------------------------------------- helpers
def example_inputs(size: Tuple[int, int], batch: int, device="cpu"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random images [B,3,H,W] in [0,1] and their (w, h) sizes, for tracing and checks."""
    h, w = size
    images = torch.rand(batch, 3, h, w, device=device)
    sizes = torch.tensor([[w, h]] * batch, dtype=torch.int64, device=device)
    return images, sizes


def _dynamic_shapes(dynamic_size: bool = True):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    image = {0: batch}
    if dynamic_size:
        image[2] = SIZE_MULTIPLE * Dim("height32", min=1, max=MAX_SIDE32)
        image[3] = SIZE_MULTIPLE * Dim("width32", min=1, max=MAX_SIDE32)
    return {"images": image, "orig_target_sizes": {0: batch}}


def _deploy_module(model: nn.Module, grid_sample: bool) -> DeployModel:
    if isinstance(model, DeployModel):
        if model.grid_sample != grid_sample:
            model = DeployModel(model.model, grid_sample)
        return model
    return DeployModel(model, grid_sample)


# ---------------------------------------------------------------------------------- ONNX
def export_onnx(model: nn.Module, path: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET,
                size: Union[int, Sequence[int]] = (640, 640), batch: int = 1,
                grid_sample: bool = True, exporter: str = DEFAULT_EXPORTER,
                verify: bool = True, verbose: bool = False) -> Dict:
    """Write ``model`` as ONE self-contained ONNX file with dynamic batch and image size.

    ``size`` (H, W) and ``batch`` are the example input the graph is traced with, and checked
    at when ``verify`` (ONNX Runtime against PyTorch, when onnxruntime is installed); the file
    serves every batch and every H, W multiple of 32. ``grid_sample=False`` writes the
    deformable attention as gathers (no GridSample node). ``exporter``: ``"torchscript"``
    (default, the tracing exporter, opsets 16-20) or ``"dynamo"`` (torch.export-based, opsets
    18-20). Returns a summary dict (with the check's differences when ``verify``).
    """
    opset = check_opset(opset)
    size = check_size(size)
    batch = check_batch(batch)
    exporter = check_exporter(exporter)
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer, got "
                          f"{opset}: use --opset {DYNAMO_MIN_OPSET}-{OPSETS[-1]} or the "
                          "torchscript exporter")
    path = os.fspath(path)
    module = _deploy_module(model, grid_sample)
    images, sizes = example_inputs(size, batch)
    if exporter == "dynamo":
        _export_onnx_dynamo(module, (images, sizes), path, opset, verbose)
    else:
        _export_onnx_torchscript(module, (images, sizes), path, opset, verbose)
    summary = {"path": path, "opset": opset, "exporter": exporter, "grid_sample": grid_sample,
               "deform_attn": module.deform_attn_form, "size": size, "batch": batch}
    if verify:
        summary.update(verify_onnx(path, module, size=size, batch=batch))
        if summary.get("max_score_diff", 0.0) > 1e-3 or summary.get("label_agreement", 1) < 0.9:
            warnings.warn(f"export: {path} differs from PyTorch at batch {batch}, "
                          f"{size[0]}x{size[1]}: max score diff {summary['max_score_diff']:.2e}, "
                          f"labels agree {100 * summary['label_agreement']:.0f}%", stacklevel=2)
    return summary


def _export_onnx_dynamo(module, args, path, opset, verbose):
    import contextlib
    import io

    # the translation prints progress lines on stdout; keep them unless asked
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), sink, warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=_dynamic_shapes(), external_data=False,
                                    optimize=True, verbose=verbose)
        program.save(path, external_data=False)


def _export_onnx_torchscript(module, args, path, opset, verbose):
    with torch.no_grad(), warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "orig_target_sizes": {0: "batch"},
                                        "labels": {0: "batch"}, "boxes": {0: "batch"},
                                        "scores": {0: "batch"}},
                          do_constant_folding=True, verbose=verbose)


def run_onnx(path_or_session, images: torch.Tensor, orig_target_sizes: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an exported file (or an onnxruntime session) on the CPU: (labels, boxes, scores)."""
    import onnxruntime as ort

    sess = path_or_session
    if not isinstance(sess, ort.InferenceSession):
        sess = ort.InferenceSession(os.fspath(sess), providers=["CPUExecutionProvider"])
    out = sess.run(list(OUTPUT_NAMES), {"images": images.cpu().numpy(),
                                        "orig_target_sizes": orig_target_sizes.cpu().numpy()})
    return tuple(torch.from_numpy(o) for o in out)  # type: ignore[return-value]


def compare_detections(ours, ref, top: Optional[int] = None) -> Dict[str, float]:
    """Max differences of (labels, boxes, scores) against a reference: scores everywhere, boxes
    and labels where both runs ranked the same (query, class) pair (near-tied scores may swap)."""
    labels, boxes, scores = ours
    rlabels, rboxes, rscores = ref
    if top is not None:
        labels, boxes, scores = labels[:, :top], boxes[:, :top], scores[:, :top]
        rlabels, rboxes, rscores = rlabels[:, :top], rboxes[:, :top], rscores[:, :top]
    same = (labels == rlabels) & ((boxes - rboxes).abs().amax(-1) < 1.0)
    box_diff = (boxes - rboxes).abs().amax(-1)[same]
    return {"max_score_diff": float((scores.float() - rscores.float()).abs().max()),
            "max_box_diff_px": float(box_diff.max()) if box_diff.numel() else 0.0,
            "label_agreement": float((labels == rlabels).float().mean())}


def verify_onnx(path, module: DeployModel, size=(640, 640), batch: int = 1) -> Dict[str, float]:
    """ONNX Runtime against the PyTorch eager model on random images; {} without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    images, sizes = example_inputs(check_size(size), batch)
    with torch.no_grad():
        ref = module(images, sizes)
    return compare_detections(run_onnx(path, images, sizes), ref)


# ------------------------------------------------------------------ torch.export, AOTInductor
def export_program(model: nn.Module, *, size: Union[int, Sequence[int]] = (640, 640),
                   batch: int = 2, grid_sample: bool = True, dynamic_size: bool = True
                   ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of the deploy module: dynamic batch (and, with
    ``dynamic_size``, dynamic H and W in multiples of 32)."""
    size = check_size(size)
    batch = check_batch(batch)
    module = _deploy_module(model, grid_sample)
    with torch.no_grad():
        return torch.export.export(module, example_inputs(size, batch),
                                   dynamic_shapes=_dynamic_shapes(dynamic_size))


def export_aoti(model: nn.Module, path: Union[str, os.PathLike], *,
                size: Union[int, Sequence[int]] = (640, 640), batch: int = 2,
                grid_sample: bool = True, dynamic_size: bool = True) -> str:
    """Compile with AOTInductor into a ``.pt2`` package that runs without this package's Python
    code: ``torch._inductor.aoti_load_package(path)(images, orig_target_sizes)``."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ExportError(f"an AOTInductor package path must end in .pt2, got {path!r}")
    program = export_program(model, size=size, batch=batch, grid_sample=grid_sample,
                             dynamic_size=dynamic_size)
    return torch._inductor.aoti_compile_and_package(program, package_path=path)


def load_aoti(path: Union[str, os.PathLike]):
    """Load a package written by :func:`export_aoti`; call it as the model."""
    return torch._inductor.aoti_load_package(os.fspath(path))
