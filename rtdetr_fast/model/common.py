"""Building blocks shared by the backbone, encoder and decoder."""
from __future__ import annotations

import collections
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .. import ops
from ..ops.rep_conv import onednn
from ..ops.rep_conv import winograd
from ..ops.rep_conv.winograd import is_conv3x3_same


def get_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    table = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "identity": nn.Identity}
    if name.lower() not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(table)}")
    return table[name.lower()]()


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


def bn_scale_shift(norm: nn.Module):
    """(scale, shift) such that norm(x) == x * scale + shift in eval mode."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_shift()
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


class ConvNormLayer(nn.Module):
    """Conv2d (no bias unless asked) + BatchNorm2d + activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int,
                 padding: int | None = None, bias: bool = False, act: str | None = None):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and x.device.type == "cpu":
            act = self._rep_conv_act()
            if act is not None:
                # a folded 3x3 stride-1 conv is the folded-RepConv op: on the CPU its native
                # kernel is Winograd F(4x4, 3x3) (ops/rep_conv/winograd.py)
                return ops.rep_conv(x, self.conv.weight, self.conv.bias, act)
            c = self.conv
            name = _ACT_NAMES.get(type(self.act))
            if (name is not None and isinstance(c.padding, tuple)
                    and onednn.fusable(x, c.weight, c.bias, c.padding_mode)):
                return onednn.conv_act(x, c.weight, c.bias, c.stride, c.padding, c.dilation,
                                       c.groups, name)
        elif self.training and winograd.trains(x, self.conv):
            # training on the CPU: the Winograd kernel runs the forward and the input gradient
            # (eval mode, gradients or not, keeps the direct convolution: the official numbers)
            return self.act(self.norm(winograd.conv3x3_train(x, self.conv.weight,
                                                             self.conv.bias)))
        return self.act(self.norm(self.conv(x)))

    def _rep_conv_act(self):
        """The activation's name when act(conv(x)) is ops.rep_conv's form, else None."""
        if not is_conv3x3_same(self.conv):
            return None
        return _ACT_NAMES.get(type(self.act))

    @property
    def folded(self) -> bool:
        return isinstance(self.norm, nn.Identity)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the (eval-mode) norm into the conv: act(conv'(x)), conv' with a bias.
        Idempotent."""
        if not self.folded:
            self.conv = fold_conv_norm(self.conv, self.norm)
            self.norm = nn.Identity()


# ops.rep_conv's activation names, which oneDNN's fused conv (ops/rep_conv/onednn.py) takes too;
# a bare conv ("identity") takes that call as well, and inductor fuses it with a following
# residual add (+ ReLU) into one oneDNN call
_ACT_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}


def is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))


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


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them (not after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 act: str = "relu"):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clip(min=0.0, max=1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    return float(-math.log((1 - prior_prob) / prior_prob))


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def nearest_upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest upsampling to ``size``: equal to scale_factor=2 when size is exactly twice x's,
    and defined for odd sizes (inputs that are not multiples of 32) too."""
    return F.interpolate(x, size=tuple(size), mode="nearest")


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor):
    """Pairwise IoU and union of xyxy boxes a [N,4], b [M,4] -> ([N,M], [N,M])."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of xyxy boxes a [N,4], b [M,4] -> [N,M]."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor):
    """IoU and generalised IoU of matched xyxy pairs a [N,4], b [N,4] -> ([N], [N])."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    iou = inter / union
    hull_wh = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou, iou - (hull - union) / hull


def feature_size(size, stride: int):
    """(H, W) of the feature map at ``stride`` for an input of ``size`` (H, W): each stride-2
    step of the network (3x3 convs with padding 1, the stem's max-pool) rounds up."""
    h, w = (int(s) for s in size)
    while stride > 1:
        h, w, stride = (h + 1) // 2, (w + 1) // 2, stride // 2
    return h, w


class ShapeCache:
    """Tensors that depend only on feature-map sizes (anchors, position embeddings), made once
    per (shape, device, dtype) and kept in a bounded LRU. Entries whose shape is in ``pinned``
    (the eval size's) are never evicted. Nothing is stored while torch.compile traces or when
    the tensor made is a fake one (FakeTensorMode, torch.export), so the cache only ever holds
    real tensors."""

    def __init__(self, maxsize: int = 8, pinned=()):
        self.maxsize = maxsize
        self.pinned = set(pinned)
        self._entries: "collections.OrderedDict" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, shape, device, dtype, make):
        key = (shape, torch.device(device), dtype)
        hit = self._entries.get(key)
        if torch.compiler.is_compiling():
            return hit if hit is not None else make()
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        hit = make()
        tensors = hit if isinstance(hit, (tuple, list)) else (hit,)
        if any(is_fake(t) for t in tensors):
            return hit
        self._entries[key] = hit
        if len(self._entries) > self.maxsize:
            for k in list(self._entries):
                if k[0] not in self.pinned and k != key:
                    del self._entries[k]
                    break
        return hit
