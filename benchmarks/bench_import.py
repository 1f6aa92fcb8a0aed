"""How long ``import rtdetr_fast`` takes beyond ``import torch``, and how fast the command line
answers ``--help`` and a mistake. Each measurement is a fresh interpreter; the table gives the
median and the best of ``--repeats`` runs, wall clock and CPU (user + system) seconds.

Run: python benchmarks/bench_import.py [--repeats 7] [--json out.json]
     python benchmarks/bench_import.py --pythonpath OTHER_TREE   (the package of another tree,
     e.g. an older commit's rtdetr_fast/ extracted with git archive and given the built
     extension, to compare)

"beyond torch" is measured inside one interpreter: ``import torch`` first, then the clock runs
over ``import rtdetr_fast; rtdetr_fast.RTDETR`` (the model class: what using the package needs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BEYOND_TORCH = ("import time, torch\n"
                "w, c = time.perf_counter(), time.process_time()\n"
                "import rtdetr_fast\n"
                "rtdetr_fast.RTDETR\n"
                "print('BEYOND', time.perf_counter() - w, time.process_time() - c)\n")

# python -m rtdetr_fast ARGS, as code (so that --pythonpath can come first)
CLI = ("import runpy, sys\nsys.argv = ['rtdetr_fast', {}]\n"
       "runpy.run_module('rtdetr_fast', run_name='__main__')")

CASES = [
    ("python -c pass", "pass"),
    ("import torch", "import torch"),
    ("import rtdetr_fast", "import rtdetr_fast"),
    ("import torch, rtdetr_fast; rtdetr_fast.RTDETR",
     "import torch, rtdetr_fast; rtdetr_fast.RTDETR"),
    ("python -m rtdetr_fast --help", CLI.format("'--help'")),
    ("python -m rtdetr_fast eval --data /nonexistent (an error)",
     CLI.format("'eval', '--data', '/nonexistent', '--checkpoint', 'x.pth'")),
]


def tree_first(path: str) -> str:
    """Code that makes ``import rtdetr_fast`` find the package under ``path``, ahead of an
    editable install's finder."""
    return (f"import sys\nsys.path.insert(0, {path!r})\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n")


def run(code, prefix=""):
    """(wall s, CPU s, stdout) of one interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--pythonpath", help="import rtdetr_fast from this folder (another tree)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    prefix = tree_first(os.path.abspath(args.pythonpath)) if args.pythonpath else ""
    where = run("import rtdetr_fast; print(rtdetr_fast.__file__)", prefix)[2].strip()
    rows = {}
    for name, code in CASES:
        runs = [run(code, prefix if code != "pass" else "")[:2] for _ in range(args.repeats)]
        rows[name] = {"wall_median": statistics.median(r[0] for r in runs),
                      "wall_min": min(r[0] for r in runs),
                      "cpu_median": statistics.median(r[1] for r in runs),
                      "cpu_min": min(r[1] for r in runs)}
    beyond = []
    for _ in range(args.repeats):
        out = run(BEYOND_TORCH, prefix)[2]
        wall, cpu = out.split("BEYOND")[1].split()
        beyond.append((float(wall), float(cpu)))
    rows["beyond torch: import rtdetr_fast; rtdetr_fast.RTDETR (in-process)"] = {
        "wall_median": statistics.median(b[0] for b in beyond),
        "wall_min": min(b[0] for b in beyond),
        "cpu_median": statistics.median(b[1] for b in beyond),
        "cpu_min": min(b[1] for b in beyond)}

    import torch

    # the package's place: relative to here, or just "the --pythonpath tree"
    shown = "the --pythonpath tree" if args.pythonpath else os.path.relpath(where)
    print(f"package: {shown}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cpus, {args.repeats} runs each")
    width = max(len(k) for k in rows)
    print(f"{'':<{width}}  {'wall med':>8}  {'wall min':>8}  {'CPU med':>8}  {'CPU min':>8}  (s)")
    for name, r in rows.items():
        print(f"{name:<{width}}  {r['wall_median']:8.3f}  {r['wall_min']:8.3f}  "
              f"{r['cpu_median']:8.3f}  {r['cpu_min']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"package": shown, "torch": torch.__version__, "repeats": args.repeats,
                       "seconds": rows}, f, indent=1)


if __name__ == "__main__":
    main()
