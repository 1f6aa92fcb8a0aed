"""Glue between datasets, the model and the engine: COCO folders to loaders, evaluation hooks,
and the self-contained demo (synthetic data, train, evaluate, draw)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
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


# --------------------------------------------------------------------------------------------
# the official training recipes, by preset
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One optimizer group of an official config: the parameters whose name matches
    ``pattern`` (the config's regex, searched as the official ``re.findall``), with their own
    ``lr`` and/or ``weight_decay`` (None: the optimizer's)."""
    name: str
    pattern: str
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


# the strong augmentations the official ``stop_epoch`` policy switches off
STRONG_AUGMENTATIONS = ("RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop")
OFFICIAL_SCALES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An official training recipe (configs/rtdetr*/): epochs, the 0-based epoch from which the
    strong augmentations and multi-scale training stop, the AdamW groups, EMA, clipping, the
    loss and matcher weights. Defaults are the shared include files' values."""
    preset: str
    epochs: int = 72
    stop_epoch: int = 71
    multi_scale: bool = True
    multi_scale_stop_epoch: int = 71
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    groups: Tuple[ParamGroup, ...] = ()
    warmup_steps: int = 2000
    ema_decay: float = 0.9999
    ema_warmups: int = 2000
    clip_max_norm: float = 0.1
    total_batch_size: int = 16
    # RTDETRCriterion(v2) and HungarianMatcher, as the configs set them
    loss_weights: Tuple[Tuple[str, float], ...] = (("loss_vfl", 1.0), ("loss_bbox", 5.0),
                                                   ("loss_giou", 2.0))
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    matcher_weights: Tuple[Tuple[str, float], ...] = (("cost_class", 2.0), ("cost_bbox", 5.0),
                                                      ("cost_giou", 2.0))
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0

    def param_groups(self, model) -> list:
        """AdamW groups as the official ``get_optim_params`` makes them: each group takes the
        trainable parameters its regex finds in their names, the rest form a last group with
        the optimizer's settings. A parameter matched by two groups is an error (the official
        optimizer refuses it too)."""
        from .train import unwrap

        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        taken: Dict[str, str] = {}
        out = []
        for g in self.groups:
            params = []
            for n, p in named:
                if re.findall(g.pattern, n):
                    if n in taken:
                        raise ValueError(f"parameter {n} is in optimizer groups {taken[n]} and "
                                         f"{g.name}")
                    taken[n] = g.name
                    params.append(p)
            settings = {k: v for k, v in (("lr", g.lr), ("weight_decay", g.weight_decay))
                        if v is not None}
            if params:
                out.append(dict(params=params, name=g.name, **settings))
        rest = [p for n, p in named if n not in taken]
        if rest:
            out.append(dict(params=rest, name="default"))
        return out

    def build_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def train_transforms(self, size: Tuple[int, int], generator=None) -> "StopEpochPolicy":
        """The official train pipeline whose strong augmentations stop at ``stop_epoch``."""
        return StopEpochPolicy(train_transforms(size, generator=generator).transforms,
                               self.stop_epoch)

    def collate(self, size: int, *followers) -> "EpochCollate":
        """Batches resized to a size drawn from the official scales (scaled to ``size``)
        until ``multi_scale_stop_epoch`` when the recipe trains multi-scale; ``set_epoch``
        reaches ``followers`` too (pass the ``train_transforms`` policy)."""
        from ..data.transforms import MultiScaleCollate

        inner = collate_fn
        if self.multi_scale:
            sizes = [max(32, int(round(s * size / 640 / 32)) * 32) for s in OFFICIAL_SCALES]
            inner = MultiScaleCollate(sizes=sizes, stop_epoch=self.multi_scale_stop_epoch)
        return EpochCollate(inner, *followers)

    def for_epochs(self, epochs: int) -> "Recipe":
        """This recipe for a run of ``epochs`` epochs: the stop epochs keep the recipe's
        distance from the end (its last ``epochs - stop_epoch`` epochs train without strong
        augmentation / multi-scale), but never before half the run:
        ``stop = max(epochs - (self.epochs - stop_epoch), ceil(epochs / 2))``. The recipe's own
        length gives its own stops back; a 12-epoch run of a 120-epoch recipe stopping at 117
        stops at 9; a 2-epoch run at 1."""
        epochs = int(epochs)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")

        def scale(stop: int) -> int:
            return max(epochs - max(self.epochs - stop, 0), -(-epochs // 2))

        return dataclasses.replace(self, epochs=epochs, stop_epoch=scale(self.stop_epoch),
                                   multi_scale_stop_epoch=scale(self.multi_scale_stop_epoch))

    def configure_criterion(self, model) -> None:
        """Set the model's loss and matcher weights to this recipe's."""
        from .train import unwrap

        crit = getattr(unwrap(model), "criterion", None)
        if crit is None:
            return
        crit.weights = dict(self.loss_weights)
        crit.alpha, crit.gamma = self.vfl_alpha, self.vfl_gamma
        matcher = getattr(crit, "matcher", None)
        if matcher is not None:
            for key, value in self.matcher_weights:
                setattr(matcher, key, value)
            matcher.alpha, matcher.gamma = self.matcher_alpha, self.matcher_gamma

    def make_trainer(self, model, train_loader, cfg=None, **kwargs):
        """A Trainer with this recipe's optimizer groups, loss and matcher weights
        (``TrainConfig.recipe`` set to this preset; ``cfg``'s other settings are kept, its base
        lr, weight decay and betas become the recipe's and the backbone groups keep the
        recipe's lrs)."""
        from .train import TrainConfig, Trainer

        if cfg is None:
            cfg = TrainConfig(epochs=self.epochs, warmup_steps=self.warmup_steps,
                              ema_decay=self.ema_decay, ema_warmups=self.ema_warmups,
                              clip_max_norm=self.clip_max_norm)
        cfg = dataclasses.replace(cfg, recipe=self.preset, lr=self.lr, backbone_lr=None,
                                  weight_decay=self.weight_decay, betas=self.betas)
        trainer = Trainer(model, train_loader, cfg, **kwargs)
        if RECIPES.get(self.preset) is None or RECIPES[self.preset].groups != self.groups:
            # a recipe of its own (not the registered one of its preset): its groups
            from .train import LRSchedule

            trainer.optimizer = self.build_optimizer(trainer.model)
            trainer.schedule = LRSchedule(trainer.optimizer, trainer.cfg)
        self.configure_criterion(trainer.model)
        return trainer


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


_V1_GROUPS = (  # rtdetr_r18vd_6x_coco.yml (train.param_groups applies them to every v1 preset)
    ParamGroup("backbone_norm", r"^(?=.*backbone)(?=.*norm).*$", lr=1e-5, weight_decay=0.0),
    ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm).*$", lr=1e-5),
    ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", weight_decay=0.0),
)
_V2_R50_GROUPS = (  # configs/rtdetrv2/include/optimizer.yml, rtdetrv2_r50vd{,_m}_*.yml
    ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm).*$", lr=1e-5),
    ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", weight_decay=0.0),
)
RECIPES: Dict[str, Recipe] = {
    **{name: Recipe(name, groups=_V1_GROUPS) for name in
       ("rtdetr_r18vd", "rtdetr_r34vd", "rtdetr_r50vd_m", "rtdetr_r50vd", "rtdetr_r101vd")},
    # rtdetrv2_r18vd_120e_coco.yml: 120 epochs, strong augmentation until 117, no multi-scale
    # (collate scales ~), the backbone at the base lr, no weight decay on any norm
    "rtdetrv2_r18vd": Recipe(
        "rtdetrv2_r18vd", epochs=120, stop_epoch=117, multi_scale=False,
        groups=(ParamGroup("no_decay", r"^(?=.*(?:norm|bn)).*$", weight_decay=0.0),)),
    # rtdetrv2_r34vd_120e_coco.yml: the backbone at 5e-5, multi-scale until 117
    "rtdetrv2_r34vd": Recipe(
        "rtdetrv2_r34vd", epochs=120, stop_epoch=117, multi_scale_stop_epoch=117,
        groups=(ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", lr=5e-5),
                ParamGroup("backbone_norm", r"^(?=.*backbone)(?=.*norm|bn).*$", lr=5e-5,
                           weight_decay=0.0),
                ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$",
                           weight_decay=0.0))),
    # rtdetrv2_r50vd_m_7x_coco.yml: 84 epochs, both stops at 81
    "rtdetrv2_r50vd_m": Recipe("rtdetrv2_r50vd_m", epochs=84, stop_epoch=81,
                               multi_scale_stop_epoch=81, groups=_V2_R50_GROUPS),
    "rtdetrv2_r50vd": Recipe("rtdetrv2_r50vd", groups=_V2_R50_GROUPS),
    # rtdetrv2_r101vd_6x_coco.yml: the backbone at 1e-6
    "rtdetrv2_r101vd": Recipe(
        "rtdetrv2_r101vd",
        groups=(ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", lr=1e-6),
                _V2_R50_GROUPS[1])),
}


def recipe_for(preset: str) -> Recipe:
    """The official training recipe of ``preset`` (a model config's ``name``)."""
    if preset not in RECIPES:
        raise ValueError(f"no training recipe for {preset!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    return RECIPES[preset]


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
    # saved with every checkpoint: `predict --checkpoint .../last.pth` then names the shapes
    model.set_categories(train_ds.class_names, train_ds.label_to_cat_id)
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
        draw_detections(path, det, class_names=model_eval.class_names, scale=3.0).save(png)
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
