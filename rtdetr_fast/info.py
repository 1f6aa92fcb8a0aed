"""``python -m rtdetr_fast.info``: versions, how the extension was built, and which backend each
op has on each device.

``python -m rtdetr_fast.info --check`` runs every op on every available device and backend
against its reference (small shapes, forward and backward where the op has a gradient, each
dtype the device's kernels take) and prints a table of pass/fail and the largest error; the exit
status is 1 when any case fails. On a CUDA device it is the first check of the kernels.
"""
from __future__ import annotations

import argparse
import platform
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def collect() -> dict:
    import torch

    from . import __version__
    from .ops import _backend

    info = {
        "rtdetr_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # a broken triton install must not break info
        info["triton"] = f"not available ({type(exc).__name__})"
    ext = _backend.extension()
    if ext is None:
        info["extension"] = "not built (reference and Triton backends only)"
    else:
        flags = ext.build_info()
        info["extension"] = ", ".join(f"{k}={v}" for k, v in sorted(flags.items()))
    info["backends"] = _backend.table()
    return info


# ------------------------------------------------------------------------------- --check
#
# Every case is compared with the reference run in float64 on the CPU on the same (rounded)
# inputs. The error is the largest absolute difference over the output and every gradient,
# each divided by the largest magnitude of its float64 reference (at least 1). A case passes
# when that is within the dtype's bound, or within twice the error of the reference backend
# itself on the same device and dtype (which is what torch's own float32 convolution under TF32,
# or a float16 grid_sample, gets). Top-K indices and labels must be equal to the reference's.

# the dtypes each device's kernels take (float64 runs on the CPU kernels; CUDA's take the
# half types and float32)
DTYPES = {"cpu": ("float32", "float64"), "cuda": ("float32", "float16", "bfloat16")}
BOUND = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 6e-2}
# the reference backend's rows: torch's own ops, bounded for TF32 in float32
BOUND_REFERENCE = {"float64": 1e-9, "float32": 5e-3, "float16": 1e-2, "bfloat16": 6e-2}


class CheckRow:
    def __init__(self, device, op, case, backend, dtype):
        self.device, self.op, self.case, self.backend, self.dtype = (device, op, case, backend,
                                                                     dtype)
        self.ok: Optional[bool] = None
        self.err: Optional[float] = None
        self.bound: Optional[float] = None
        self.note = ""


def _rel_err(got, want) -> float:
    import torch

    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    scale = max(1.0, want.abs().max().item())
    d = (got - want).abs()
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() / scale


def _gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


# each case: (make(device, dtype) -> inputs, run(inputs) -> [tensors to compare], the positions
# of those that must be equal, and optionally True: compare with the reference run on the
# device in the case's dtype rather than with float64 on the CPU)
def _msda_case(num_points: Optional[List[int]], method: str, backward: bool = True):
    import torch

    from . import ops

    B, Q, H, D = 2, 5, 2, 8
    shapes = [(6, 5), (3, 4), (1, 1)]
    L = len(shapes)
    P = 3

    def make(device, dtype):
        g = _gen(1)
        S = sum(h * w for h, w in shapes)
        value = torch.randn(B, S, H, D, generator=g)
        if num_points is None:
            loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1
            attn = torch.rand(B, Q, H, L, P, generator=g)
        else:
            N = sum(num_points)
            loc = torch.rand(B, Q, H, N, 2, generator=g) * 1.2 - 0.1
            attn = torch.rand(B, Q, H, N, generator=g)
        grad = torch.randn(B, Q, H * D, generator=g)
        return [t.to(device=device, dtype=dtype) for t in (value, loc, attn, grad)]

    def run(inputs):
        value, loc, attn, grad = inputs
        if not backward:
            with torch.no_grad():
                return [ops.ms_deform_attn(value, shapes, None, loc, attn, num_points,
                                           method=method)]
        leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
        out = ops.ms_deform_attn(leaves[0], shapes, None, leaves[1], leaves[2], num_points,
                                 method=method)
        grads = torch.autograd.grad(out, leaves, grad)
        return [out, *grads]

    return make, run, ()


def _rep_conv_case():
    import torch

    from . import ops

    def make(device, dtype):
        g = _gen(2)
        C_in, C_out = 64, 64  # wide enough for the CPU's Winograd kernel; C_in % 8 for CUDA's
        x = torch.randn(2, C_in, 9, 7, generator=g)
        w = torch.randn(C_out, C_in, 3, 3, generator=g) / 24
        b = torch.randn(C_out, generator=g)
        x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return [x, w, b.to(device=device, dtype=dtype)]

    def run(inputs):
        x, w, b = inputs
        # a deploy-time op: forward only (inputs that need a gradient run the reference)
        with torch.no_grad():
            return [ops.rep_conv(x, w, b, "silu")]

    return make, run, ()


def _topk_select_case():
    import torch

    from . import ops

    B, N, C, K = 2, 500, 7, 40

    def make(device, dtype):
        g = _gen(3)
        logits = torch.randn(B, N, C, generator=g)
        boxes = torch.rand(B, N, 4, generator=g)
        g_scores = torch.randn(B, K, generator=g)
        g_boxes = torch.randn(B, K, 4, generator=g)
        return [t.to(device=device, dtype=dtype) for t in (logits, boxes, g_scores, g_boxes)]

    def run(inputs):
        logits, boxes, g_scores, g_boxes = inputs
        leaves = [logits.detach().requires_grad_(), boxes.detach().requires_grad_()]
        scores, idx, (picked,) = ops.topk_select(leaves[0], K, [leaves[1]])
        grads = torch.autograd.grad([scores, picked], leaves, [g_scores, g_boxes])
        return [scores, idx, picked, *grads]

    return make, run, (1,)  # the indices


def _topk_detections_case():
    import torch

    from . import ops

    B, Q, C, K = 2, 60, 11, 50

    def make(device, dtype):
        g = _gen(4)
        logits = torch.randn(B, Q, C, generator=g) * 3
        boxes = torch.rand(B, Q, 4, generator=g)
        sizes = torch.tensor([[480, 640], [333, 500]], dtype=torch.int64)
        return [logits.to(device, dtype), boxes.to(device, dtype), sizes.to(device)]

    def run(inputs):
        with torch.no_grad():  # post-processing: no gradient
            scores, labels, xyxy = ops.topk_detections(*inputs, K)
        return [scores, labels, xyxy]

    # the labels; scores tie in float16/bfloat16 after the sigmoid (and ties go to the lower
    # index), so the order is compared with the reference run in the same dtype on the device
    return make, run, (1,), True


def _cases() -> Dict[str, Dict[str, tuple]]:
    return {
        "ms_deform_attn": {
            "bilinear": _msda_case(None, "default"),
            "points per level": _msda_case([3, 2, 1], "default"),
            "discrete": _msda_case([3, 2, 1], "discrete"),
        },
        "rep_conv": {"silu, forward": _rep_conv_case()},
        "topk_select": {"K=40 of 500": _topk_select_case()},
        "topk_detections": {"K=50 of 60x11": _topk_detections_case()},
    }


def _run_backend(backend: str, run: Callable, inputs) -> list:
    from . import ops

    with ops.backend(backend):
        return run(inputs)


def _as64(inputs):
    import torch

    return [t.to("cpu", torch.float64) if t.is_floating_point() else t.to("cpu")
            for t in inputs]


def _compare(got: Sequence, want: Sequence, exact: Sequence[int]) -> float:
    import torch

    if len(got) != len(want):
        return float("inf")
    err = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if i in exact:
            if not torch.equal(a.cpu(), b.cpu()):
                return float("inf")
            continue
        e = _rel_err(a, b)
        if e != e:  # NaN
            return e
        err = max(err, e)
    return err


def _max_pool_rows(devices: Sequence[str]) -> List[CheckRow]:
    """The CPU stem's max pool kernel (the extension's, CPU only) against torch's."""
    import torch
    import torch.nn.functional as F

    from .ops import max_pool as pool

    rows = []
    if "cpu" not in devices or not pool.available():
        return rows
    for dtype in DTYPES["cpu"]:
        row = CheckRow("cpu", "max_pool_3x3_s2", "[2, 5, 9, 8]", "native", dtype)
        try:
            x = torch.randn(2, 5, 9, 8, generator=_gen(5), dtype=getattr(torch, dtype))
            with torch.no_grad():
                got = pool.max_pool_3x3_s2(x)
            want = F.max_pool2d(x, 3, stride=2, padding=1)
            row.err = 0.0 if torch.equal(got, want) else float("inf")
            row.bound, row.ok = 0.0, row.err == 0.0
            row.note = "exact"
        except Exception as exc:
            row.ok, row.note = False, f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def check(devices: Optional[Sequence[str]] = None, backends: Optional[Sequence[str]] = None,
          ops_: Optional[Sequence[str]] = None, verbose: bool = False) -> List[CheckRow]:
    """Run every op on every device and backend against the reference; one row per case.
    ``devices``/``backends``/``ops_`` narrow the selection (default: all available)."""
    import torch

    from .ops import _backend

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: List[CheckRow] = []
    for device in devices:
        for op, cases in _cases().items():
            if ops_ is not None and op not in ops_:
                continue
            # the reference first: its error is the yardstick of the others
            order = ["reference"] + [b for b in _backend.available_backends(device, op)
                                     if b != "reference" and (backends is None or b in backends)]
            for case, spec in cases.items():
                make, run, exact = spec[:3]
                same_dtype = len(spec) > 3 and spec[3]
                for dtype in DTYPES[device]:
                    ref_err = None
                    want = None
                    pending = []
                    for backend in order:
                        row = CheckRow(device, op, case, backend, dtype)
                        try:
                            inputs = make(device, getattr(torch, dtype))
                            if want is None:
                                want = _run_backend("reference", run,
                                                    inputs if same_dtype else _as64(inputs))
                            got = _run_backend(backend, run, inputs)
                            if device == "cuda":
                                torch.cuda.synchronize()
                            row.err = _compare(got, want, exact)
                            if backend == "reference":
                                ref_err = row.err
                                row.bound = BOUND_REFERENCE[dtype]
                            else:
                                row.bound = BOUND[dtype]
                                if ref_err is not None and ref_err == ref_err:
                                    row.bound = max(row.bound, 2 * ref_err)
                            row.ok = row.err <= row.bound  # False for NaN
                        except Exception as exc:
                            row.ok = False
                            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                            if verbose:
                                traceback.print_exc()
                        pending.append(row)
                    for row in pending:
                        if backends is None or row.backend in backends:
                            rows.append(row)
    if ops_ is None or "max_pool_3x3_s2" in ops_:
        rows += [r for r in _max_pool_rows(devices)
                 if backends is None or r.backend in backends]
    return rows


def print_check(rows: Sequence[CheckRow], out=None) -> None:
    out = out or sys.stdout
    head = f"{'device':<7}{'op':<17}{'case':<18}{'backend':<10}{'dtype':<10}{'result':<7}" \
           f"{'max error':>11}{'bound':>10}  note"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        err = "-" if r.err is None else f"{r.err:.2e}"
        bound = "-" if r.bound is None else f"{r.bound:.0e}"
        print(f"{r.device:<7}{r.op:<17}{r.case:<18}{r.backend:<10}{r.dtype:<10}"
              f"{'pass' if r.ok else 'FAIL':<7}{err:>11}{bound:>10}  {r.note}", file=out)
    failed = sum(not r.ok for r in rows)
    print(f"\ncheck: {len(rows) - failed} passed, {failed} failed", file=out)


def _print_info() -> None:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print()
    print(f"{'op':<18}{'cpu':<32}cuda")
    for op, devs in backends.items():
        print(f"{op:<18}{', '.join(devs['cpu']) or '-':<32}{', '.join(devs['cuda']) or '-'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtdetr_fast.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="run every op on every device and backend against its reference")
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="with --check: only this device (repeatable)")
    parser.add_argument("--backend", action="append", choices=("native", "triton", "reference"),
                        help="with --check: only this backend (repeatable)")
    parser.add_argument("--op", action="append",
                        choices=tuple(_cases()) + ("max_pool_3x3_s2",),
                        help="with --check: only this op (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --check: print the traceback of a case that raises")
    args = parser.parse_args(argv)
    _print_info()
    if not args.check:
        return 0
    import torch

    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        print("\ncheck: no CUDA device visible to torch", file=sys.stderr)
        return 2
    print()
    rows = check(devices=args.device, backends=args.backend, ops_=args.op, verbose=args.verbose)
    print_check(rows)
    if not rows:
        print("check: nothing was run", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
