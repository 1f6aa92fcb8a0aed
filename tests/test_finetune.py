"""Fine-tuning on a user's own COCO data: another class count, checkpoints that remember their
config and category names, predict on folders with a JSON, readable pictures, small-data
defaults and one-line errors (issue 12)."""
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


def test_finetune_80_to_3_classes_through_the_cli(coco, coco80, tmp_path):
    rc = main(["train", "--data", coco, "--checkpoint", coco80, "--epochs", "1",
               "--batch-size", "2", "--workers", "0", "--max-steps", "1",
               "--output-dir", str(tmp_path), *TINY])
    assert rc == 0
    model = RTDETR.from_pretrained(tmp_path / "last.pth")
    assert model.num_classes == 3
