"""COCO folders to datasets and loaders, and the Trainer's COCO evaluation hook."""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
from torch.utils.data import DataLoader

from ..data.coco import CocoDetection
from ..data.transforms import (Compose, RandomHorizontalFlip, RandomPhotometricDistort, Resize,
                               ToTensor, collate_fn, eval_transforms, train_transforms)
from . import distributed as D
from .evaluate import CocoEvaluator, evaluate
from .seeding import SeededSampler, WorkerSeeder


def find_coco_split(root: str, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of ``split`` ('train' or 'val') under a COCO-style root:
    ``root/{split}2017`` or ``root/{split}`` with ``root/annotations/instances_{split}[2017].json``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    for suffix in ("2017", ""):
        images = os.path.join(root, f"{split}{suffix}")
        ann = os.path.join(root, "annotations", f"instances_{split}{suffix}.json")
        if os.path.isdir(images) and os.path.isfile(ann):
            return images, ann
    raise FileNotFoundError(f"no {split} split in {root!r}: expected {split}2017/ or {split}/ "
                            f"and annotations/instances_{split}[2017].json")


def make_loader(dataset, batch_size: int, train: bool, workers: int = 0, collate=collate_fn,
                seed: int = 0) -> DataLoader:
    """A DataLoader. Training: the order of epoch ``e`` is a permutation drawn from
    ``(seed, e)`` (the same on every rank, each rank taking its share), and each worker's
    generators are seeded from ``(seed, e, rank, worker id)``; the Trainer calls ``set_epoch``
    on the sampler and the ``worker_init_fn``. Workers are started per epoch (not persistent)."""
    world, rank = D.get_world_size(), D.get_rank()
    if train:
        sampler = SeededSampler(len(dataset), seed=seed, shuffle=True, rank=rank, world=world)
        init_fn = WorkerSeeder(seed, rank)
    elif D.is_distributed():
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=False)
        init_fn = None
    else:
        sampler, init_fn = None, None
    # training drops the last incomplete batch (as the official recipe does) only when there
    # is at least one full batch: a data set smaller than the batch still trains
    per_rank = len(dataset) // world
    # the loader's own generator: its per-iterator draw must not consume the global one
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                      num_workers=workers, collate_fn=collate, worker_init_fn=init_fn,
                      generator=torch.Generator().manual_seed(seed),
                      drop_last=train and per_rank >= batch_size, persistent_workers=False)


def coco_evaluate_fn(dataset, batch_size: int, device, workers: int = 0, progress: bool = True):
    """A Trainer ``evaluate_fn``: COCO numbers of a model on ``dataset``."""
    loader = make_loader(dataset, batch_size, train=False, workers=workers)

    def run(model) -> Dict[str, float]:
        evaluator = CocoEvaluator.from_dataset(dataset)
        return evaluate(model, loader, device, evaluator, progress=progress)

    return run


def coco_datasets(root: str, size: Tuple[int, int], augment: str = "official"):
    """Train and val datasets of a COCO-style folder. ``augment``: 'official' (the RT-DETR
    pipeline), 'light' (photometric + flip, for small synthetic sets) or 'none'."""
    train_images, train_ann = find_coco_split(root, "train")
    val_images, val_ann = find_coco_split(root, "val")
    if augment == "official":
        tf = train_transforms(size)
    elif augment == "light":
        tf = Compose([RandomPhotometricDistort(), RandomHorizontalFlip(), Resize(size),
                      ToTensor()])
    elif augment == "none":
        tf = eval_transforms(size)
    else:
        raise ValueError(f"augment must be 'official', 'light' or 'none', got {augment!r}")
    return (CocoDetection(train_images, train_ann, transforms=tf),
            CocoDetection(val_images, val_ann, transforms=eval_transforms(size)))
