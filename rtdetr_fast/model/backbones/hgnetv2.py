"""HGNetv2 (PP-HGNetV2): the backbone of RT-DETR-L / X / H and of D-FINE.

Variants B0-B6; L, X and H are B4, B5 and B6 (the same layers and the same state dict). The
module and parameter names follow the official rtdetrv2_pytorch layout, so released
checkpoints load key for key.

Layout:
- stem: a 3x3 stride-2 conv; beside a 2x2 max pool (stride 1, zero padded on the right and
  bottom) a pair of 2x2 convs padded the same way; both branches concatenated, a 3x3 stride-2
  conv and a 1x1 conv. Output stride 4.
- four stages of HG blocks. A block runs ``layers`` convs in sequence (plain 3x3 convs in
  stages 1-2; in stages 3-4 "light" ones, a 1x1 conv without activation then a depthwise
  ``kernel`` x ``kernel`` conv), concatenates its input with every layer's output, and
  aggregates them with a 1x1 squeeze conv to ``out / 2`` channels and a 1x1 excitation conv
  to ``out``. Every block after a stage's first adds its input. Stages 2-4 open with a
  depthwise 3x3 stride-2 conv (no activation). Output strides 4, 8, 16, 32.
- every conv is conv + batch norm (+ ReLU), and with ``use_lab`` (the small variants) a
  learnable affine ``scale * x + bias`` after each ReLU.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import BackboneConfig
from ..norms import fold_conv_norm, freeze_batch_norm, is_batch_norm


class StageSpec(NamedTuple):
    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light: bool
    kernel_size: int
    num_layers: int


# per variant: the stem's (in, mid, out) channels and the four stages
ARCHS = {
    "B0": ((3, 16, 16), (StageSpec(16, 16, 64, 1, False, False, 3, 3),
                         StageSpec(64, 32, 256, 1, True, False, 3, 3),
                         StageSpec(256, 64, 512, 2, True, True, 5, 3),
                         StageSpec(512, 128, 1024, 1, True, True, 5, 3))),
    "B1": ((3, 24, 32), (StageSpec(32, 32, 64, 1, False, False, 3, 3),
                         StageSpec(64, 48, 256, 1, True, False, 3, 3),
                         StageSpec(256, 96, 512, 2, True, True, 5, 3),
                         StageSpec(512, 192, 1024, 1, True, True, 5, 3))),
    "B2": ((3, 24, 32), (StageSpec(32, 32, 96, 1, False, False, 3, 4),
                         StageSpec(96, 64, 384, 1, True, False, 3, 4),
                         StageSpec(384, 128, 768, 3, True, True, 5, 4),
                         StageSpec(768, 256, 1536, 1, True, True, 5, 4))),
    "B3": ((3, 24, 32), (StageSpec(32, 32, 128, 1, False, False, 3, 5),
                         StageSpec(128, 64, 512, 1, True, False, 3, 5),
                         StageSpec(512, 128, 1024, 3, True, True, 5, 5),
                         StageSpec(1024, 256, 2048, 1, True, True, 5, 5))),
    "B4": ((3, 32, 48), (StageSpec(48, 48, 128, 1, False, False, 3, 6),
                         StageSpec(128, 96, 512, 1, True, False, 3, 6),
                         StageSpec(512, 192, 1024, 3, True, True, 5, 6),
                         StageSpec(1024, 384, 2048, 1, True, True, 5, 6))),
    "B5": ((3, 32, 64), (StageSpec(64, 64, 128, 1, False, False, 3, 6),
                         StageSpec(128, 128, 512, 2, True, False, 3, 6),
                         StageSpec(512, 256, 1024, 5, True, True, 5, 6),
                         StageSpec(1024, 512, 2048, 2, True, True, 5, 6))),
    "B6": ((3, 48, 96), (StageSpec(96, 96, 192, 2, False, False, 3, 6),
                         StageSpec(192, 192, 512, 3, True, False, 3, 6),
                         StageSpec(512, 384, 1024, 6, True, True, 5, 6),
                         StageSpec(1024, 768, 2048, 3, True, True, 5, 6))),
}
# the RT-DETR names of the large variants
ALIASES = {"L": "B4", "X": "B5", "H": "B6"}
VARIANTS = tuple(ARCHS) + tuple(ALIASES)


def arch(variant: str) -> Tuple[Tuple[int, int, int], Tuple[StageSpec, ...]]:
    """(stem channels, stage specs) of ``variant`` (B0-B6, or L / X / H)."""
    key = ALIASES.get(variant, variant)
    if key not in ARCHS:
        raise ValueError(f"unknown HGNetv2 variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    return ARCHS[key]


class LearnableAffine(nn.Module):
    """``scale * x + bias`` with one learnable scalar each."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias) + batch norm, then ReLU and the learnable affine where asked.

    ``pad_right_bottom``: instead of symmetric padding, one zero row and column are added
    after the input (the stem's 2x2 convs); the conv then sits at ``conv.1`` behind a
    ``ZeroPad2d`` at ``conv.0``, as in the official checkpoints."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: bool = True, lab: bool = False,
                 pad_right_bottom: bool = False):
        super().__init__()
        if pad_right_bottom:
            self.conv = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)),
                nn.Conv2d(ch_in, ch_out, kernel_size, stride, groups=groups, bias=False))
        else:
            self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, (kernel_size - 1) // 2,
                                  groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(ch_out)
        self.act = nn.ReLU() if act else nn.Identity()
        # the affine follows the activation only: a conv without one has none
        self.lab = LearnableAffine() if act and lab else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.lab(x) if self.lab is not None else x

    @property
    def folded(self) -> bool:
        return isinstance(self.bn, nn.Identity)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the (eval-mode) batch norm into the conv, which gains a bias. Idempotent."""
        if self.folded or not is_batch_norm(self.bn):
            return
        if isinstance(self.conv, nn.Sequential):
            self.conv[1] = fold_conv_norm(self.conv[1], self.bn)
        else:
            self.conv = fold_conv_norm(self.conv, self.bn)
        self.bn = nn.Identity()


class LightConvBNAct(nn.Module):
    """A 1x1 conv (no activation) then a depthwise ``kernel_size`` conv with activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, lab: bool = False):
        super().__init__()
        self.conv1 = ConvBNAct(ch_in, ch_out, 1, act=False, lab=lab)
        self.conv2 = ConvBNAct(ch_out, ch_out, kernel_size, groups=ch_out, lab=lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    def __init__(self, ch_in: int, ch_mid: int, ch_out: int, lab: bool = False):
        super().__init__()
        self.stem1 = ConvBNAct(ch_in, ch_mid, 3, 2, lab=lab)
        self.stem2a = ConvBNAct(ch_mid, ch_mid // 2, 2, lab=lab, pad_right_bottom=True)
        self.stem2b = ConvBNAct(ch_mid // 2, ch_mid, 2, lab=lab, pad_right_bottom=True)
        self.stem3 = ConvBNAct(ch_mid * 2, ch_mid, 3, 2, lab=lab)
        self.stem4 = ConvBNAct(ch_mid, ch_out, 1, lab=lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem1(x)
        conv_branch = self.stem2b(self.stem2a(x))
        # 2x2 max over the same right/bottom zero-padded window as the convs: the size is kept
        pool_branch = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=1)
        x = torch.cat([pool_branch, conv_branch], dim=1)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    def __init__(self, ch_in: int, ch_mid: int, ch_out: int, num_layers: int, kernel_size: int,
                 light: bool, residual: bool, lab: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            c = ch_in if i == 0 else ch_mid
            self.layers.append(LightConvBNAct(c, ch_mid, kernel_size, lab=lab) if light
                               else ConvBNAct(c, ch_mid, kernel_size, lab=lab))
        total = ch_in + num_layers * ch_mid
        self.aggregation_squeeze_conv = ConvBNAct(total, ch_out // 2, 1, lab=lab)
        self.aggregation_excitation_conv = ConvBNAct(ch_out // 2, ch_out, 1, lab=lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outs.append(y)
        y = self.aggregation_excitation_conv(self.aggregation_squeeze_conv(torch.cat(outs, 1)))
        return y + x if self.residual else y


class HGStage(nn.Module):
    def __init__(self, spec: StageSpec, lab: bool = False):
        super().__init__()
        c_in = spec.in_channels
        # depthwise stride-2 downsampling, linear (no activation, hence no affine)
        self.downsample = (ConvBNAct(c_in, c_in, 3, 2, groups=c_in, act=False, lab=lab)
                           if spec.downsample else None)
        self.blocks = nn.Sequential(*(
            HGBlock(c_in if i == 0 else spec.out_channels, spec.mid_channels, spec.out_channels,
                    spec.num_layers, spec.kernel_size, spec.light, residual=i > 0, lab=lab)
            for i in range(spec.num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class HGNetv2(nn.Module):
    """HGNetv2 of ``cfg.variant`` returning the stages in ``cfg.return_idx``.

    ``freeze_at >= 0`` freezes the stem and the first ``freeze_at`` stages (RT-DETR's
    configs: 0, the stem only); ``freeze_norm`` makes every batch norm a FrozenBatchNorm2d;
    ``use_lab`` adds the learnable affines."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        stem, stages = arch(cfg.variant)
        self.variant = cfg.variant
        self.return_idx = list(cfg.return_idx)
        self.stem = StemBlock(*stem, lab=cfg.use_lab)
        self.stages = nn.ModuleList(HGStage(s, lab=cfg.use_lab) for s in stages[:cfg.num_stages])
        out_channels = [s.out_channels for s in stages]
        out_strides = [4, 8, 16, 32]
        self.out_channels = [out_channels[i] for i in self.return_idx]
        self.out_strides = [out_strides[i] for i in self.return_idx]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        if cfg.freeze_at >= 0:
            for m in [self.stem, *self.stages[:cfg.freeze_at]]:
                for p in m.parameters():
                    p.requires_grad_(False)
        if cfg.freeze_norm:
            freeze_batch_norm(self)

    def fold_norms(self) -> int:
        """Fold every batch norm into its conv (RTDETR.deploy calls this); returns the number
        folded."""
        count = 0
        for m in self.modules():
            if isinstance(m, ConvBNAct) and not m.folded:
                m.fold()
                count += 1
        return count

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_idx:
                outs.append(x)
        return outs
