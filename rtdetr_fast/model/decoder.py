"""RT-DETR decoder: input projection, anchors, encoder heads, top-K query selection, deformable
decoder layers with iterative box refinement, per-layer heads."""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from .. import ops
from ..config import DecoderConfig
from .box_ops import inverse_sigmoid
from .layers import MLP, bias_init_with_prob, get_activation
from .shapes import ShapeCache, feature_size
from .position import generate_anchors, tracing
from .query_selection import select_queries


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention with box reference points (cx, cy, w, h).

    ``num_points``: one count for every level, or one per level (RT-DETRv2). ``version`` "v2"
    scales each point's offset by 1/P_l through the ``num_points_scale`` buffer (in the state
    dict, as the official v2 model has it); "v1" keeps the v1 arithmetic where it applies.
    ``method`` "discrete" samples the nearest cell and freezes the sampling offsets (their
    gradient would be zero through the rounding), as the official v2 does.

    ``project_after_sampling`` (set by ``RTDETR.deploy()`` on the CPU; eval mode only): the
    same function with ``value_proj`` applied after the sampling instead of to every memory
    token. Sampling and the attention sum are linear, so each head's output is
    ``W_h (sum_p a_p sample_p(memory)) + b_h m`` with ``m = sum_p a_p`` times the bilinear
    weight that falls inside the image (:func:`sampled_mass`): one [S, C] x [C, C] GEMM per
    layer (S = 8400 tokens at 640x640) becomes a [Q*H, C] x [C, C/H] one, for sampling C
    channels per head instead of C/H. Only the rounding differs."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: Union[int, Sequence[int]] = 4, version: str = "v1",
                 method: str = "default", offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if isinstance(num_points, int):
            points = [num_points] * num_levels
        else:
            points = [int(p) for p in num_points]
            if len(points) != num_levels:
                raise ValueError(f"num_points must be an int or one count per level "
                                 f"({num_levels} levels), got {tuple(points)}")
        if method not in ("default", "discrete"):
            raise ValueError(f"method must be one of default, discrete, got {method!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.num_points_list = points
        self.method, self.offset_scale = method, offset_scale
        # the v1 arithmetic (offsets / P * wh * 0.5) where it is the v1 model
        self._v1_math = (version == "v1" and isinstance(num_points, int) and offset_scale == 0.5)
        self.register_buffer("num_points_scale",
                             torch.tensor([1 / n for n in points for _ in range(n)],
                                          dtype=torch.float32),
                             persistent=version == "v2")
        self.total_points = num_heads * sum(points)
        self.project_after_sampling = False
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()
        if method == "discrete":
            for p in self.sampling_offsets.parameters():
                p.requires_grad = False

    def _reset_parameters(self):
        init.constant_(self.sampling_offsets.weight, 0)
        # initial offsets fan out from the reference point: one direction per head, growing
        # with the point index within each level
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points_list), 1])
        grid *= torch.cat([torch.arange(1, n + 1, dtype=torch.float32)
                           for n in self.num_points_list]).reshape(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes, level_start_index) -> torch.Tensor:
        """query [B,Q,C]; reference_points [B,Q,1,4] (cx, cy, w, h in [0,1]); value [B,S,C];
        spatial_shapes L pairs (H_l, W_l) and level_start_index L ints (host ints: an int64
        tensor also works, at the cost of a host read per call)."""
        B, Q = query.shape[:2]
        H, L = self.num_heads, self.num_levels
        N = sum(self.num_points_list)
        memory = value
        late = self.project_after_sampling and not self.training
        if not late:
            value = self.value_proj(value).reshape(B, value.shape[1], H, self.head_dim)
        offsets = self.sampling_offsets(query).reshape(B, Q, H, N, 2)
        weights = F.softmax(self.attention_weights(query).reshape(B, Q, H, N), dim=-1)
        if self._v1_math:
            P = self.num_points
            offsets = offsets.reshape(B, Q, H, L, P, 2)
            weights = weights.reshape(B, Q, H, L, P)
            if reference_points.shape[-1] == 2:
                if isinstance(spatial_shapes, torch.Tensor):
                    normalizer = spatial_shapes.flip([1]).to(offsets.device, offsets.dtype)
                else:
                    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes],
                                              dtype=offsets.dtype, device=offsets.device)
                normalizer = normalizer.reshape(1, 1, 1, L, 1, 2)
                locations = (reference_points.reshape(B, Q, 1, L, 1, 2) + offsets / normalizer)
            elif reference_points.shape[-1] == 4:
                # offsets are in units of the box's half size, spread over the points
                locations = (reference_points[:, :, None, :, None, :2]
                             + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
            else:
                raise ValueError(f"reference_points must end in 2 or 4, got "
                                 f"{reference_points.shape}")
            return self.output_proj(self._attend(memory if late else value, late, spatial_shapes,
                                                 level_start_index, locations, weights, None))
        if reference_points.shape[-1] != 4:
            raise ValueError(f"reference_points must be boxes [B, Q, 1, 4] with per-level point "
                             f"counts, got {list(reference_points.shape)}")
        # v2: each point's offset in units of the box size times offset_scale / P_l
        scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
        locations = (reference_points[:, :, None, :, :2]
                     + offsets * scale * reference_points[:, :, None, :, 2:] * self.offset_scale)
        return self.output_proj(self._attend(memory if late else value, late, spatial_shapes,
                                             level_start_index, locations, weights,
                                             self.num_points_list))

    def _attend(self, value, late, spatial_shapes, level_start_index, locations, weights,
                num_points_list):
        """The deformable attention of projected heads ``value`` [B,S,H,D], or with ``late`` of
        the unprojected memory [B,S,C] (value_proj after the sampling)."""
        if late:
            return self._sample_then_project(value, spatial_shapes, level_start_index, locations,
                                             weights, num_points_list)
        kw = {} if self.method == "default" else {"method": self.method}
        if num_points_list is not None:
            kw["num_points_list"] = num_points_list
        return ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                                  **kw)

    def _sample_then_project(self, memory, spatial_shapes, level_start_index, locations, weights,
                             num_points_list):
        """value_proj after the sampling (see the class docstring): every (query, head) pair is
        a one-head query over the unprojected memory [B, S, 1, C]."""
        B, S, C = memory.shape
        Q, H, D = locations.shape[1], self.num_heads, self.head_dim
        loc = locations.reshape(B, Q * H, 1, *locations.shape[3:])
        w = weights.reshape(B, Q * H, 1, *weights.shape[3:])
        sampled = self._attend(memory.reshape(B, S, 1, C), False, spatial_shapes,
                               level_start_index, loc, w, num_points_list).reshape(B, Q, H, C)
        out = torch.einsum("bqhc,hdc->bqhd", sampled, self.value_proj.weight.reshape(H, D, C))
        if self.value_proj.bias is not None:
            mass = sampled_mass(spatial_shapes, locations, weights, num_points_list, self.method)
            out = out + mass.unsqueeze(-1) * self.value_proj.bias.reshape(H, D)
        return out.reshape(B, Q, H * D)


def sampled_mass(spatial_shapes, sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor, num_points_list=None,
                 method: str = "default") -> torch.Tensor:
    """What ``ops.ms_deform_attn`` returns for a value of ones, without sampling: per (batch,
    query, head), the sum over points of the attention weight times the bilinear weight of the
    sample's corners that lie inside the level (zero padding, align_corners=False; a NaN or
    infinite location weighs nothing). Discrete sampling always reads a cell: the plain sum of
    the weights. Locations [B,Q,H,L,P,2] and weights [B,Q,H,L,P], or with ``num_points_list``
    [B,Q,H,N,2] and [B,Q,H,N]; returns [B,Q,H]."""
    if method == "discrete":
        return attention_weights.flatten(3).sum(-1)
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if num_points_list is None:
        locs, weights = sampling_locations.unbind(3), attention_weights.unbind(3)
    else:
        locs = sampling_locations.split(list(num_points_list), dim=3)
        weights = attention_weights.split(list(num_points_list), dim=3)

    def axis(t, n):
        # the pixel coordinate p = t*n - 0.5 lies between cells x0 and x0 + 1: the weight of
        # those two that are inside [0, n-1] (none for a NaN or infinite p: every compare
        # is false)
        p = t * n - 0.5
        x0 = torch.floor(p)
        frac = p - x0
        return (torch.where((x0 >= 0) & (x0 <= n - 1), 1 - frac, 0.0)
                + torch.where((x0 >= -1) & (x0 <= n - 2), frac, 0.0))

    mass = None
    for (h, w), loc, a in zip(shapes, locs, weights):
        term = (axis(loc[..., 0], w) * axis(loc[..., 1], h) * a).sum(-1)
        mass = term if mass is None else mass + term
    return mass


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024,
                 dropout: float = 0.0, activation: str = "relu", n_levels: int = 4,
                 n_points: Union[int, Sequence[int]] = 4, version: str = "v1",
                 cross_attn_method: str = "default", offset_scale: float = 0.5):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, version,
                                                cross_attn_method, offset_scale)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        if version == "v2":
            init.xavier_uniform_(self.linear1.weight)
            init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt, reference_points, memory, spatial_shapes, level_start_index,
                attn_mask=None, query_pos_embed=None):
        q = k = tgt + query_pos_embed
        attn, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos_embed, reference_points, memory, spatial_shapes,
                                level_start_index)
        tgt = self.norm2(tgt + self.dropout2(cross))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class TransformerDecoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def forward(self, tgt, ref_points_unact, memory, spatial_shapes, level_start_index,
                bbox_head, score_head, query_pos_head, attn_mask=None):
        output = tgt
        out_boxes, out_logits = [], []
        ref_detach = torch.sigmoid(ref_points_unact)
        ref_points = ref_detach
        for i, layer in enumerate(self.layers):
            query_pos = query_pos_head(ref_detach)
            output = layer(output, ref_detach.unsqueeze(2), memory, spatial_shapes,
                           level_start_index, attn_mask, query_pos)
            inter_ref = torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_detach))
            if self.training:
                out_logits.append(score_head[i](output))
                if i == 0:
                    out_boxes.append(inter_ref)
                else:
                    # the box loss of layer i reaches layer i-1 through the undetached reference
                    out_boxes.append(torch.sigmoid(bbox_head[i](output)
                                                   + inverse_sigmoid(ref_points)))
            elif i == self.eval_idx:
                out_logits.append(score_head[i](output))
                out_boxes.append(inter_ref)
                break
            ref_points = inter_ref
            ref_detach = inter_ref.detach() if self.training else inter_ref
        return torch.stack(out_boxes), torch.stack(out_logits)


class RTDETRDecoder(nn.Module):
    """The official ``RTDETRTransformer`` (v1) or ``RTDETRTransformerv2`` (``cfg.version``),
    parameter for parameter."""

    def __init__(self, cfg: DecoderConfig, num_classes: int, feat_channels: List[int],
                 feat_strides: List[int], eval_spatial_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        if len(feat_channels) > cfg.num_levels:
            raise ValueError("num_levels must be >= the number of feature maps")
        self.cfg = cfg
        self.hidden_dim = cfg.hidden_dim
        self.nhead = cfg.nhead
        self.feat_strides = list(feat_strides)
        for _ in range(cfg.num_levels - len(feat_strides)):
            self.feat_strides.append(self.feat_strides[-1] * 2)
        self.num_levels = cfg.num_levels
        self.num_classes = num_classes
        self.num_queries = cfg.num_queries
        self.eps = cfg.eps
        self.num_decoder_layers = cfg.num_decoder_layers
        self.eval_spatial_size = eval_spatial_size
        self.aux_loss = cfg.aux_loss
        self.num_denoising = cfg.num_denoising
        self.label_noise_ratio = cfg.label_noise_ratio
        self.box_noise_scale = cfg.box_noise_scale
        self.version = cfg.version
        self.query_select_method = cfg.query_select_method

        self._build_input_proj_layer(list(feat_channels))
        layer = TransformerDecoderLayer(cfg.hidden_dim, cfg.nhead, cfg.dim_feedforward, cfg.dropout,
                                        cfg.activation, cfg.num_levels, cfg.num_points,
                                        cfg.version, cfg.cross_attn_method, cfg.offset_scale)
        self.decoder = TransformerDecoder(layer, cfg.num_decoder_layers, cfg.eval_idx)
        if cfg.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, cfg.hidden_dim,
                                                      padding_idx=num_classes)
        self.learnt_init_query = cfg.learnt_init_query
        # set by RTDETR.deploy(): in eval mode, the encoder's box head runs on the selected rows
        self.select_before_box_head = False
        if cfg.learnt_init_query:
            self.tgt_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.query_pos_head = MLP(4, 2 * cfg.hidden_dim, cfg.hidden_dim, num_layers=2)
        if cfg.version == "v2":
            self.enc_output = nn.Sequential(OrderedDict([
                ("proj", nn.Linear(cfg.hidden_dim, cfg.hidden_dim)),
                ("norm", nn.LayerNorm(cfg.hidden_dim))]))
        else:
            self.enc_output = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
                                            nn.LayerNorm(cfg.hidden_dim))
        # class-agnostic query selection ranks the anchors by one objectness score
        self.enc_score_head = nn.Linear(cfg.hidden_dim, self._enc_classes(num_classes))
        self.enc_bbox_head = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(cfg.hidden_dim, num_classes)
                                            for _ in range(cfg.num_decoder_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(cfg.hidden_dim, cfg.hidden_dim, 4, num_layers=3)
                                           for _ in range(cfg.num_decoder_layers))
        # anchors by (spatial shapes, device, dtype), made on the device on first use and kept
        # in a bounded LRU in which the eval size's never expire
        pinned = ()
        if eval_spatial_size is not None:
            pinned = (tuple(feature_size(eval_spatial_size, s) for s in self.feat_strides),)
        self._anchor_cache = ShapeCache(maxsize=8, pinned=pinned)
        if cfg.version == "v2" and eval_spatial_size is not None:
            # the official v2 model keeps its eval-size anchors in the state dict; the forward
            # takes them from the cache (same values, any input size), these are the layout
            anchors, valid = self.generate_anchors(pinned[0])
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid)
        self._reset_parameters()

    def _reset_parameters(self):
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls_, reg_ in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls_.bias, bias)
            init.constant_(reg_.layers[-1].weight, 0)
            init.constant_(reg_.layers[-1].bias, 0)
        init.xavier_uniform_(self.enc_output[0].weight)
        if self.learnt_init_query:
            init.xavier_uniform_(self.tgt_embed.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        if self.version == "v2":
            for proj in self.input_proj:
                init.xavier_uniform_(proj.conv.weight)

    def _enc_classes(self, num_classes: int) -> int:
        return 1 if self.query_select_method == "agnostic" else num_classes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # anchors and valid_mask follow from eval_spatial_size: a file made for another size
        # (or without them) loads, and the model keeps the ones for its own size
        derived = [prefix + n for n in ("anchors", "valid_mask") if n in self._buffers]
        for k in derived:
            state_dict.pop(k, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for k in derived:
            if k in missing_keys:
                missing_keys.remove(k)

    def reset_class_heads(self, num_classes: int) -> None:
        """Re-initialise every class-dependent layer for ``num_classes`` (fine-tuning)."""
        ref = self.enc_score_head.weight
        kw = dict(device=ref.device, dtype=ref.dtype)
        bias = bias_init_with_prob(0.01)
        self.num_classes = num_classes
        self.enc_score_head = nn.Linear(self.hidden_dim, self._enc_classes(num_classes), **kw)
        init.constant_(self.enc_score_head.bias, bias)
        self.dec_score_head = nn.ModuleList(nn.Linear(self.hidden_dim, num_classes, **kw)
                                            for _ in range(self.num_decoder_layers))
        for cls_ in self.dec_score_head:
            init.constant_(cls_.bias, bias)
        if self.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, self.hidden_dim,
                                                      padding_idx=num_classes, **kw)

    def _build_input_proj_layer(self, feat_channels: List[int]):
        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, self.hidden_dim, 1, bias=False)),
                ("norm", nn.BatchNorm2d(self.hidden_dim))])))
        c = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, self.hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", nn.BatchNorm2d(self.hidden_dim))])))
            c = self.hidden_dim

    def _get_encoder_input(self, feats: List[torch.Tensor]):
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        for i in range(len(proj), self.num_levels):
            proj.append(self.input_proj[i](feats[-1] if i == len(feats) else proj[-1]))
        shapes = [tuple(p.shape[2:]) for p in proj]
        flat = torch.cat([p.flatten(2).permute(0, 2, 1) for p in proj], dim=1)
        starts, total = [], 0
        for h, w in shapes:
            starts.append(total)
            total += h * w
        # host ints all the way to the op: no tensor made, copied or read back per forward
        return flat, shapes, shapes, starts

    def generate_anchors(self, shapes, grid_size: float = 0.05, dtype=torch.float32,
                         device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """Unactivated anchors [1,S,4] (inf where invalid) and the valid mask [1,S,1], made on
        ``device`` (:func:`.position.generate_anchors` with this decoder's eps)."""
        return generate_anchors(shapes, self.eps, grid_size, dtype=dtype, device=device)

    def anchors_for(self, shapes, device, dtype=torch.float32
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached :meth:`generate_anchors` (computed in float32, as the official model does,
        then cast to ``dtype``); the valid mask comes in ``dtype`` too (1/0). Computed in the
        graph, from the traced sizes, when an exporter traces the forward."""
        def make():
            anchors, valid = self.generate_anchors(shapes, device=device)
            return anchors.to(dtype), valid.to(dtype)

        if tracing():
            return make()
        shapes = tuple(tuple(int(s) for s in hw) for hw in shapes)
        return self._anchor_cache.get(shapes, device, dtype, make)

    def _get_decoder_input(self, memory, shapes, denoising_class=None, denoising_bbox_unact=None):
        B, N = memory.shape[:2]
        # (an exported graph has no room for the check: its sizes are symbolic)
        if not tracing() and N < self.num_queries:
            raise ValueError(f"the input gives N={N} anchors over feature maps {list(shapes)}, "
                             f"fewer than num_queries={self.num_queries}: use a larger image "
                             "or a smaller num_queries")
        # anchors stay float32 for half-precision memory (the official model's sum)
        anchors, valid = self.anchors_for(shapes, memory.device,
                                          torch.promote_types(memory.dtype, torch.float32))
        # deploy(): in eval mode the encoder's box head runs on the K selected rows only
        ref_unact, enc_topk_logits, selected = select_queries(
            memory, anchors, valid, self.enc_output, self.enc_score_head, self.enc_bbox_head,
            self.num_queries,
            box_head_on_selected=self.select_before_box_head and not self.training,
            gather_memory=not self.learnt_init_query)
        enc_topk_bboxes = torch.sigmoid(ref_unact)
        if denoising_bbox_unact is not None:
            ref_unact = torch.cat([denoising_bbox_unact, ref_unact], 1)
        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).tile([B, 1, 1])
        else:
            target = selected
        if denoising_class is not None:
            target = torch.cat([denoising_class, target], 1)
        return target, ref_unact.detach(), enc_topk_bboxes, enc_topk_logits

    def forward(self, feats: List[torch.Tensor], denoising=None) -> Dict:
        """``denoising``: (class embeddings, unactivated boxes, attention mask, meta) or None."""
        memory, shapes, spatial_shapes, level_start_index = self._get_encoder_input(feats)
        if denoising is not None:
            dn_class, dn_bbox_unact, attn_mask, dn_meta = denoising
        else:
            dn_class = dn_bbox_unact = attn_mask = dn_meta = None
        target, ref_unact, enc_topk_bboxes, enc_topk_logits = self._get_decoder_input(
            memory, shapes, dn_class, dn_bbox_unact)
        out_bboxes, out_logits = self.decoder(target, ref_unact, memory, spatial_shapes,
                                              level_start_index, self.dec_bbox_head,
                                              self.dec_score_head, self.query_pos_head,
                                              attn_mask=attn_mask)
        if self.training and dn_meta is not None:
            dn_out_bboxes, out_bboxes = torch.split(out_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)
        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(out_logits[:-1], out_bboxes[:-1])]
            out["enc_outputs"] = {"pred_logits": enc_topk_logits, "pred_boxes": enc_topk_bboxes}
            if self.query_select_method == "agnostic":
                out["enc_meta"] = {"class_agnostic": True}
            if dn_meta is not None:
                out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                         for a, b in zip(dn_out_logits, dn_out_bboxes)]
                out["dn_meta"] = dn_meta
        return out
