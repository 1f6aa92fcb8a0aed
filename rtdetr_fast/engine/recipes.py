"""Glue between datasets, the model and the engine: COCO folders to loaders, evaluation hooks,
and the self-contained demo (synthetic data, train, evaluate, draw)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..data.coco import CocoDetection
from ..data.transforms import (Compose, RandomHorizontalFlip, RandomPhotometricDistort, Resize,
                               ToTensor, collate_fn, eval_transforms, train_transforms)
from . import distributed as D
from .evaluate import CocoEvaluator, evaluate


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
    from .seeding import SeededSampler, WorkerSeeder

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


# the demo: a narrow rtdetr_r18vd on 160x160 synthetic scenes, trained from scratch on a CPU
DEMO_SIZE = (160, 160)
DEMO_MODEL = dict(hidden_dim=128, dim_feedforward=256, num_queries=100, num_denoising=50,
                  eval_spatial_size=DEMO_SIZE)
DEMO_CLASSES = ("rectangle", "ellipse", "triangle")


def run_demo(out_dir: str = "demo_output", preset: str = "rtdetr_r18vd", epochs: int = 12,
             num_train: int = 400, num_val: int = 60, batch_size: int = 8, lr: float = 1e-3,
             time_budget: Optional[float] = None, device: str = "cpu", seed: int = 0,
             progress: bool = True, log=print) -> Dict:
    """Generate a synthetic COCO set, train, evaluate with pycocotools, draw detections.

    Returns a summary with the COCO numbers, the time taken and the files written."""
    from ..data.synthetic import make_synthetic_coco
    from ..model.rtdetr import RTDETR
    from ..visualize import draw_detections
    from .train import TrainConfig, Trainer

    from .seeding import seed_everything

    t_start = time.perf_counter()
    seed_everything(seed)
    data_root = os.path.join(out_dir, "data")
    make_synthetic_coco(data_root, num_train=num_train, num_val=num_val, size=DEMO_SIZE,
                        classes=DEMO_CLASSES, seed=seed)
    log(f"demo: generated {num_train} train and {num_val} val images of "
        f"{DEMO_SIZE[0]}x{DEMO_SIZE[1]} under {data_root}")
    train_ds, val_ds = coco_datasets(data_root, DEMO_SIZE, augment="light")
    model = RTDETR.from_name(preset, num_classes=len(DEMO_CLASSES), **DEMO_MODEL)
    loader = make_loader(train_ds, batch_size, train=True, seed=seed)
    steps = epochs * len(loader)
    cfg = TrainConfig(epochs=epochs, lr=lr, backbone_lr=lr, warmup_steps=min(100, steps // 10),
                      lr_milestones=(max(epochs - 2, 1),), ema_decay=0.999,
                      ema_warmups=max(steps // 10, 1), clip_max_norm=0.1,
                      output_dir=os.path.join(out_dir, "train"), eval_every=max(epochs // 3, 1),
                      log_every=10, progress=progress, best_metric="AP50", seed=seed)
    evaluate_fn = coco_evaluate_fn(val_ds, batch_size, device, progress=progress)
    trainer = Trainer(model, loader, cfg, evaluate_fn=evaluate_fn, device=device)
    log(f"demo: training {preset} (narrowed: {DEMO_MODEL}) from scratch for {epochs} epochs "
        f"({steps} steps of {batch_size} images) on {device}")
    records = list(_fit_with_budget(trainer, time_budget, t_start, log))
    final = {k[len("eval_"):]: v for k, v in records[-1].items() if k.startswith("eval_")} \
        if records else {}
    if not final:
        final = trainer.evaluate()
    t_total = time.perf_counter() - t_start
    table = "\n".join(f"  {k:<6} {v:.3f}" for k, v in final.items())
    log(f"demo: COCO evaluation of the EMA model on the {num_val} held-out images:\n{table}")

    model_eval = trainer.ema.module if trainer.ema else trainer.model
    pngs = []
    for i, (image_id, path) in enumerate(_first_images(val_ds, 4)):
        det = model_eval.predict(path, threshold=0.5)[0]
        png = os.path.join(out_dir, f"val_{image_id}_detections.png")
        draw_detections(path, det, class_names=DEMO_CLASSES, scale=3.0).save(png)
        pngs.append(png)
    summary = {"metrics": final, "seconds": t_total, "epochs": trainer.epoch,
               "steps": trainer.step, "images": pngs,
               "checkpoint": os.path.join(cfg.output_dir, "last.pth")}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"demo: AP50 {final.get('AP50', 0.0):.3f}, AP {final.get('AP', 0.0):.3f} in "
        f"{t_total / 60:.1f} min; wrote {', '.join(pngs)}")
    return summary


def _fit_with_budget(trainer, budget: Optional[float], t_start: float, log):
    """Epochs until the configured count, or until the time budget would be exceeded."""
    while trainer.epoch < trainer.cfg.epochs:
        t0 = time.perf_counter()
        records = trainer.fit_epochs(1)
        yield from records
        per_epoch = time.perf_counter() - t0
        r = records[-1]
        log(f"demo: epoch {r['epoch']}/{trainer.cfg.epochs} loss {r['train_loss']:.3f} "
            f"({per_epoch:.0f} s)" + (f", AP50 {r['eval_AP50']:.3f}" if "eval_AP50" in r else ""))
        if (budget is not None and trainer.epoch < trainer.cfg.epochs
                and time.perf_counter() - t_start + per_epoch > budget):
            log(f"demo: stopping early to stay within the {budget:.0f} s budget")
            break


def _first_images(dataset, n):
    out = []
    for image_id in dataset.ids[:n]:
        info = dataset.coco.loadImgs(image_id)[0]
        out.append((image_id, os.path.join(dataset.img_folder, info["file_name"])))
    return out
