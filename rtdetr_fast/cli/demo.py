"""``rtdetr-fast demo``: synthetic data, training, evaluation and drawn detections, no
download (:func:`rtdetr_fast.engine.demo.run_demo`)."""
from __future__ import annotations

from ._checks import UsageError, check_device, check_int, check_output_folder
from ._model import torch_device


def add_parser(sub):
    s = sub.add_parser("demo", help="synthetic data, train, evaluate, draw: no download")
    s.add_argument("--out", default="demo_output", help="folder for data, checkpoints, PNGs")
    s.add_argument("--epochs", type=int, default=12, help="training epochs")
    s.add_argument("--num-train", type=int, default=400, help="generated training images")
    s.add_argument("--num-val", type=int, default=60, help="generated held-out images")
    s.add_argument("--batch-size", type=int, default=8, help="images per step")
    s.add_argument("--time-budget", type=float, default=None,
                   help="stop training early so the run ends within this many seconds")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return s


def check(args) -> None:
    for dest in ("epochs", "num_train", "num_val", "batch_size"):
        check_int(args, dest, 1)
    check_int(args, "seed", 0)
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageError(f"--time-budget is in seconds, > 0, got {args.time_budget:g}")
    check_device(args.device)
    check_output_folder(args.out, "--out")


def run(args) -> int:
    from ..engine.demo import run_demo

    summary = run_demo(out_dir=args.out, epochs=args.epochs, num_train=args.num_train,
                       num_val=args.num_val, batch_size=args.batch_size,
                       time_budget=args.time_budget, device=str(torch_device(args.device)),
                       seed=args.seed, progress=not args.no_progress)
    return 0 if summary["metrics"] else 1
