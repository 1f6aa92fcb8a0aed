"""Folding for inference: every conv + batch norm pair of a model into one conv with bias
(``RTDETR.deploy`` calls it after folding the RepConvs)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import ConvNormLayer
from .norms import fold_conv_norm, is_batch_norm


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold every conv + batch norm pair under ``module`` into one conv with bias: each
    ConvNormLayer, and each (Conv2d, BatchNorm) pair of consecutive children of an
    nn.Sequential (the input projections). Returns the number of norms folded."""
    count = 0
    for m in list(module.modules()):
        if isinstance(m, ConvNormLayer):
            if not m.folded and is_batch_norm(m.norm):
                m.fold()
                count += 1
        elif isinstance(m, nn.Sequential):
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                conv, norm = m._modules[a], m._modules[b]
                if isinstance(conv, nn.Conv2d) and is_batch_norm(norm):
                    m._modules[a] = fold_conv_norm(conv, norm)
                    m._modules[b] = nn.Identity()
                    count += 1
    return count
