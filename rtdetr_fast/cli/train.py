"""``rtdetr-fast train``: its options and checks, the composition of a run (data, model, the
plan of :mod:`rtdetr_fast.engine.plan`, loader, Trainer) and what it prints."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import _model
from ._checks import (DEFAULT_SIZE, UsageError, check_checkpoint_path, check_data_folder,
                      check_int, check_model_args, check_output_folder, existing_parent,
                      parse_names)
from ._model import add_model_args


def add_parser(sub):
    s = sub.add_parser("train", help="train on a COCO-format dataset (torchrun for DDP)")
    s.add_argument("--data", required=True,
                   help="COCO folder: train2017/ val2017/ (or train/ val/) + "
                        "annotations/instances_{train,val}[2017].json")
    s.add_argument("--epochs", type=int, default=None,
                   help="epochs to train, in all with --resume (default: 72); an rtdetrv2 "
                        "preset's default is its recipe's, a resumed run's its own")
    s.add_argument("--batch-size", type=int, default=4, help="images per step (per GPU)")
    s.add_argument("--lr", type=float, default=None,
                   help="base learning rate: the encoder's and decoder's (default: 1e-4, an "
                        "rtdetrv2 preset's recipe's)")
    s.add_argument("--backbone-lr", type=float, default=None,
                   help="learning rate of the backbone (default: 1e-5; an rtdetrv2 preset's "
                        "recipe sets it per preset)")
    s.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 5%% of the run's steps, at most 2000)")
    s.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision (GPUs; slow on CPUs)")
    s.add_argument("--resume", help="continue a run from its last.pth")
    s.add_argument("--names", help="category names, comma-separated or a file with one per "
                                   "line (default: the data set's category names)")
    s.add_argument("--output-dir", default="outputs/train",
                   help="where last.pth, best.pth and log.jsonl go")
    s.add_argument("--augment", choices=["official", "light", "none"], default=None,
                   help="train augmentation: the RT-DETR pipeline, photometric + flip, or none "
                        "(default: official)")
    s.add_argument("--multi-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="random input size per batch (default: off; an rtdetrv2 preset's "
                        "recipe's)")
    s.add_argument("--stop-aug-epochs", type=int, default=None,
                   help="final epochs without multi-scale (default: 2) and, with a recipe, "
                        "without strong augmentation (default: the recipe's, scaled to "
                        "--epochs)")
    s.add_argument("--workers", type=int, default=2, help="data loader processes")
    s.add_argument("--sync-bn", action="store_true", help="synchronised batch norm (torchrun)")
    s.add_argument("--no-ema", action="store_true", help="no weight EMA")
    s.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation, data order, augmentation and denoising "
                        "noise (default: 0, or the resumed checkpoint's)")
    s.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (torch.use_deterministic_algorithms); "
                        "an op without a deterministic form is an error")
    add_model_args(s)
    return s


def check(args) -> None:
    for dest in ("epochs", "batch_size", "max_steps"):
        check_int(args, dest, 1)
    for dest in ("workers", "warmup_steps", "stop_aug_epochs", "seed"):
        check_int(args, dest, 0)
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr:g}")
    if args.backbone_lr is not None and not args.backbone_lr >= 0:
        raise UsageError(f"--backbone-lr must be >= 0, got {args.backbone_lr:g}")
    if args.resume and args.checkpoint:
        raise UsageError("give --resume (continue a run) or --checkpoint (start from weights), "
                         "not both")
    check_data_folder(args.data, ("train", "val"))
    check_model_args(args)
    check_checkpoint_path(args.resume, "--resume")
    parse_names(args.names)
    check_output_folder(args.output_dir, "--output-dir")
    check_earlier_run(args.output_dir, args.resume)


def check_earlier_run(output_dir: str, resume: Optional[str]) -> None:
    """A run does not overwrite the checkpoints of another one: an ``--output-dir`` that holds
    last.pth or best.pth is refused, except the folder of the run being resumed."""
    found = [f for f in ("last.pth", "best.pth") if os.path.isfile(os.path.join(output_dir, f))]
    if not found:
        return
    if resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)), output_dir):
        return
    raise UsageError(f"--output-dir {output_dir!r} holds the checkpoints of another run "
                     f"({', '.join(found)}), which this one would overwrite: choose a new "
                     f"folder, or continue that run with --resume "
                     f"{os.path.join(output_dir, 'last.pth')}")


def _free_bytes(path: str) -> int:
    import shutil

    return shutil.disk_usage(existing_parent(path)).free


def checkpoint_bytes(model) -> int:
    """What a run writes at most at once: last.pth (the weights, their EMA and AdamW's two
    moments: four copies), best.pth (one) and, while last.pth is replaced, a temporary copy of
    it (four more)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 9 * weights + (1 << 20)


def check_free_space(output_dir: str, model) -> None:
    """Before the first step: room in ``output_dir`` for the checkpoints the run writes."""
    need, free = checkpoint_bytes(model), _free_bytes(output_dir)
    if free < need:
        raise UsageError(f"--output-dir {output_dir!r}: not enough free space for the run's "
                         f"checkpoints: about {need / 2**20:.0f} MiB needed (last.pth, best.pth "
                         f"and a copy while saving), {free / 2**20:.0f} MiB free")


def _checkpoint_size(path: Optional[str]):
    """The input size saved in a checkpoint's config, or None."""
    if not path:
        return None
    from ..model.checkpoint import CheckpointError, read_checkpoint

    try:
        if os.path.isdir(path):
            import json

            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f).get("rtdetr_fast") or {}
        else:
            cfg = read_checkpoint(path)[1] or {}
    except (OSError, ValueError, CheckpointError):
        return None
    size = cfg.get("eval_spatial_size")
    return tuple(size) if size else None


def _flag_text(dest, value) -> str:
    from ..engine.plan import RECIPE_FLAGS

    option = RECIPE_FLAGS[dest]
    if dest == "multi_scale":
        return "--multi-scale" if value else "--no-multi-scale"
    if dest == "no_ema":
        return option
    return f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}"


def _epochs_text(what: str, stop: Optional[int], epochs: int) -> str:
    """'<what> in epochs 1-9 of 12' (epochs counted from 1, as everywhere the user sees them)."""
    if stop is None or stop >= epochs:
        return f"{what} every epoch"
    if stop <= 0:
        return f"no {what}"
    return f"{what} in epoch{' 1' if stop == 1 else f's 1-{stop}'} of {epochs}"


def recipe_line(plan, trainer) -> str:
    """The one line saying which recipe the run uses and what the flags overrode."""
    cfg = trainer.cfg
    groups = ", ".join(f"{g.get('name', i)} {base:g}" for i, (g, base) in
                       enumerate(zip(trainer.optimizer.param_groups, trainer.schedule.base)))
    aug = {"official": "strong augmentation", "light": "light augmentation",
           "none": "no augmentation"}[plan.augment]
    if plan.augment == "none":
        pipeline = aug
    else:
        pipeline = _epochs_text(aug, plan.stop_epoch, plan.epochs)
    ms = _epochs_text("multi-scale", plan.multi_scale_stop_epoch, plan.epochs) \
        if plan.multi_scale else "no multi-scale"
    ema = f"EMA decay {cfg.ema_decay:.4g}" if cfg.ema else "no EMA"
    if plan.recipe is None:
        head = f"recipe: none for {plan.preset} (v1 presets train with the command's defaults)"
    else:
        r = plan.recipe
        src = ", from the resumed checkpoint" if plan.from_checkpoint else ""
        from ..engine.recipes import recipe_for

        base = recipe_for(plan.preset)
        head = f"recipe: {plan.preset} ({base.epochs} epochs{src})"
        if plan.epochs != base.epochs:
            head += f", run for {plan.epochs}"
        loss = " ".join(f"{k[len('loss_'):]} {v:g}" for k, v in r.loss_weights)
        ms += f"; loss {loss}"
    flags = ", ".join(_flag_text(k, v) for k, v in plan.overrides) or "nothing"
    return (f"{head}: {pipeline}; {ms}; AdamW {groups} (weight decay {cfg.weight_decay:g}); "
            f"{ema}; clip {cfg.clip_max_norm:g}; overridden by flags: {flags}")


def prepare_train(args):
    """Everything ``rtdetr-fast train`` does before training: data, model, plan, loader and the
    Trainer (resumed when asked). Returns (trainer, plan, info) with info the numbers the
    command prints."""
    from ..data.policies import EpochCollate, StopEpochPolicy
    from ..data.transforms import MultiScaleCollate, collate_fn
    from ..engine import distributed as D
    from ..engine.loaders import coco_datasets, coco_evaluate_fn, make_loader
    from ..engine.plan import plan_training, saved_train_config
    from ..engine.seeding import seed_everything, set_deterministic
    from ..engine.train import TrainConfig, Trainer, scaled_schedule

    if not getattr(args, "validated", False):
        check(args)
        args.validated = True
    device = D.init_distributed(args.device)
    if args.deterministic:
        set_deterministic(True)
    # one seed for the whole run; the same on every rank, so the initialisation is identical
    # (each rank's data order share, augmentation and denoising noise differ by rank). A resumed
    # run without --seed continues with the seed saved in its checkpoint.
    seed = args.seed if args.seed is not None else (None if args.resume else 0)
    seed_everything(seed or 0)
    if args.amp != "none" and device.type == "cpu":
        print(f"rtdetr-fast train: warning: --amp {args.amp} on a CPU is usually much slower "
              "than float32 (--amp none)", file=sys.stderr)
    saved = saved_train_config(args.resume) if args.resume else None
    augment = args.augment
    if augment is None and saved and saved.get("recipe"):
        # a recipe run's --augment is part of what it resumes with
        augment = dict(saved.get("recipe_overrides") or ()).get("augment")
    augment = augment or "official"
    # the input size: --size, else the checkpoint's, else 640
    size = args.size or (_checkpoint_size(args.checkpoint or args.resume)
                         or (DEFAULT_SIZE,) * 2)[0]
    args.size = size
    train_ds, val_ds = coco_datasets(args.data, (size, size), augment=augment)
    if len(train_ds) == 0:
        raise ValueError(f"the training set of {args.data!r} lists no images")
    names = train_ds.class_names
    if args.resume:
        # the run's own model config; the class count must be the data set's
        model = _model.build_model(args, checkpoint=args.resume)
        if model.num_classes != train_ds.num_classes:
            raise ValueError(f"cannot resume {args.resume!r}: it was trained for "
                             f"{model.num_classes} classes, the data set has "
                             f"{train_ds.num_classes}")
        model.set_categories(parse_names(args.names) or names, train_ds.label_to_cat_id)
        if saved is None:
            saved = {}  # a checkpoint without train_config: the v1 groups, as it was trained
    else:
        model = _model.build_model(args, num_classes=train_ds.num_classes, class_names=names,
                                   category_ids=train_ds.label_to_cat_id)
    check_free_space(args.output_dir, model)
    plan = plan_training(args, model.config.name, saved if args.resume else None)
    if plan.recipe is None:
        collate = collate_fn
        if plan.multi_scale:
            sizes = [s for s in range(int(size * 0.75) // 32 * 32, int(size * 1.25) + 1, 32)]
            collate = MultiScaleCollate(sizes=sizes, stop_epoch=plan.multi_scale_stop_epoch)
    else:
        tf = train_ds.transforms
        policy = StopEpochPolicy(getattr(tf, "transforms", [tf]), plan.stop_epoch)
        train_ds.transforms = policy
        collate = plan.recipe.collate(size, policy) if plan.multi_scale else \
            EpochCollate(collate_fn, policy)
    loader = make_loader(train_ds, args.batch_size, train=True, workers=args.workers,
                         collate=collate, seed=seed or 0)
    steps_per_epoch = len(loader) if not args.max_steps else min(len(loader), args.max_steps)
    total = steps_per_epoch * plan.epochs
    r = plan.recipe
    sched = scaled_schedule(total) if r is None else scaled_schedule(
        total, r.warmup_steps, r.ema_warmups, r.ema_decay)
    if plan.warmup_steps is not None:
        sched["warmup_steps"] = plan.warmup_steps
    extra = {} if r is None else dict(
        recipe=plan.preset, weight_decay=r.weight_decay, betas=r.betas,
        clip_max_norm=r.clip_max_norm,
        recipe_overrides=tuple((k, v) for k, v in plan.overrides if k != "epochs"))
    cfg = TrainConfig(epochs=plan.epochs, lr=plan.lr, backbone_lr=plan.backbone_lr,
                      warmup_steps=sched["warmup_steps"], ema_decay=sched["ema_decay"],
                      ema_warmups=sched["ema_warmups"], amp=args.amp, sync_bn=args.sync_bn,
                      output_dir=args.output_dir, ema=plan.ema,
                      max_steps_per_epoch=args.max_steps, seed=seed,
                      deterministic=args.deterministic, **extra)
    evaluate_fn = coco_evaluate_fn(val_ds, args.batch_size, device, workers=args.workers,
                                   progress=D.is_main_process())
    trainer = Trainer(model, loader, cfg, evaluate_fn=evaluate_fn, device=device)
    if args.resume:
        trainer.resume(args.resume)
        for obj in (loader.sampler, loader.worker_init_fn):
            obj.seed = trainer.cfg.seed if trainer.cfg.seed is not None else 0
        if trainer.epoch >= cfg.epochs:
            raise ValueError(f"nothing to train: {args.resume!r} has already trained "
                             f"{trainer.epoch} epochs; pass --epochs larger than "
                             f"{trainer.epoch} to train more")
    info = dict(size=size, train_images=len(train_ds), steps_per_epoch=steps_per_epoch)
    return trainer, plan, info


def run(args) -> int:
    from ..engine import distributed as D
    from ..engine.ema import unwrap

    trainer, plan, info = prepare_train(args)
    model, cfg = unwrap(trainer.model), trainer.cfg
    if D.is_main_process():
        print(recipe_line(plan, trainer), file=sys.stderr)
        print(f"training {model.config.name} ({model.num_classes} classes: "
              f"{', '.join(model.class_names[:10])}{' ...' if model.num_classes > 10 else ''}) "
              f"at {info['size']}x{info['size']} on {info['train_images']} images: "
              f"{cfg.epochs} epochs x {info['steps_per_epoch']} steps of {args.batch_size}; "
              f"warm-up {cfg.warmup_steps} steps, EMA decay {cfg.ema_decay:.4g}",
              file=sys.stderr)
    records = trainer.fit()
    if D.is_main_process() and records:
        last = records[-1]
        print(f"trained {trainer.epoch} epochs, {trainer.step} steps; last loss "
              f"{last.get('train_loss', float('nan')):.3f}; AP "
              f"{last.get('eval_AP', float('nan')):.3f}; checkpoints in {cfg.output_dir} "
              f"(best.pth: the model for eval/predict; last.pth: to --resume)")
    D.cleanup()
    return 0
