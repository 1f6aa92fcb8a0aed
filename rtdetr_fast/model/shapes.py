"""Feature-map sizes and the cache of tensors that depend only on them (anchors, position
embeddings)."""
from __future__ import annotations

import collections

import torch
from torch._subclasses.fake_tensor import is_fake


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
