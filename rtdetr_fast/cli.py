"""``rtdetr-fast``: the command line. The only place argparse lives.

Verbs: train, eval, predict, bench, info, demo. Model options take a preset and ``key=value``
overrides (``--set num_queries=100 decoder.num_points=2``). Errors a user can fix (a missing
dataset, a wrong path, an unknown preset) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

EXIT_USAGE = 2


def _parse_overrides(items: List[str]) -> dict:
    """``key=value`` pairs; values are parsed as Python literals where possible."""
    import ast

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _device(name: str):
    import torch

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


def _build_model(args, num_classes: Optional[int] = None):
    from . import RTDETR

    overrides = _parse_overrides(args.set)
    if getattr(args, "size", None):
        overrides.setdefault("eval_spatial_size", (args.size, args.size))
    if args.checkpoint:
        model = RTDETR.from_pretrained(args.checkpoint, num_classes=num_classes, **overrides)
    else:
        model = RTDETR.from_name(args.preset, num_classes=num_classes or args.num_classes,
                                 **overrides)
    if getattr(args, "deploy", False):
        model.deploy()
    return model.to(_device(args.device))


def cmd_info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def cmd_predict(args) -> int:
    from .visualize import draw_detections

    model = _build_model(args).eval()
    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        det = model.predict(path, threshold=args.threshold)[0]
        name = os.path.splitext(os.path.basename(path))[0] + "_det.png"
        draw_detections(path, det).save(os.path.join(args.out, name))
        print(f"{path}: {len(det['scores'])} detections -> {os.path.join(args.out, name)}")
    return 0


def _datasets(args):
    from .engine.recipes import coco_datasets

    size = (args.size, args.size)
    return coco_datasets(args.data, size, augment=args.augment)


def cmd_train(args) -> int:
    import dataclasses

    from .engine import distributed as D
    from .engine.recipes import coco_evaluate_fn, make_loader
    from .engine.train import TrainConfig, Trainer
    from .data.transforms import MultiScaleCollate, collate_fn

    device = D.init_distributed(args.device)
    train_ds, val_ds = _datasets(args)
    model = _build_model(args, num_classes=train_ds.num_classes)
    collate = collate_fn
    if args.multi_scale:
        sizes = [s for s in range(int(args.size * 0.75) // 32 * 32, int(args.size * 1.25) + 1, 32)]
        collate = MultiScaleCollate(sizes=sizes, stop_epoch=args.epochs - args.stop_aug_epochs)
    loader = make_loader(train_ds, args.batch_size, train=True, workers=args.workers,
                         collate=collate, seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, backbone_lr=args.backbone_lr,
                      warmup_steps=args.warmup_steps, amp=args.amp, sync_bn=args.sync_bn,
                      output_dir=args.output_dir, ema=not args.no_ema,
                      max_steps_per_epoch=args.max_steps)
    evaluate_fn = coco_evaluate_fn(val_ds, args.batch_size, device, workers=args.workers,
                                   progress=D.is_main_process())
    trainer = Trainer(model, loader, cfg, evaluate_fn=evaluate_fn, device=device)
    if args.resume:
        trainer.resume(args.resume)
    records = trainer.fit()
    if D.is_main_process() and records:
        last = records[-1]
        print(f"trained {trainer.epoch} epochs, {trainer.step} steps; last loss "
              f"{last['train_loss']:.3f}; AP {last.get('eval_AP', float('nan')):.3f}; "
              f"checkpoints in {cfg.output_dir}")
    D.cleanup()
    return 0


def cmd_eval(args) -> int:
    from .engine.recipes import coco_evaluate_fn, find_coco_split
    from .data.coco import CocoDetection
    from .data.transforms import eval_transforms

    images, ann = find_coco_split(args.data, args.split)
    ds = CocoDetection(images, ann, transforms=eval_transforms((args.size, args.size)))
    model = _build_model(args, num_classes=None if args.checkpoint else ds.num_classes)
    stats = coco_evaluate_fn(ds, args.batch_size, _device(args.device))(model)
    for k, v in stats.items():
        print(f"{k:<6} {v:.3f}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(preset=args.preset, size=args.size, batch=args.batch, device=args.device,
              repeats=args.repeats, set_overrides=_parse_overrides(args.set))
    return 0


def cmd_demo(args) -> int:
    from .engine.recipes import run_demo

    summary = run_demo(out_dir=args.out, epochs=args.epochs, num_train=args.num_train,
                       num_val=args.num_val, batch_size=args.batch_size,
                       time_budget=args.time_budget, device=str(_device(args.device)),
                       seed=args.seed, progress=not args.no_progress)
    return 0 if summary["metrics"] else 1


def build_parser() -> argparse.ArgumentParser:
    from .config import list_presets

    p = argparse.ArgumentParser(prog="rtdetr-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, size=640):
        sp.add_argument("--preset", default="rtdetr_r18vd", choices=list_presets())
        sp.add_argument("--checkpoint", help="official .pth, HF folder or save_pretrained folder")
        sp.add_argument("--num-classes", type=int, default=80)
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--size", type=int, default=size, help="square input size")
        sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. num_queries=100")

    s = sub.add_parser("info", help="versions, extension build, backends per op and device")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("predict", help="detect objects in images and write annotated PNGs")
    s.add_argument("images", nargs="+")
    s.add_argument("--out", default="outputs")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--deploy", action="store_true", help="fold RepConv blocks first")
    model_args(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("train", help="train on a COCO-format dataset (torchrun for DDP)")
    s.add_argument("--data", required=True,
                   help="COCO folder: train2017/ val2017/ (or train/ val/) + annotations/")
    s.add_argument("--epochs", type=int, default=72)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--backbone-lr", type=float, default=1e-5)
    s.add_argument("--warmup-steps", type=int, default=2000)
    s.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    s.add_argument("--resume", help="a last.pth written by this command")
    s.add_argument("--output-dir", default="outputs/train")
    s.add_argument("--augment", choices=["official", "light", "none"], default="official")
    s.add_argument("--multi-scale", action="store_true", help="random size per batch")
    s.add_argument("--stop-aug-epochs", type=int, default=2,
                   help="final epochs without multi-scale")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--sync-bn", action="store_true")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    s.add_argument("--seed", type=int, default=0)
    model_args(s)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="COCO evaluation of a model on a dataset split")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="val", choices=["train", "val"])
    s.add_argument("--batch-size", type=int, default=4)
    model_args(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="time the model and each op per backend")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    model_args(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="synthetic data, train, evaluate, draw: no download")
    s.add_argument("--out", default="demo_output")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--num-train", type=int, default=400)
    s.add_argument("--num-val", type=int, default=60)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--time-budget", type=float, default=None,
                   help="stop training early so the run ends within this many seconds")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine.train import TrainingDiverged
    from .model.checkpoint import CheckpointError

    try:
        return args.fn(args)
    except (FileNotFoundError, CheckpointError, ValueError, TrainingDiverged) as exc:
        print(f"rtdetr-fast {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"rtdetr-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
