"""The self-contained demo: a synthetic COCO set, training from scratch, COCO evaluation and
drawn detections (``rtdetr-fast demo``)."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

from ..data.synthetic import make_synthetic_coco
from ..model.rtdetr import RTDETR
from ..visualize import draw_detections
from .loaders import coco_datasets, coco_evaluate_fn, make_loader
from .seeding import seed_everything
from .train import TrainConfig, Trainer

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
