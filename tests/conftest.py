import functools
import importlib
import importlib.util
import os
import pathlib
from typing import Optional

# MKL picks its GEMM code path by processor, and its AVX-512 path rounds float64 products
# differently from the path the recorded official outputs (tests/data) were made with: up to
# 2.4e-7 in the v2 logits on an AVX-512 Xeon against a 1e-12 bound. Its conditional numerical
# reproducibility mode gives the same bits on every x86-64 processor; MKL reads it at its first
# call, so it is set before torch is imported.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import torch  # noqa: E402

# Without a GPU, Triton kernels are tested in Triton's interpreter. triton reads
# TRITON_INTERPRET when it is first imported (and when each kernel is defined), so it is set
# before any test module can import triton; auto backend selection never picks the
# interpreter, so only tests that force the triton backend run through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
KEY_FILES = {
    "rtdetr_r18vd": "v1_r18.txt",
    "rtdetr_r34vd": "v1_r34.txt",
    "rtdetr_r50vd_m": "v1_r50m.txt",
    "rtdetr_r50vd": "v1_r50.txt",
    "rtdetr_r101vd": "v1_r101.txt",
    "rtdetrv2_r18vd": "v2_r18.txt",
    "rtdetrv2_r34vd": "v2_r34.txt",
    "rtdetrv2_r50vd_m": "v2_r50m.txt",
    "rtdetrv2_r50vd": "v2_r50.txt",
    "rtdetrv2_r101vd": "v2_r101.txt",
}


def reference_keys(preset: str):
    """The official checkpoint's state-dict lines: 'key (shape) dtype'."""
    with open(DATA / "checkpoint_keys" / KEY_FILES[preset]) as f:
        return [line.strip() for line in f if line.strip()]


def randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every (frozen) batch norm non-trivial statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and hasattr(m, "running_mean"):
                n = m.running_var.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def r18():
    """A small-input rtdetr_r18vd in eval mode with trained-looking batch norms (shared)."""
    from rtdetr_fast import RTDETR

    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd").eval()
    randomize_batch_norms(model)
    return model


# A probe of Triton's interpreter: a loop bound read from a runtime argument. Triton 3.6's
# interpreter converts it with int() of a one-element array, which numpy 2.5 refuses ("only
# 0-dimensional arrays can be converted to Python scalars"), so every interpreted kernel with
# such a loop fails there; newer Triton releases convert it themselves. Run in a child process:
# triton fixes its interpreter mode when it is first imported.
_TRITON_PROBE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl

@triton.jit
def k(x_ptr, n):
    for i in range(0, n, 2):
        tl.store(x_ptr + i, i)

x = torch.zeros(6)
k[(1,)](x, 6)
assert x.tolist() == [0, 0, 2, 0, 4, 0], x
"""


def module_missing(name: str) -> Optional[str]:
    """A skip reason when ``name`` cannot be imported, else None."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # a broken install skips as a missing one does
        return f"needs {name} ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> Optional[str]:
    """A skip reason when Triton's interpreter cannot run this project's kernels, else None.
    The answer is passed to child processes in the environment (one probe per run)."""
    known = os.environ.get("RTDETR_FAST_TRITON_INTERPRETER")
    if known is not None:
        return None if known == "ok" else known
    if importlib.util.find_spec("triton") is None:
        reason = "needs triton (its interpreter runs the Triton kernels on the CPU)"
    else:
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-c", _TRITON_PROBE], capture_output=True,
                              text=True, timeout=300)
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = None if proc.returncode == 0 else (
            "needs a newer Triton interpreter: this triton's fails a loop over a runtime "
            f"bound ({lines[-1] if lines else 'exit status %d' % proc.returncode})")
    os.environ["RTDETR_FAST_TRITON_INTERPRETER"] = reason or "ok"
    return reason


# marker -> the check that gives a skip reason (None: runs). One place for what a test needs
# beyond the package's own dependencies; the markers are declared in pyproject.toml.
NEEDS = {
    "cuda": lambda: None if torch.cuda.is_available() else "needs a CUDA device",
    "pycocotools": lambda: module_missing("pycocotools"),
    "triton_interpreter": triton_interpreter_problem,
}


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for name in NEEDS:
            if item.get_closest_marker(name) is None:
                continue
            if name not in reasons:
                reasons[name] = NEEDS[name]()
            if reasons[name]:
                item.add_marker(pytest.mark.skip(reason=reasons[name]))
                break


class _ScalarModel(torch.nn.Module):
    """One parameter and the model's training contract (loss and loss_dict): the Trainer's
    bookkeeping without the detector's cost."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        loss = (self.w * images.mean()) ** 2
        return {"loss": loss, "loss_dict": {"loss_x": loss}}


@pytest.fixture
def make_scalar_model():
    """A factory: each call is a fresh model."""
    return _ScalarModel


def run_baseline_child(*pytest_args: str, timeout: int = 900) -> None:
    """Run pytest on ``pytest_args`` in a child process forced onto the baseline x86-64 CPU
    kernels (RTDETR_FAST_NO_AVX2=1: the CPU kernels exist twice, baseline and AVX2+FMA, chosen
    at run time) and assert that it passed something and failed nothing."""
    import subprocess
    import sys

    env = dict(os.environ, RTDETR_FAST_NO_AVX2="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *pytest_args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.strip().splitlines()[-1], tail
