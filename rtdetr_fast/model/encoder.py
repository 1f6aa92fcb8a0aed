"""HybridEncoder: AIFI (intra-scale attention on S5) + CCFF (cross-scale fusion, FPN then PAN)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import EncoderConfig
from .layers import ConvNormLayer, get_activation, nearest_upsample_to
from .norms import bn_scale_shift
from .shapes import ShapeCache, feature_size
# sincos_position_embedding is also imported from here
from .position import sincos_position_embedding, tracing  # noqa: F401


class RepVggBlock(nn.Module):
    """act(BN(conv3x3(x)) + BN(conv1x1(x))); after :meth:`fold`, act(conv3x3(x) + bias)."""

    def __init__(self, ch_in: int, ch_out: int, act: str = "relu"):
        super().__init__()
        self.ch_in, self.ch_out = ch_in, ch_out
        self.act_name = act
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    @property
    def deployed(self) -> bool:
        return hasattr(self, "conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return ops.rep_conv(x, self.conv.weight, self.conv.bias, self.act_name)
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias of the folded block (eval-mode BatchNorm statistics)."""
        k3, b3 = self._fuse(self.conv1)
        k1, b1 = self._fuse(self.conv2)
        return k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1

    @staticmethod
    def _fuse(branch: ConvNormLayer) -> Tuple[torch.Tensor, torch.Tensor]:
        # fold in float64, the BatchNorm's rsqrt(var + eps) included, so the folded block matches
        # the two-branch one to one final rounding (BatchNorm2d and FrozenBatchNorm2d alike)
        norm = branch.norm
        if all(getattr(norm, a, None) is not None
               for a in ("weight", "bias", "running_mean", "running_var", "eps")):
            scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
            shift = norm.bias.double() - norm.running_mean.double() * scale
        else:
            scale, shift = (t.double() for t in bn_scale_shift(norm))
        kernel = branch.conv.weight.double() * scale.view(-1, 1, 1, 1)
        if branch.conv.bias is not None:
            shift = shift + branch.conv.bias.double() * scale
        return kernel, shift

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the two branches by one 3x3 conv with bias (idempotent)."""
        if self.deployed:
            return
        kernel, bias = self.equivalent_kernel_bias()
        ref = self.conv1.conv.weight
        conv = nn.Conv2d(self.ch_in, self.ch_out, 3, 1, padding=1, bias=True,
                         device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        # channels_last ([C_out][3][3][C_in] in memory) is the layout the rep_conv kernels read:
        # stored so, the weight is never repacked per call. Values, keys and shapes are unchanged
        # (save_pretrained writes contiguous copies; load_state_dict keeps this layout).
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self.conv = conv
        del self.conv1
        del self.conv2


class CSPRepLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3,
                 expansion: float = 1.0, bias: bool = False, act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act)
                                           for _ in range(num_blocks)])
        if hidden != out_channels:
            self.conv3 = ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding is added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        q = k = src + pos_embed
        attn, _ = self.self_attn(q, k, value=src, need_weights=False)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class AIFI(nn.Module):
    """Attention-based Intra-scale Feature Interaction (the paper's Sec. 4.2, Fig. 3): self-
    attention over the tokens of one feature map (the stride-32 S5 in every preset), with the
    2D sine-cosine position embedding (model/position.py) added to queries and keys."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos_embed)
        return src


class CCFF(nn.Module):
    """CNN-based Cross-scale Feature Fusion (the paper's Sec. 4.2, Fig. 3 and 4): a top-down
    (FPN) then bottom-up (PAN) path over the projected maps, each fusion a concatenation of two
    scales through a CSPRepLayer of RepVGG blocks. Its modules (lateral_convs, fpn_blocks,
    downsample_convs, pan_blocks) are registered on the encoder that builds them, so the
    checkpoint keys are the official flat ones (``encoder.fpn_blocks.0...``)."""

    def build_ccff(self, hidden: int, levels: int, blocks: int, act: str, expansion: float):
        self.lateral_convs = nn.ModuleList()
        self.fpn_blocks = nn.ModuleList()
        for _ in range(levels - 1, 0, -1):
            self.lateral_convs.append(ConvNormLayer(hidden, hidden, 1, 1, act=act))
            self.fpn_blocks.append(CSPRepLayer(hidden * 2, hidden, blocks, act=act,
                                               expansion=expansion))
        self.downsample_convs = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for _ in range(levels - 1):
            self.downsample_convs.append(ConvNormLayer(hidden, hidden, 3, 2, act=act))
            self.pan_blocks.append(CSPRepLayer(hidden * 2, hidden, blocks, act=act,
                                               expansion=expansion))

    def fuse(self, proj: List[torch.Tensor]) -> List[torch.Tensor]:
        n = len(proj)
        # top-down (FPN)
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            high = self.lateral_convs[n - 1 - idx](inner[0])
            inner[0] = high
            low = proj[idx - 1]
            up = nearest_upsample_to(high, low.shape[-2:])
            inner.insert(0, self.fpn_blocks[n - 1 - idx](torch.cat([up, low], dim=1)))
        # bottom-up (PAN)
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return outs


class HybridEncoder(CCFF):
    """The efficient hybrid encoder (the paper's Fig. 3): input projections, AIFI on S5, CCFF."""

    def __init__(self, cfg: EncoderConfig, eval_spatial_size: Tuple[int, int] | None = None):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim
        self.hidden_dim = hidden
        self.in_channels = list(cfg.in_channels)
        self.feat_strides = list(cfg.feat_strides)
        self.use_encoder_idx = list(cfg.use_encoder_idx)
        self.num_encoder_layers = cfg.num_encoder_layers
        self.pe_temperature = cfg.pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden] * len(self.in_channels)
        self.out_strides = self.feat_strides

        if cfg.version == "v2":
            self.input_proj = nn.ModuleList(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden, kernel_size=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden))])) for c in self.in_channels)
        else:
            self.input_proj = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1, bias=False),
                              nn.BatchNorm2d(hidden))
                for c in self.in_channels)
        layer = TransformerEncoderLayer(hidden, cfg.nhead, cfg.dim_feedforward, cfg.dropout,
                                        cfg.enc_act)
        self.encoder = nn.ModuleList(AIFI(copy.deepcopy(layer), cfg.num_encoder_layers)
                                     for _ in self.use_encoder_idx)

        self.build_ccff(hidden, len(self.in_channels), round(3 * cfg.depth_mult), cfg.act,
                        cfg.expansion)
        # position embeddings by ((w, h), device, dtype), made on the device on first use and
        # kept in a bounded LRU in which the eval size's never expire
        pinned = ()
        if eval_spatial_size is not None:
            pinned = tuple(feature_size(eval_spatial_size, self.feat_strides[i])[::-1]
                           for i in self.use_encoder_idx)
        self._pos_cache = ShapeCache(maxsize=8, pinned=pinned)

    def position_embedding(self, w: int, h: int, device, dtype) -> torch.Tensor:
        """The [1, w*h, hidden] embedding, computed in float32 on ``device`` once per
        ((w, h), device, dtype) and cached; computed in the graph, from the traced sizes,
        when an exporter traces the forward."""
        def make():
            return sincos_position_embedding(w, h, self.hidden_dim, self.pe_temperature,
                                             device=device).to(dtype)

        if tracing():
            return make()
        w, h = int(w), int(h)
        return self._pos_cache.get((w, h), device, dtype, make)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        if self.num_encoder_layers > 0:
            for i, idx in enumerate(self.use_encoder_idx):
                h, w = proj[idx].shape[2:]
                src = proj[idx].flatten(2).permute(0, 2, 1)
                pos = self.position_embedding(w, h, src.device, src.dtype)
                memory = self.encoder[i](src, pos)
                proj[idx] = memory.permute(0, 2, 1).reshape(-1, self.hidden_dim, h, w).contiguous()

        return self.fuse(proj)
