"""``rtdetr-fast``: the command line. The only place argparse lives."""
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
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _build_model(args):
    import torch

    from . import RTDETR

    overrides = _parse_overrides(args.set or [])
    if args.checkpoint:
        model = RTDETR.from_pretrained(args.checkpoint, **overrides)
    else:
        model = RTDETR.from_name(args.preset, num_classes=args.num_classes, **overrides)
    if args.deploy:
        model.deploy()
    return model.to(torch.device(args.device)).eval()


def cmd_info(args) -> int:
    from .info import main as info_main

    info_main()
    return 0


def cmd_predict(args) -> int:
    from .visualize import draw_detections

    model = _build_model(args)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        det = model.predict(path, threshold=args.threshold)[0]
        name = os.path.splitext(os.path.basename(path))[0] + "_det.png"
        draw_detections(path, det).save(os.path.join(args.out, name))
        print(f"{path}: {len(det['scores'])} detections -> {os.path.join(args.out, name)}")
    return 0


def cmd_demo(args) -> int:
    """Detection on a generated scene with a randomly initialised model (no download)."""
    import torch
    from PIL import Image

    from .data.synthetic import make_scene
    from .visualize import draw_detections

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    image, truth = make_scene(480, 640, num_objects=6, seed=args.seed)
    scene = os.path.join(args.out, "scene.png")
    Image.fromarray(image).save(scene)
    print(f"generated {scene} with {len(truth['labels'])} objects")
    print(f"building {args.preset} with RANDOM weights (no checkpoint is downloaded: the "
          "detections below are untrained and show the pipeline, not accuracy)")
    model = _build_model(args)
    model.predict(image, threshold=1.0)  # warm-up
    t0 = time.perf_counter()
    det = model.predict(image, threshold=args.threshold)[0]
    dt = time.perf_counter() - t0
    det = {k: v[:args.top] for k, v in det.items()}
    out = os.path.join(args.out, "detections.png")
    draw_detections(image, det).save(out)
    print(f"predict: {dt * 1000:.0f} ms on {args.device} at "
          f"{model.config.eval_spatial_size[0]}x{model.config.eval_spatial_size[1]}; "
          f"showing the top {len(det['scores'])} detections with score >= {args.threshold}")
    for box, score, label in list(zip(det["boxes"].tolist(), det["scores"].tolist(),
                                      det["labels"].tolist()))[:5]:
        print(f"  label {label:3d}  score {score:.3f}  box "
              + " ".join(f"{v:7.1f}" for v in box))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import list_presets

    p = argparse.ArgumentParser(prog="rtdetr-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, threshold):
        sp.add_argument("--preset", default="rtdetr_r18vd", choices=list_presets())
        sp.add_argument("--checkpoint", help="official .pth, HF folder or save_pretrained folder")
        sp.add_argument("--num-classes", type=int, default=80)
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--deploy", action="store_true", help="fold RepConv blocks first")
        sp.add_argument("--threshold", type=float, default=threshold)
        sp.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")

    s = sub.add_parser("info", help="versions, extension build, backends per op and device")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("predict", help="detect objects in images and write annotated PNGs")
    s.add_argument("images", nargs="+")
    s.add_argument("--out", default="outputs")
    model_args(s, 0.5)
    s.set_defaults(fn=cmd_predict)
    s = sub.add_parser("demo", help="detection on a generated scene, no download")
    s.add_argument("--out", default="demo_output")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--top", type=int, default=10, help="detections drawn and printed")
    model_args(s, 0.0)
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        print(f"rtdetr-fast {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
