"""Fine-tuning on a user's own COCO data: another class count, checkpoints that remember their
config and category names, predict on folders with a JSON, readable pictures, small-data
defaults and one-line errors."""
import json
import os

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.cli import main
from rtdetr_fast.data.synthetic import make_synthetic_coco

SMALL = dict(hidden_dim=64, dim_feedforward=128, num_queries=30, num_denoising=10,
             eval_spatial_size=(128, 128))
TINY = ["--size", "128", "--set", "hidden_dim=64", "dim_feedforward=128", "num_queries=30",
        "num_denoising=10"]
NAMES = ("rectangle", "ellipse", "triangle")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco3")
    make_synthetic_coco(root, num_train=4, num_val=2, size=(128, 128), classes=NAMES, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def coco80(tmp_path_factory):
    """An 80-class checkpoint in the official layout (``{"model": state_dict}``)."""
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=80, **SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "coco80.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _batch(n_classes=3):
    images = torch.rand(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]),
                "labels": torch.tensor([n_classes - 1])},
               {"boxes": torch.tensor([[30.0, 20.0, 100.0, 90.0], [5.0, 5.0, 40.0, 30.0]]),
                "labels": torch.tensor([0, 1])}]
    return images, targets


# ------------------------------------------------------------------------- 1. fine-tuning
def test_finetune_80_to_3_classes_through_the_api(coco80):
    model = RTDETR.from_pretrained(coco80, num_classes=3).train()
    assert model.num_classes == 3 and model.criterion.num_classes == 3
    assert model.decoder.dec_score_head[0].out_features == 3
    images, targets = _batch()
    out = model(images, targets)
    assert out["pred_logits"].shape[-1] == 3 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.decoder.dec_score_head[-1].weight.grad is not None


def test_reset_classes_keeps_the_rest_and_the_loss_follows():
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=80, **SMALL)
    before = model.backbone.conv1.conv1_1.conv.weight.clone()
    model.reset_classes(5).train()
    assert model.config.num_classes == 5 and model.criterion.num_classes == 5
    assert torch.equal(model.backbone.conv1.conv1_1.conv.weight, before)
    images, targets = _batch(5)
    assert torch.isfinite(model(images, targets)["loss"])


@pytest.mark.pycocotools
def test_finetune_80_to_3_classes_through_the_cli(coco, coco80, tmp_path):
    rc = main(["train", "--data", coco, "--checkpoint", coco80, "--epochs", "1",
               "--batch-size", "2", "--workers", "0", "--max-steps", "1",
               "--output-dir", str(tmp_path), *TINY])
    assert rc == 0
    model = RTDETR.from_pretrained(tmp_path / "last.pth")
    assert model.num_classes == 3


def _train(coco, out, *extra):
    return main(["train", "--data", coco, "--epochs", "1", "--batch-size", "2", "--workers", "0",
                 "--max-steps", "2", "--output-dir", str(out), "--augment", "none",
                 "--preset", "rtdetr_r18vd", *TINY, *extra])


@pytest.fixture(scope="module")
def scratch(coco, tmp_path_factory):
    """Trained from scratch for 2 steps at size 128 with 30 queries."""
    out = tmp_path_factory.mktemp("scratch")
    assert _train(coco, out) == 0
    return out


@pytest.fixture(scope="module")
def finetuned(coco, coco80, tmp_path_factory):
    """The 80-class checkpoint fine-tuned to the 3 classes for 2 steps."""
    out = tmp_path_factory.mktemp("finetuned")
    rc = main(["train", "--data", coco, "--checkpoint", coco80, "--epochs", "1",
               "--batch-size", "2", "--workers", "0", "--max-steps", "2",
               "--output-dir", str(out), "--augment", "none", *TINY])
    assert rc == 0
    return out


def _one_line_error(argv, capsys, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and expect in err, err
    assert len([l for l in err.splitlines() if "error:" in l]) == 1 and err.splitlines()[-1].count(
        "error:") == 1


# ------------------------------------------------------------------------- 2. checkpoints remember
@pytest.mark.parametrize("which", ["best.pth", "last.pth"])
@pytest.mark.pycocotools
def test_checkpoints_written_by_train_restore_config_and_names(scratch, which):
    model = RTDETR.from_pretrained(scratch / which)
    assert model.config.eval_spatial_size == (128, 128)
    assert model.config.decoder.num_queries == 30 and model.config.decoder.num_denoising == 10
    assert model.config.class_names == NAMES and model.config.category_ids == (1, 2, 3)
    # an explicit override still wins
    bigger = RTDETR.from_pretrained(scratch / which, eval_spatial_size=(160, 160))
    assert bigger.config.eval_spatial_size == (160, 160)
    assert bigger.config.decoder.num_queries == 30


@pytest.mark.pycocotools
def test_finetuned_checkpoint_and_save_pretrained_keep_names(finetuned, tmp_path):
    model = RTDETR.from_pretrained(finetuned / "best.pth")
    assert model.num_classes == 3 and model.class_names == list(NAMES)
    assert model.config.eval_spatial_size == (128, 128)
    model.save_pretrained(tmp_path / "folder")
    again = RTDETR.from_pretrained(tmp_path / "folder")
    assert again.config == model.config
    with pytest.raises(ValueError, match="2 category names"):
        model.set_categories(["a", "b"])


@pytest.mark.pycocotools
def test_best_checkpoint_holds_the_model_only(scratch):
    best = torch.load(scratch / "best.pth", weights_only=True)
    last = torch.load(scratch / "last.pth", weights_only=True)
    assert set(best) == {"model", "model_config", "epoch", "step", "metric"}
    assert "optimizer" in last
    # the EMA weights: what evaluation picked the checkpoint by
    for k, v in best["model"].items():
        assert torch.equal(v, last["ema"]["module"][k])
    assert os.path.getsize(scratch / "best.pth") < 0.6 * os.path.getsize(scratch / "last.pth")


@pytest.mark.pycocotools
def test_eval_and_predict_use_the_checkpoint_size(coco, scratch, capsys, tmp_path):
    rc = main(["eval", "--data", coco, "--checkpoint", str(scratch / "best.pth"),
               "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["input_size"] == [128, 128]
    assert [r["name"] for r in report["per_class"]] == list(NAMES)
    assert {"AP", "AP50", "category_id", "objects"} <= set(report["per_class"][0])
    out = capsys.readouterr().out
    assert "category" in out and "triangle" in out


# ------------------------------------------------------------------------- 3. batch > data set
@pytest.mark.pycocotools
def test_batch_size_larger_than_the_data_set_trains(coco, tmp_path, capsys):
    rc = main(["train", "--data", coco, "--epochs", "1", "--batch-size", "8", "--workers", "0",
               "--output-dir", str(tmp_path), "--augment", "none", *TINY])
    assert rc == 0
    epoch = [json.loads(l) for l in open(tmp_path / "log.jsonl")][-1]
    assert epoch["train_steps"] == 1 and "train_loss" in epoch


def test_an_empty_loader_is_a_clear_error(tmp_path):
    from rtdetr_fast.engine.train import TrainConfig, Trainer

    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, **SMALL)
    trainer = Trainer(model, [], TrainConfig(output_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="no batch"):
        trainer.fit()
    assert not (tmp_path / "last.pth").exists()


# ------------------------------------------------------------------------- 4. one-line errors
@pytest.mark.pycocotools
def test_resume_with_another_preset_is_one_line(coco, scratch, capsys, tmp_path):
    _one_line_error(["train", "--data", coco, "--resume", str(scratch / "last.pth"),
                     "--preset", "rtdetr_r34vd", "--epochs", "3", "--output-dir", str(tmp_path)],
                    capsys, "not rtdetr_r34vd")


@pytest.mark.pycocotools
def test_resume_with_another_class_count_is_one_line(scratch, capsys, tmp_path):
    make_synthetic_coco(tmp_path / "two", num_train=2, num_val=1, size=(64, 64),
                        classes=("rectangle", "ellipse"))
    _one_line_error(["train", "--data", str(tmp_path / "two"), "--resume",
                     str(scratch / "last.pth"), "--epochs", "3", "--output-dir",
                     str(tmp_path / "o")], capsys, "trained for 3 classes, the data set has 2")


@pytest.mark.pycocotools
def test_resuming_a_finished_run_says_so(coco, scratch, capsys, tmp_path):
    _one_line_error(["train", "--data", coco, "--resume", str(scratch / "last.pth"),
                     "--epochs", "1", "--output-dir", str(tmp_path)], capsys, "nothing to train")


@pytest.mark.pycocotools
def test_preset_next_to_a_checkpoint_of_another_preset_is_one_line(coco, coco80, capsys,
                                                                    tmp_path):
    _one_line_error(["train", "--data", coco, "--checkpoint", coco80, "--preset", "rtdetr_r34vd",
                     "--output-dir", str(tmp_path)], capsys, "not rtdetr_r34vd")


@pytest.mark.parametrize("value,expect", [("num_queries=abc", "expected int"),
                                          ("hidden_dim=1.5", "expected int"),
                                          ("nope=1", "unknown override")])
def test_bad_set_values_are_one_line(coco, capsys, value, expect, tmp_path):
    _one_line_error(["train", "--data", coco, "--set", value, "--output-dir", str(tmp_path)],
                    capsys, expect)


@pytest.mark.pycocotools
def test_a_bbox_of_strings_is_one_line(tmp_path, capsys):
    make_synthetic_coco(tmp_path, num_train=2, num_val=1, size=(64, 64))
    ann = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = ["1", "2", "10", "10"]
    ann.write_text(json.dumps(data))
    _one_line_error(["train", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o")],
                    capsys, "4 numbers")


def test_predict_without_checkpoint_is_one_line(coco, capsys, tmp_path):
    _one_line_error(["predict", os.path.join(coco, "val"), "--out", str(tmp_path)], capsys,
                    "needs --checkpoint")


@pytest.mark.pycocotools
def test_eval_of_another_class_count_fails_before_evaluating(coco, coco80, capsys):
    _one_line_error(["eval", "--data", coco, "--checkpoint", coco80], capsys,
                    "has 80 classes")
    assert "AP" not in capsys.readouterr().out


# ------------------------------------------------------------------------- 5. predict
@pytest.mark.pycocotools
def test_predict_folders_globs_json_and_unique_names(coco, finetuned, tmp_path, capsys):
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    src = sorted(os.listdir(os.path.join(coco, "val")))[0]
    Image.open(os.path.join(coco, "val", src)).save(a / "x.png")
    Image.open(os.path.join(coco, "val", src)).resize((96, 64)).save(b / "x.png")
    out = tmp_path / "out"
    # --set right after the verb does not swallow the images
    rc = main(["predict", "--set", "num_top_queries=20", str(a), str(b / "*.png"),
               "--checkpoint", str(finetuned / "best.pth"), "--threshold", "0.0",
               "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a_x_det.png", "b_x_det.png"]
    records = json.loads((out / "detections.json").read_text())
    assert {r["file_name"] for r in records} == {str(a / "x.png"), str(b / "*.png").replace(
        "*", "x")}
    assert len(records) == 40
    for r in records:
        assert r["category_name"] in NAMES and r["category_id"] in (1, 2, 3)
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= r["image_width"] + 1e-3
        assert y + h <= r["image_height"] + 1e-3 and 0 <= r["score"] <= 1


def test_predict_clips_boxes_to_the_image():
    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, **SMALL).eval()
    with torch.no_grad():  # push every box across the image border
        model.decoder.dec_bbox_head[-1].layers[-1].bias[2:] += 3.0
    det = model.predict(torch.rand(3, 80, 120), threshold=0.0)[0]
    assert len(det["boxes"]) > 0
    assert det["boxes"][:, 0::2].min() >= 0 and det["boxes"][:, 0::2].max() <= 120
    assert det["boxes"][:, 1::2].min() >= 0 and det["boxes"][:, 1::2].max() <= 80


# ------------------------------------------------------------------------- 6. readable drawings
def test_labels_are_names_on_a_filled_background_inside_the_image():
    import numpy as np

    from rtdetr_fast.visualize import class_color, draw_detections

    image = torch.full((3, 320, 480), 0.5)
    det = {"boxes": torch.tensor([[-36.6, -25.4, 362.5, 294.2]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([2])}
    img = np.asarray(draw_detections(image, det, class_names=NAMES))
    h, w = img.shape[:2]
    assert min(h, w) >= 480  # small images are enlarged
    color = np.array(class_color(2))
    # the label's filled background sits in the top-left corner, inside the image
    corner = img[: h // 20, : w // 10].reshape(-1, 3)
    assert (np.abs(corner.astype(int) - color).sum(1) == 0).mean() > 0.5
    # with text on it in a contrasting colour, in a font larger than the 11-pixel bitmap one
    rows = np.nonzero((np.abs(img[:, : w // 4].astype(int) - color).sum(2) > 100).any(1)
                      & (np.arange(h) < h // 10))[0]
    assert len(rows) >= 12


def test_drawing_uses_the_category_names(monkeypatch):
    from PIL import ImageDraw

    from rtdetr_fast import visualize

    calls = []
    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: calls.append(text) or real_text(
                            self, xy, text, *a, **k))
    det = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "scores": torch.tensor([0.75]),
           "labels": torch.tensor([1])}
    visualize.draw_detections(torch.rand(3, 64, 64), det, class_names=NAMES)
    assert calls == ["ellipse 0.75"]


# ------------------------------------------------------------------------- 7. small-data defaults
def test_warmup_and_ema_scale_with_the_run_length():
    from rtdetr_fast.engine.train import scaled_schedule

    small = scaled_schedule(2 * 5)  # 2 epochs of 5 steps (20 images, batch 4)
    assert small["warmup_steps"] <= 1 and small["ema_decay"] <= 0.5
    medium = scaled_schedule(1000)
    assert medium["warmup_steps"] == 50 and abs(medium["ema_decay"] - 0.99) < 1e-9
    coco = scaled_schedule(72 * 3697)
    assert coco == {"warmup_steps": 2000, "ema_warmups": 2000, "ema_decay": 0.9999}


def test_help_shows_defaults_and_a_line_per_option():
    from rtdetr_fast.cli import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb in ("train", "eval", "predict"):
        sp = verbs[verb]
        for action in sp._actions:
            assert action.help, f"{verb} {action.option_strings} has no help"
        text = sp.format_help()
        assert "(default:" in text
    assert "(default: 72)" in verbs["train"].format_help()


# ------------------------------------------------------------------------- 8. smaller points
@pytest.mark.pycocotools
def test_unreadable_images_are_warned_once_across_workers_and_epochs(tmp_path):
    import subprocess
    import sys

    make_synthetic_coco(tmp_path, num_train=6, num_val=1, size=(64, 64))
    bad = sorted(os.listdir(tmp_path / "train"))[2]
    (tmp_path / "train" / bad).write_bytes(b"not a png")
    script = f"""
import torch
from rtdetr_fast.data.coco import CocoDetection
from rtdetr_fast.data.transforms import collate_fn, eval_transforms
ds = CocoDetection({str(tmp_path / "train")!r},
                   {str(tmp_path / "annotations" / "instances_train.json")!r},
                   transforms=eval_transforms((64, 64)))
loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_fn)
for _ in range(2):
    list(loader)
print("skipped", ds.skipped)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("skipping image") == 1, res.stderr
    assert "skipped 1" in res.stdout  # counted in the main process, from the workers


def test_cli_warnings_are_one_line():
    from rtdetr_fast.cli import _one_line_warning

    text = _one_line_warning(RuntimeWarning("skipping image 3 at 'x.png': missing"),
                             RuntimeWarning, "coco.py", 10, "warnings.warn(...)")
    assert text == "rtdetr-fast: warning: skipping image 3 at 'x.png': missing\n"


def test_log_numbers_epochs_from_one_everywhere(tmp_path, make_scalar_model):
    from rtdetr_fast.engine.train import TrainConfig, Trainer

    batch = (torch.rand(1, 3, 8, 8), [{}])
    cfg = TrainConfig(epochs=2, output_dir=str(tmp_path), progress=False, log_every=1,
                      warmup_steps=0)
    Trainer(make_scalar_model(), [batch, batch], cfg).fit()
    records = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    steps = [r["epoch"] for r in records if r["type"] == "step"]
    epochs = [r["epoch"] for r in records if r["type"] == "epoch"]
    assert steps == [1, 1, 2, 2] and epochs == [1, 2]


def test_float_images_of_0_to_255_are_an_error():
    import numpy as np

    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="divide by 255"):
        model.predict(np.full((64, 64, 3), 200.0, dtype=np.float32))
    model.predict(np.full((64, 64, 3), 0.5, dtype=np.float32))


@pytest.mark.pycocotools
def test_fp16_amp_on_a_cpu_warns(coco, capsys, tmp_path):
    # a mistake is found before anything runs: its one line, no warning
    assert main(["train", "--data", str(tmp_path / "none"), "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--amp" not in err and len(err.strip().splitlines()) == 1
    # a run that starts says what the flag costs there
    assert main(["train", "--data", coco, "--amp", "fp16", "--epochs", "1", "--max-steps", "1",
                 "--batch-size", "2", "--workers", "0", "--output-dir", str(tmp_path / "run"),
                 *TINY]) == 0
    assert "--amp fp16 on a CPU" in capsys.readouterr().err


# ------------------------------------------------------------------------- the whole path
@pytest.mark.pycocotools
def test_whole_path_scratch_finetune_reload_predict_eval(coco, scratch, finetuned, tmp_path,
                                                        capsys):
    # from scratch, then fine-tuned from an 80-class checkpoint: both reload with config and names
    for run in (scratch, finetuned):
        model = RTDETR.from_pretrained(run / "best.pth")
        assert model.class_names == list(NAMES) and model.config.eval_spatial_size == (128, 128)
        log = [json.loads(l) for l in open(run / "log.jsonl")]
        assert log[-1]["train_steps"] == 2
    rc = main(["predict", os.path.join(coco, "val"), "--checkpoint",
               str(finetuned / "best.pth"), "--threshold", "0.0", "--out", str(tmp_path)])
    assert rc == 0
    assert len(list(tmp_path.glob("*_det.png"))) == len(os.listdir(os.path.join(coco, "val")))
    assert json.loads((tmp_path / "detections.json").read_text())
    rc = main(["eval", "--data", coco, "--checkpoint", str(finetuned / "best.pth"),
               "--json", str(tmp_path / "eval.json")])
    assert rc == 0
    per_class = json.loads((tmp_path / "eval.json").read_text())["per_class"]
    assert [r["name"] for r in per_class] == list(NAMES)
