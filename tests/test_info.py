"""``python -m rtdetr_fast.info --check``: every op against its reference, and a loud failure on
a kernel that computes something else."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from rtdetr_fast import info
from rtdetr_fast.ops import _backend

HAS_NATIVE_CPU = _backend.extension_has("ms_deform_attn", "cpu")
needs_native = pytest.mark.skipif(not HAS_NATIVE_CPU, reason="rtdetr_fast._C not built")
OPS = ("ms_deform_attn", "rep_conv", "topk_select", "topk_detections")


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_check_passes_on_the_cpu_for_every_backend():
    # the user's command, in a fresh process: no TRITON_INTERPRET, so triton is not a CPU
    # backend there (its interpreter has its own test below)
    proc = subprocess.run([sys.executable, "-m", "rtdetr_fast.info", "--check", "--device", "cpu"],
                          env=_child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln.startswith("cpu ")]
    assert rows and all("pass" in r for r in rows), proc.stdout
    assert proc.stdout.rstrip().endswith(f"check: {len(rows)} passed, 0 failed")
    for op in OPS:
        for dtype in ("float32", "float64"):
            got = {r[-5] for r in rows if r[1] == op and dtype in r}  # the backend column
            want = {"reference"} | ({"native"} if HAS_NATIVE_CPU else set())
            assert want <= got, (op, dtype, got)


@pytest.mark.triton_interpreter
def test_check_passes_for_triton_in_its_interpreter():
    proc = subprocess.run([sys.executable, "-m", "rtdetr_fast.info", "--check", "--device", "cpu",
                           "--backend", "triton"], env=_child_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("cpu ")]
    assert {r.split()[1] for r in rows} == set(OPS), proc.stdout
    assert all(" triton " in r and " pass " in r for r in rows), proc.stdout


def _break(monkeypatch, op, backend, corrupt):
    """Replace ``backend``'s implementation of ``op`` by one whose result is ``corrupt``ed."""
    impl, supports = _backend._REGISTRY[op][backend]

    @functools.wraps(impl)  # keeps the attributes the dispatcher reads (methods, ...)
    def broken(*args, **kwargs):
        return corrupt(impl(*args, **kwargs))

    monkeypatch.setitem(_backend._REGISTRY[op], backend, (broken, supports))


def _scaled(out):
    return out * 1.01


def _swapped_indices(out):
    scores, idx, tensors = out
    return scores, idx.flip(-1), tensors


def _nan_box(out):
    scores, labels, boxes = out
    boxes = boxes.clone()
    boxes[0, 0, 0] = float("nan")
    return scores, labels, boxes


@needs_native
@pytest.mark.parametrize("op,corrupt", [("ms_deform_attn", _scaled), ("rep_conv", _scaled),
                                        ("topk_select", _swapped_indices),
                                        ("topk_detections", _nan_box)])
def test_check_fails_loudly_on_a_broken_kernel(monkeypatch, capsys, op, corrupt):
    _break(monkeypatch, op, "native", corrupt)
    rows = info.check(devices=["cpu"], backends=["native"], ops_=[op, "topk_select"])
    bad = [r for r in rows if not r.ok]
    assert bad and {r.op for r in bad} == {op}, [(r.op, r.dtype, r.err) for r in rows]
    assert all(r.backend == "native" for r in bad)
    # and the command says so: a FAIL row, the count, and exit status 1
    assert info.main(["--check", "--device", "cpu", "--backend", "native", "--op", op]) == 1
    out = capsys.readouterr().out
    assert " FAIL " in out and f"{len(bad)} failed" in out


@needs_native
def test_check_fails_on_a_kernel_that_raises(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(_backend._REGISTRY["topk_select"], "native",
                        (boom, _backend._REGISTRY["topk_select"]["native"][1]))
    rows = info.check(devices=["cpu"], backends=["native"], ops_=["topk_select", "rep_conv"])
    bad = [r for r in rows if not r.ok]
    assert bad and all(r.op == "topk_select" and "illegal memory" in r.note for r in bad)


def test_check_of_a_device_that_is_absent_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert info.main(["--check", "--device", "cuda"]) == 2
