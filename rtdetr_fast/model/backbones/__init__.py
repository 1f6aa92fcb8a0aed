"""Backbones by name: ``BackboneConfig.name`` picks the family, ``BackboneConfig.variant``
the member (ResNet-vd's ``"d"``, HGNetv2's ``"L"`` or ``"B0"``...)."""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from ...config import BackboneConfig
from ..backbone import PResNet
from .hgnetv2 import HGNetv2

__all__ = ["BACKBONES", "build_backbone", "HGNetv2", "PResNet"]

# each builder takes the BackboneConfig and returns a module whose forward gives the feature
# maps of cfg.return_idx, with ``out_channels`` and ``out_strides`` listing them
BACKBONES: Dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "presnet": PResNet,
    "hgnetv2": HGNetv2,
}


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.name not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[cfg.name](cfg)
