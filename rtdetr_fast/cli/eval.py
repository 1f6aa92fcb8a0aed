"""``rtdetr-fast eval``: COCO evaluation of a model on a dataset split, with per-class AP."""
from __future__ import annotations

import os

from . import _model
from ._checks import (CHECKPOINT_KINDS, UsageError, check_data_folder, check_int,
                      check_model_args, check_output_file)
from ._model import add_model_args, torch_device


def add_parser(sub):
    s = sub.add_parser("eval", help="COCO evaluation of a model on a dataset split")
    s.add_argument("--data", required=True, help="COCO folder, as for train")
    s.add_argument("--split", default="val", choices=["train", "val"], help="split to evaluate")
    s.add_argument("--batch-size", type=int, default=4, help="images per batch")
    s.add_argument("--workers", type=int, default=0, help="data loader processes")
    s.add_argument("--json", help="also write the metrics and per-class AP to this JSON file")
    add_model_args(s)
    return s


def check(args) -> None:
    for dest in ("batch_size",):
        check_int(args, dest, 1)
    check_int(args, "workers", 0)
    check_data_folder(args.data, (args.split,))
    if not args.checkpoint:
        raise UsageError("eval needs --checkpoint (" + CHECKPOINT_KINDS + ")")
    check_model_args(args)
    if args.json:
        check_output_file(args.json, "--json")


def run(args) -> int:
    from ..data.coco import CocoDetection
    from ..data.transforms import eval_transforms
    from ..engine.evaluate import CocoEvaluator, evaluate
    from ..engine.loaders import find_coco_split, make_loader

    images, ann = find_coco_split(args.data, args.split)
    model = _model.build_model(args)
    size = tuple(model.config.eval_spatial_size)
    ds = CocoDetection(images, ann, transforms=eval_transforms(size))
    if model.num_classes != ds.num_classes:
        raise ValueError(f"the checkpoint has {model.num_classes} classes, the {args.split} set "
                         f"of {args.data!r} has {ds.num_classes}; evaluate on data with the "
                         "same categories (or fine-tune with train --checkpoint first)")
    # the checkpoint's label -> category id mapping when it names the same ids as the data
    ids = list(model.config.category_ids)
    mapping = ids if ids and set(ids) == set(ds.label_to_cat_id) else ds.label_to_cat_id
    evaluator = CocoEvaluator(ds.coco, mapping)
    loader = make_loader(ds, args.batch_size, train=False, workers=args.workers)
    stats = evaluate(model, loader, torch_device(args.device), evaluator, progress=True)
    for k, v in stats.items():
        print(f"{k:<6} {v:.3f}")
    per_class = evaluator.per_class_ap()
    if per_class:
        width = max(8, *(len(r["name"]) for r in per_class))
        print(f"\n{'category':<{width}}  {'id':>4}  {'AP':>6}  {'AP50':>6}  {'objects':>7}")
        for r in per_class:
            print(f"{r['name']:<{width}}  {r['category_id']:>4}  {r['AP']:>6.3f}  "
                  f"{r['AP50']:>6.3f}  {r['objects']:>7}")
    if args.json:
        import json

        parent = os.path.dirname(args.json)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                       "input_size": list(size), "metrics": stats, "per_class": per_class},
                      f, indent=2)
        print(f"wrote {args.json}")
    return 0
