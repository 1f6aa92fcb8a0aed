"""Batch norms: the frozen form the official backbones use, and folding a norm into its conv."""
from __future__ import annotations

import torch
import torch.nn as nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all held as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints of the unfrozen form carry a counter this module has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with its values."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))


def bn_scale_shift(norm: nn.Module):
    """(scale, shift) such that norm(x) == x * scale + shift in eval mode."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_shift()
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


@torch.no_grad()
def fold_conv_norm(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """A conv with bias equal to norm(conv(x)) for an eval-mode BatchNorm2d or
    FrozenBatchNorm2d. Folded in float64 (rsqrt(var + eps) included) and rounded once to the
    conv's dtype, so the result matches the pair to that dtype's rounding."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("cannot fold a batch norm without running statistics")
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias.double()
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    ref = conv.weight
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True,
                       padding_mode=conv.padding_mode, device=ref.device, dtype=ref.dtype)
    folded.weight.copy_(ref.double() * scale.view(-1, 1, 1, 1))
    folded.bias.copy_(shift)
    folded.weight.requires_grad_(ref.requires_grad)
    folded.bias.requires_grad_(ref.requires_grad)
    return folded
