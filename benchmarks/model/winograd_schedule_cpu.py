"""The CPU Winograd RepConv kernel's two schedules inside the whole compiled detector: one
``rtdetr_fast.compile`` graph (640x640, batch 1, float32), whose Winograd layers are switched
between the "fused" (per strip of tile rows) and "unfused" (whole-layer transforms around one
threaded bmm) schedules with RTDETR_FAST_WINOGRAD_SCHEDULE, which the kernel reads on every call.
Each round runs every schedule once after one untimed call, in turn, so that the machine's drift
falls on all alike. The two schedules compute the same numbers (the outputs are compared).

Run: python benchmarks/model/winograd_schedule_cpu.py [preset ...] [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import rtdetr_fast
from rtdetr_fast import RTDETR

SCHEDULES = ("unfused", "fused", "auto")
ENV = "RTDETR_FAST_WINOGRAD_SCHEDULE"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", default=["rtdetr_r18vd", "rtdetr_r50vd"])
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"rounds {args.rounds}, 1x3x640x640 float32")
    before = os.environ.get(ENV)
    try:
        for preset in args.presets:
            torch.manual_seed(0)
            fast = rtdetr_fast.compile(RTDETR.from_name(preset).eval())
            x = torch.rand(1, 3, 640, 640)
            times = {s: [] for s in SCHEDULES}
            with torch.inference_mode():
                outs = {}
                for s in SCHEDULES:
                    os.environ[ENV] = s
                    outs[s] = fast(x)  # the first call compiles
                for s in SCHEDULES[1:]:
                    for k in outs[s]:
                        torch.testing.assert_close(outs[s][k], outs[SCHEDULES[0]][k])
                for _ in range(args.rounds):
                    for s in SCHEDULES:
                        os.environ[ENV] = s
                        fast(x)
                        t = time.perf_counter()
                        fast(x)
                        times[s].append((time.perf_counter() - t) * 1e3)
            base = statistics.median(times["unfused"])
            for s, v in times.items():
                med = statistics.median(v)
                print(f"{preset} {s:8s} median {med:7.1f} ms  min {min(v):7.1f}  "
                      f"max {max(v):7.1f}  unfused / this {base / med:.2f}x")
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


if __name__ == "__main__":
    main()
