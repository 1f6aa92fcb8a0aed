"""Every CLI verb on tiny generated data, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rtdetr_fast.cli import main
from rtdetr_fast.data.synthetic import make_synthetic_coco

TINY = ["--preset", "rtdetr_r18vd", "--size", "128", "--set", "hidden_dim=64",
        "dim_feedforward=128", "num_queries=30", "num_denoising=10"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=6, num_val=3, size=(128, 128), seed=0)
    return str(root)


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    rc = main(["train", "--data", coco, "--epochs", "1", "--batch-size", "2", "--workers", "0",
               "--warmup-steps", "2", "--output-dir", str(out), "--augment", "light", *TINY])
    assert rc == 0
    return out


@pytest.mark.pycocotools
def test_train_writes_checkpoints_and_log(trained):
    assert (trained / "last.pth").is_file() and (trained / "best.pth").is_file()
    records = [json.loads(line) for line in open(trained / "log.jsonl")]
    epoch = [r for r in records if r["type"] == "epoch"][-1]
    assert epoch["epoch"] == 1 and "eval_AP" in epoch and "train_loss" in epoch


@pytest.mark.pycocotools
def test_train_resume(coco, trained, tmp_path):
    rc = main(["train", "--data", coco, "--epochs", "2", "--batch-size", "2", "--workers", "0",
               "--warmup-steps", "2", "--output-dir", str(tmp_path), "--max-steps", "1",
               "--resume", str(trained / "last.pth"), *TINY])
    assert rc == 0
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [2]


@pytest.mark.pycocotools
def test_eval_prints_the_twelve_numbers(coco, trained, capsys):
    rc = main(["eval", "--data", coco, "--checkpoint", str(trained / "best.pth"),
               "--size", "128", "--batch-size", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    metrics, per_class = out.split("\ncategory", 1)
    names = [line.split()[0] for line in metrics.strip().splitlines()[-12:]]
    assert names == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                     "ARm", "ARl"]
    # then the per-class table: one row per category of the data set
    assert len(per_class.strip().splitlines()) == 1 + 3


@pytest.mark.pycocotools
def test_predict_writes_pngs(coco, trained, tmp_path, capsys):
    image = sorted(os.listdir(os.path.join(coco, "val")))[0]
    rc = main(["predict", os.path.join(coco, "val", image), "--checkpoint",
               str(trained / "last.pth"), "--threshold", "0.0", "--out", str(tmp_path),
               "--size", "128"])
    assert rc == 0
    pngs = list(tmp_path.glob("*_det.png"))
    assert len(pngs) == 1
    from PIL import Image

    # a 128x128 image is drawn 4x larger, so that its labels are readable
    assert Image.open(pngs[0]).size == (512, 512)
    assert (tmp_path / "detections.json").is_file()


def test_bench_prints_a_table(capsys):
    rc = main(["bench", "--size", "128", "--repeats", "1", "--set", "num_queries=30"])
    assert rc == 0
    out = capsys.readouterr().out
    for what in ("ms_deform_attn", "topk_select", "rep_conv", "reference", "deploy"):
        assert what in out


def test_info(capsys):
    assert main(["info"]) == 0
    assert "ms_deform_attn" in capsys.readouterr().out


@pytest.mark.pycocotools
def test_demo_end_to_end_short(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--epochs", "1", "--num-train", "16",
               "--num-val", "4", "--batch-size", "8", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"AP", "AP50"} and summary["steps"] == 2
    assert all(os.path.isfile(p) for p in summary["images"])
    assert "COCO evaluation" in capsys.readouterr().out
    # the checkpoint names its classes, so predicting with it labels the shapes by name
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert list(ckpt["model_config"]["class_names"]) == ["rectangle", "ellipse", "triangle"]


@pytest.mark.parametrize("argv,msg", [
    (["train", "--data", "/nonexistent/coco"], "does not exist"),
    (["eval", "--data", "/nonexistent/coco"], "does not exist"),
    (["predict", "/nonexistent.png"], "no image file"),
    (["predict", "x.png", "--checkpoint", "/nonexistent.pth"], "no checkpoint"),
    (["predict", "x.png", "--set", "nope=1"], "unknown override"),
])
def test_user_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


def test_unknown_preset_is_a_usage_error():
    res = subprocess.run([sys.executable, "-m", "rtdetr_fast", "predict", "x.png", "--preset",
                          "rtdetr_r9000"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
    assert "Traceback" not in res.stderr
