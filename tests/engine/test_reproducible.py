"""Reproducible training through the command line: the same --seed gives the same
run; 1 epoch + --resume to 2 equals 2 epochs; a run interrupted by SIGINT mid-epoch and resumed
with the same arguments equals the uninterrupted run, tensor for tensor (CPU)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from rtdetr_fast.cli import main
from rtdetr_fast.data.synthetic import make_synthetic_coco
from rtdetr_fast.engine.seeding import SeededSampler, WorkerSeeder, derive_seed

TINY = ["--preset", "rtdetr_r18vd", "--size", "64", "--set", "hidden_dim=32",
        "dim_feedforward=64", "num_queries=10", "num_denoising=6"]
# official augmentation and multi-scale batches on every epoch, so both draw random numbers
COMMON = ["--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--augment",
          "official", "--multi-scale", "--stop-aug-epochs", "0", *TINY]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_repro")
    make_synthetic_coco(root, num_train=6, num_val=2, size=(64, 64), seed=0)
    return str(root)


def _train(coco, out, *extra):
    rc = main(["train", "--data", coco, "--output-dir", str(out), *COMMON, *extra])
    assert rc == 0
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)


def _tensors(obj, prefix=""):
    """Every tensor of a nested checkpoint, by its path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _differing(a, b, parts=("model", "ema", "optimizer", "scaler", "rng")):
    ta = dict(kv for p in parts for kv in _tensors(a[p], p))
    tb = dict(kv for p in parts for kv in _tensors(b[p], p))
    assert ta.keys() == tb.keys() and len(ta) > 100
    return [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.fixture(scope="module")
def straight(coco, tmp_path_factory):
    """2 epochs with --seed 5, without interruption."""
    out = tmp_path_factory.mktemp("straight")
    return out, _train(coco, out, "--epochs", "2", "--seed", "5", "--workers", "0")


@pytest.mark.pycocotools
def test_same_seed_same_run_and_another_seed_another(coco, straight, tmp_path):
    again = _train(coco, tmp_path / "a", "--epochs", "2", "--seed", "5", "--workers", "0")
    assert _differing(straight[1], again) == []
    other = _train(coco, tmp_path / "b", "--epochs", "1", "--seed", "6", "--workers", "0",
                   "--max-steps", "1")
    differ = _differing(straight[1], other, parts=("model",))
    assert len(differ) > 100  # the initialisation already differs


@pytest.mark.pycocotools
def test_one_epoch_then_resume_to_two_equals_two(coco, straight, tmp_path):
    _train(coco, tmp_path, "--epochs", "1", "--seed", "5", "--workers", "0")
    # no --seed: the resumed run takes the one saved in its checkpoint
    resumed = _train(coco, tmp_path, "--epochs", "2", "--workers", "0",
                     "--resume", str(tmp_path / "last.pth"))
    assert resumed["epoch"] == straight[1]["epoch"] == 2 and resumed["seed"] == 5
    assert _differing(straight[1], resumed) == []
    def lines(folder):
        return [(r["type"], r["epoch"], r["step"])
                for r in map(json.loads, open(folder / "log.jsonl"))]
    assert lines(tmp_path) == lines(straight[0])


# The CLI in a fresh process that sends itself a real SIGINT at the start of a given global
# step and counts which kernels ran (the resume tests must take the CPU kernels whose routing
# once depended on what had run before in the process: the AVX-512 Winograd training
# convolutions, the native deformable attention). Nothing here loads the extension before the
# CLI does.
_DRIVER = textwrap.dedent("""
    import collections, json, os, signal, sys
    # a shell runs background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN:
    # the child answers Ctrl-C as a terminal user's process does, whoever started the tests
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from rtdetr_fast.engine import train
    from rtdetr_fast.ops import _backend
    from rtdetr_fast.ops.rep_conv import winograd
    counts = collections.Counter()
    at = int(os.environ["INTERRUPT_AT_STEP"])
    step = train.Trainer.train_step
    def train_step(self, *a):
        if self.step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a)
    train.Trainer.train_step = train_step
    conv = winograd.conv3x3_train
    def conv3x3_train(*a, **k):
        counts["winograd_train"] += 1
        return conv(*a, **k)
    winograd.conv3x3_train = conv3x3_train
    select = _backend.select
    def counted_select(op, device_type):
        fn = select(op, device_type)
        counts[op + ":" + _backend._selected_name_eager(op, device_type)] += 1
        return fn
    _backend.select = counted_select
    from rtdetr_fast.cli import main
    try:
        rc = main(sys.argv[1:])
    finally:
        counts["avx512"] = int(bool(_backend.cpu_kernels().get("avx512")))
        with open(os.environ["COUNTS_FILE"], "w") as f:
            json.dump(counts, f)
    sys.exit(rc)
""")


def _counted_cli(args, counts_file, interrupt_at=None):
    """The CLI run by _DRIVER: the finished process and the kernel counts it wrote."""
    env = dict(os.environ, INTERRUPT_AT_STEP=str(-1 if interrupt_at is None else interrupt_at),
               COUNTS_FILE=str(counts_file))
    env.pop("RTDETR_FAST_NO_AVX512", None)
    env.pop("RTDETR_FAST_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", _DRIVER, *args], env=env,
                         capture_output=True, text=True, timeout=900)
    return run, json.load(open(counts_file))


def _cli(args, interrupt_at=None):
    fd, counts = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        return _counted_cli(args, counts, interrupt_at)[0]
    finally:
        os.unlink(counts)


@pytest.mark.pycocotools
def test_sigint_mid_epoch_then_resume_equals_the_straight_run_with_workers(coco, tmp_path):
    args = ["train", "--data", coco, *COMMON, "--epochs", "2", "--seed", "3", "--workers", "2"]
    done = _cli([*args, "--output-dir", str(tmp_path / "straight")])
    assert done.returncode == 0, done.stderr[-2000:]
    # step 3 is the second step of epoch 2 (2 steps per epoch)
    cut = _cli([*args, "--output-dir", str(tmp_path / "cut")], interrupt_at=3)
    assert cut.returncode == 130 and "interrupted" in cut.stderr, cut.stderr[-2000:]
    partial = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert partial["epoch"] == 1 and partial["step"] == 2
    resumed = _cli([*args, "--output-dir", str(tmp_path / "cut"),
                    "--resume", str(tmp_path / "cut" / "last.pth")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert b["epoch"] == 2 and _differing(a, b) == []


def test_epoch_order_depends_on_seed_and_epoch_only():
    fresh = SeededSampler(50, seed=7)
    fresh.set_epoch(3)
    used = SeededSampler(50, seed=7)
    for e in range(4):  # iterating earlier epochs changes nothing
        used.set_epoch(e)
        order = list(used)
    assert order == list(fresh) and sorted(order) == list(range(50))
    used.set_epoch(2)
    assert list(used) != order
    # ranks: disjoint shares of the same permutation, padded to equal length
    shares = [list(SeededSampler(7, seed=1, rank=r, world=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 4 and set(shares[0] + shares[1]) == set(range(7))


def test_worker_seeds_differ_by_epoch_rank_and_worker():
    draws = set()
    for epoch, rank, worker in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        seeder = WorkerSeeder(seed=4, rank=rank)
        seeder.set_epoch(epoch)
        seeder(worker)
        draws.add(float(torch.rand(())))
    assert len(draws) == 4
    assert derive_seed(1, 0) != derive_seed(0, 1)


@pytest.mark.pycocotools
def test_deterministic_flag_trains_on_the_cpu(coco, tmp_path):
    try:
        _train(coco, tmp_path, "--epochs", "1", "--workers", "0", "--deterministic",
               "--max-steps", "1")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.pycocotools
def test_a_refused_deterministic_op_is_one_line(coco, tmp_path, monkeypatch, capsys):
    from rtdetr_fast.engine import train

    def refuse(self, *a):
        raise RuntimeError("rtdetr_fast ms_deform_attn backward (triton backend) does not have "
                           "a deterministic implementation (float atomics); use the native "
                           "backend\nmore")
    monkeypatch.setattr(train.Trainer, "train_step", refuse)
    try:
        rc = main(["train", "--data", coco, "--output-dir", str(tmp_path), *COMMON,
                   "--epochs", "1", "--workers", "0", "--deterministic"])
    finally:
        torch.use_deterministic_algorithms(False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("rtdetr-fast train: error: rtdetr_fast ms_deform_attn backward "
                               "(triton backend) does not have a deterministic implementation")
    assert "--deterministic" in lines[0]


def _torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rtdetr_fast", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.pycocotools
def test_ddp_two_gloo_ranks_resumed_equals_straight(coco, tmp_path):
    args = ["train", "--data", coco, *COMMON, "--seed", "2", "--workers", "0", "--device", "cpu"]
    done = _torchrun([*args, "--epochs", "2", "--output-dir", str(tmp_path / "straight")])
    assert done.returncode == 0, done.stderr[-3000:]
    first = _torchrun([*args, "--epochs", "1", "--output-dir", str(tmp_path / "resumed")])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun([*args, "--epochs", "2", "--output-dir", str(tmp_path / "resumed"),
                         "--resume", str(tmp_path / "resumed" / "last.pth")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and _differing(a, b) == []


def test_resume_takes_the_saved_seed_and_warns_about_another(tmp_path, make_scalar_model):
    from rtdetr_fast.engine.train import TrainConfig, Trainer

    batch = (torch.rand(1, 3, 8, 8), [{}])
    cfg = TrainConfig(epochs=1, output_dir=str(tmp_path), progress=False, warmup_steps=0, seed=1)
    Trainer(make_scalar_model(), [batch], cfg).fit()
    again = Trainer(make_scalar_model(), [batch], TrainConfig(epochs=2, output_dir=str(tmp_path)))
    again.resume(str(tmp_path / "last.pth"))
    assert again.cfg.seed == 1
    other = Trainer(make_scalar_model(), [batch], TrainConfig(epochs=2, output_dir=str(tmp_path), seed=2))
    with pytest.warns(RuntimeWarning, match="trained with seed 1"):
        other.resume(str(tmp_path / "last.pth"))


def _needs_avx512():
    from rtdetr_fast.ops import _backend
    if not _backend.cpu_kernels().get("avx512"):
        pytest.skip("the CPU kernels' AVX-512 build does not run on this CPU (or is turned off), "
                    "so the Winograd training path at 32 channels cannot be taken here")


# 128x128 at batch 2: the stem's 32- and 64-channel 3x3 convs at 64x64 take the AVX-512 Winograd
# training kernel (B*H*W = 8192); the decoder's deformable attention the native CPU kernel
KERNEL_SIZE = ["--preset", "rtdetr_r18vd", "--size", "128", "--batch-size", "2",
               "--max-steps", "2", "--warmup-steps", "2", "--augment", "none", "--no-ema",
               "--workers", "0", "--seed", "3", "--set", "hidden_dim=32", "dim_feedforward=64",
               "num_queries=20", "num_denoising=6"]


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_repro128")
    make_synthetic_coco(root, num_train=4, num_val=2, size=(128, 128), seed=0)
    return str(root)


def _assert_kernels_taken(counts):
    assert counts["avx512"] == 1
    assert counts["winograd_train"] > 0, counts
    assert counts.get("ms_deform_attn:native", 0) > 0, counts


@pytest.mark.pycocotools
def test_resumed_and_interrupted_runs_equal_the_straight_one_on_the_avx512_kernels(coco128,
                                                                                    tmp_path):
    _needs_avx512()
    args = ["train", "--data", coco128, *KERNEL_SIZE]
    straight, counts = _counted_cli([*args, "--epochs", "2", "--output-dir",
                                     str(tmp_path / "straight")], tmp_path / "c0.json")
    assert straight.returncode == 0, straight.stderr[-2000:]
    _assert_kernels_taken(counts)
    # extended: 1 epoch, then --resume to 2, each in a fresh process
    first, counts = _counted_cli([*args, "--epochs", "1", "--output-dir", str(tmp_path / "ext")],
                                 tmp_path / "c1.json")
    assert first.returncode == 0, first.stderr[-2000:]
    more, counts = _counted_cli([*args, "--epochs", "2", "--output-dir", str(tmp_path / "ext"),
                                 "--resume", str(tmp_path / "ext" / "last.pth")],
                                tmp_path / "c2.json")
    assert more.returncode == 0, more.stderr[-2000:]
    _assert_kernels_taken(counts)
    # interrupted: SIGINT at the second step of epoch 2, resumed with the same arguments
    cut, _ = _counted_cli([*args, "--epochs", "2", "--output-dir", str(tmp_path / "cut")],
                          tmp_path / "c3.json", interrupt_at=3)
    assert cut.returncode == 130, cut.stderr[-2000:]
    again, counts = _counted_cli([*args, "--epochs", "2", "--output-dir", str(tmp_path / "cut"),
                                  "--resume", str(tmp_path / "cut" / "last.pth")],
                                 tmp_path / "c4.json")
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_kernels_taken(counts)
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    for name in ("ext", "cut"):
        b = torch.load(tmp_path / name / "last.pth", weights_only=True)
        assert b["epoch"] == 2 and _differing(a, b) == [], name


def test_the_winograd_routing_does_not_depend_on_whether_the_extension_has_loaded():
    _needs_avx512()
    probe = textwrap.dedent("""
        import torch
        from rtdetr_fast.ops.rep_conv import winograd
        from rtdetr_fast.ops import _backend
        before = winograd.min_channels(torch.float32)
        _backend.extension()
        print(before, winograd.min_channels(torch.float32))
    """)
    env = dict(os.environ)
    env.pop("RTDETR_FAST_NO_AVX512", None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.split()
    assert before == after == "32"
