"""Eval / deploy / compiled CPU latency of the whole detector, measured interleaved in one
process (640x640, batch 1, float32): each round calls the three forms once, in turn, so that the
machine's drift over minutes falls on all three alike. The pytest-benchmark file
(bench_rtdetr_cpu.py) times each form in its own block, minutes apart.

Run: python benchmarks/model/interleaved_cpu.py [preset ...] [--rounds N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import rtdetr_fast
from rtdetr_fast import RTDETR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", default=["rtdetr_r18vd", "rtdetr_r50vd"])
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"rounds {args.rounds}, 1x3x640x640 float32")
    for preset in args.presets:
        torch.manual_seed(0)
        model = RTDETR.from_name(preset).eval()
        forms = {"eval": model, "deploy": copy.deepcopy(model).deploy(),
                 "compiled": rtdetr_fast.compile(copy.deepcopy(model))}
        x = torch.rand(1, 3, 640, 640)
        times = {k: [] for k in forms}
        with torch.inference_mode():
            for f in forms.values():  # compile and warm up
                f(x)
                f(x)
            for _ in range(args.rounds):
                for k, f in forms.items():
                    t = time.perf_counter()
                    f(x)
                    times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{preset} {k:8s} median {med[k]:7.1f} ms  min {min(v):7.1f}  max {max(v):7.1f}"
                  f"  ratio vs eval (medians) {med['eval'] / med[k]:.2f}x")


if __name__ == "__main__":
    main()
