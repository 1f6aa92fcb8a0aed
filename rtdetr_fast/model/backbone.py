"""PResNet: ResNet-vd (deep stem, average-pool shortcut) as used by RT-DETR."""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import BackboneConfig
from .layers import ConvNormLayer, get_activation
from .norms import freeze_batch_norm

BLOCK_COUNTS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                152: [3, 8, 36, 3]}


def _shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    if variant == "d" and stride == 2:
        # ResNet-vd: average-pool then a stride-1 1x1 conv, so no input pixel is skipped
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="d"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x):
        out = self.branch2b(self.branch2a(x))
        return self.act(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, ch_in, ch_out, stride, shortcut, act="relu", variant="d"):
        super().__init__()
        # variant 'a' strides in the first 1x1 conv; 'b'/'c'/'d' in the 3x3
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(width, width, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x):
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return self.act(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    def __init__(self, block, ch_in, ch_out, count, stage_num, act="relu", variant="d"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=i != 0, act=act,
                                     variant=variant))
            if i == 0:
                ch_in = ch_out * block.expansion

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.depth not in BLOCK_COUNTS:
            raise ValueError(f"PResNet depth must be one of {sorted(BLOCK_COUNTS)}, got {cfg.depth}")
        self.return_idx = list(cfg.return_idx)
        ch_in = 64
        if cfg.variant in ("c", "d"):
            stem = [(3, ch_in // 2, 3, 2, "conv1_1"), (ch_in // 2, ch_in // 2, 3, 1, "conv1_2"),
                    (ch_in // 2, ch_in, 3, 1, "conv1_3")]
        else:
            stem = [(3, ch_in, 7, 2, "conv1_1")]
        self.conv1 = nn.Sequential(OrderedDict(
            (name, ConvNormLayer(ci, co, k, s, act=cfg.act)) for ci, co, k, s, name in stem))

        block = BottleNeck if cfg.depth >= 50 else BasicBlock
        ch_out_list = [64, 128, 256, 512]
        self.out_channels = [block.expansion * c for c in ch_out_list]
        self.out_strides = [4, 8, 16, 32]
        self.res_layers = nn.ModuleList()
        for i in range(cfg.num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], BLOCK_COUNTS[cfg.depth][i],
                                          i + 2, act=cfg.act, variant=cfg.variant))
            ch_in = self.out_channels[i]
        self.out_channels = [self.out_channels[i] for i in self.return_idx]
        self.out_strides = [self.out_strides[i] for i in self.return_idx]

        # set by RTDETR.deploy() (deploy_stem): the CPU stem's route (see forward)
        self.fast_stem = False
        self.winograd_stem = False
        if cfg.freeze_at >= 0:
            self._freeze_parameters(self.conv1)
            for i in range(min(cfg.freeze_at, cfg.num_stages)):
                self._freeze_parameters(self.res_layers[i])
        if cfg.freeze_norm:
            freeze_batch_norm(self)

    @staticmethod
    def _freeze_parameters(m: nn.Module) -> None:
        for p in m.parameters():
            p.requires_grad_(False)

    def deploy_stem(self) -> None:
        """Choose the deployed float32 CPU stem's route (RTDETR.deploy calls this): NCHW with
        the Winograd kernel and the extension's max pool where every 3x3 stride-1 conv of the
        stem is wide enough for the kernel (32 channels with its AVX-512 build, else 64: see
        ops.rep_conv.winograd), else channels_last with oneDNN's convolutions."""
        from ..ops import max_pool as pool
        from ..ops.rep_conv import winograd

        convs = [m for m in self.conv1.modules()
                 if isinstance(m, nn.Conv2d) and winograd.is_conv3x3_same(m)]
        self.fast_stem = True
        self.winograd_stem = (winograd.available() and pool.available() and bool(convs) and all(
            min(m.in_channels, m.out_channels) >= winograd.min_channels(torch.float32)
            for m in convs))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if (self.fast_stem and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.jit.is_tracing()):
            if self.winograd_stem:
                # deploy() on a CPU with the fused float32 Winograd kernel: the stem's 3x3
                # stride-1 convs run it (NCHW), then the extension's NCHW max pool
                x = ops.max_pool_3x3_s2(self.conv1(x))
            else:
                # deploy() elsewhere on the CPU: the stem runs channels_last, the layout
                # oneDNN's convs prefer and in which the max pool vectorises over channels,
                # and hands on NCHW
                x = self.conv1(x.contiguous(memory_format=torch.channels_last))
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1).contiguous()
        else:
            x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
