"""Epoch policies of a training pipeline: transforms that switch off from an epoch on (the
official ``stop_epoch`` policy) and the collate function that tells them the epoch."""
from __future__ import annotations

# the strong augmentations the official ``stop_epoch`` policy switches off
STRONG_AUGMENTATIONS = ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")


class StopEpochPolicy:
    """A Compose whose ``ops`` (by class name) are skipped from epoch ``stop_epoch`` on (the
    official ``policy: {name: stop_epoch}``). ``set_epoch`` comes from :class:`EpochCollate`:
    with non-persistent loader workers the dataset is pickled after it, so workers see it."""

    def __init__(self, transforms, stop_epoch: int, ops=STRONG_AUGMENTATIONS):
        self.transforms, self.stop_epoch, self.ops = list(transforms), stop_epoch, tuple(ops)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, image, target):
        for t in self.transforms:
            if self.epoch >= self.stop_epoch and type(t).__name__ in self.ops:
                continue
            image, target = t(image, target)
        return image, target


class EpochCollate:
    """A collate function whose ``set_epoch`` (called by the Trainer) also reaches
    ``followers``."""

    def __init__(self, collate, *followers):
        self.collate, self.followers = collate, followers

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.collate, *self.followers):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def __call__(self, batch):
        return self.collate(batch)
