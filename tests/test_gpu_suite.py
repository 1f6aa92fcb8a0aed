"""scripts/gpu_suite.sh, the one call made on a lent GPU machine: its plan fits the budget, and
what it runs imports nothing outside the GPU image's packages."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.sh"
LIMIT_S = 480

# The GPU image: Python, torch (with its own dependencies), triton, numpy, onnx, onnxruntime,
# pytest, pytest-benchmark. Import names of the package's declared dependencies, and the
# optional tools it may reach for, that the image does not have:
NOT_IN_IMAGE = {"scipy", "PIL", "tqdm", "safetensors", "pycocotools", "tensorrt", "onnxscript",
                "pybind11", "transformers", "torchvision", "cv2"}
IMPORT_NAME = {"pillow": "PIL"}


def _plan():
    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True,
                          timeout=60)
    steps = [(m.group(1), int(m.group(2))) for m in
             re.finditer(r"^plan: (\S+)\s+(\d+) s", proc.stdout, re.MULTILINE)]
    return proc, steps


def test_plan_fits_the_budget():
    proc, steps = _plan()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = dict(steps).pop("total")
    named = [(n, b) for n, b in steps if n != "total"]
    assert named and all(b > 0 for _, b in named)
    assert sum(b for _, b in named) == total <= LIMIT_S, proc.stdout


def test_every_planned_step_exists_and_runs_under_its_budget():
    _, steps = _plan()
    text = SCRIPT.read_text()
    names = [n for n, _ in steps if n != "total"]
    assert len(names) == len(set(names))
    for n in names:
        assert re.search(rf"^step_{n}\(\) {{", text, re.MULTILINE), f"no step_{n}"
    # each step runs under timeout with its budget, in the order of the plan
    assert re.search(r'timeout --kill-after=\d+ "\$limit" bash "\$SELF" --step', text)
    assert 'limit=$budget' in text
    # nothing calls bare python or pip, and pip never reaches for an index
    for line in text.splitlines():
        code = line.split("#")[0]
        assert not re.search(r"(^|[;(|&]|\bthen|\bdo|\bif)\s*(python|pip)\s", code), line


def test_the_plan_is_what_the_dry_run_prints():
    text = SCRIPT.read_text()
    assert re.search(r'--dry-run\) MODE=dry', text)
    assert "print_plan | tee -a" in text


def _declared_not_in_image():
    """The package's dependencies (pyproject.toml) that the GPU image lacks, as import names."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.MULTILINE | re.DOTALL).group(1)
    names = set()
    for d in re.findall(r'"([^"]+)"', deps):
        name = re.match(r"[A-Za-z0-9_.-]+", d).group(0)
        names.add(IMPORT_NAME.get(name.lower(), name.replace("-", "_")))
    return names - {"torch", "triton", "numpy", "ninja"}


def _blocked_env(tmp_path, blocked):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        BLOCKED = {sorted(blocked)!r}

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not in the GPU image")
                return None

        sys.meta_path.insert(0, _Block())
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("TRITON_INTERPRET", None)
    return env


def test_the_blocker_blocks(tmp_path):
    # the hook itself: a blocked module fails to import (so the tests below can fail)
    env = _blocked_env(tmp_path, {"json"})
    proc = subprocess.run([sys.executable, "-c", "import json"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "not in the GPU image" in proc.stderr


def test_import_needs_only_the_image_packages(tmp_path):
    blocked = NOT_IN_IMAGE | _declared_not_in_image()
    assert {"scipy", "pycocotools", "PIL"} <= blocked
    env = _blocked_env(tmp_path, blocked)
    code = textwrap.dedent("""
        import torch
        import rtdetr_fast, rtdetr_fast.info, rtdetr_fast.ops
        from rtdetr_fast import RTDETR
        model = RTDETR.from_name("rtdetr_r18vd").eval()
        with torch.no_grad():
            out = model(torch.rand(1, 3, 128, 128))
            model.deploy()
            out = model(torch.rand(1, 3, 128, 128))
        assert out["pred_boxes"].shape[-1] == 4
        rows = rtdetr_fast.info.check(devices=["cpu"], ops_=["topk_select"])
        assert rows and all(r.ok for r in rows)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_the_gpu_selections_collect_with_the_image_packages(tmp_path):
    # what the suite's test and benchmark steps import, under the same blocker
    env = _blocked_env(tmp_path, NOT_IN_IMAGE | _declared_not_in_image())
    for args in (["-m", "cuda", "tests/ops", "tests/model/test_no_host_sync.py",
                  "tests/model/test_fast_path.py"],
                 ["benchmarks/ops", "benchmarks/model/bench_rtdetr_cuda.py"]):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                               "-p", "no:cacheprovider", *args], env=env, capture_output=True,
                              text=True, timeout=600, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
