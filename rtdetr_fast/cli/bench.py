"""``rtdetr-fast bench``: a quick timing of the model and of each op per backend
(:func:`rtdetr_fast.bench.run_bench`)."""
from __future__ import annotations

from ._checks import DEFAULT_PRESET, DEFAULT_SIZE, check_int, check_model_args, parse_overrides
from ._model import add_model_args


def add_parser(sub):
    s = sub.add_parser("bench", help="time the model and each op per backend")
    s.add_argument("--batch", type=int, default=1, help="batch size")
    s.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    add_model_args(s)
    return s


def check(args) -> None:
    check_int(args, "batch", 1)
    check_int(args, "repeats", 1)
    check_model_args(args)


def run(args) -> int:
    from ..bench import run_bench

    run_bench(preset=args.preset or DEFAULT_PRESET, size=args.size or DEFAULT_SIZE,
              batch=args.batch, device=args.device,
              repeats=args.repeats, set_overrides=parse_overrides(args.set))
    return 0
