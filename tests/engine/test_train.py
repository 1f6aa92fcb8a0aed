"""The training engine: overfitting, exact resume, DDP equivalence, AMP, failures."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from rtdetr_fast import RTDETR
from rtdetr_fast.engine.ema import ModelEMA
from rtdetr_fast.engine.train import (LRSchedule, TrainConfig, Trainer, TrainingDiverged,
                                      build_optimizer, param_groups)


def tiny(**kw):
    """A narrow rtdetr_r18vd that runs on 64x64 images (84 anchors >= 20 queries)."""
    base = dict(hidden_dim=64, dim_feedforward=128, num_queries=20, num_denoising=20)
    base.update(kw)
    return RTDETR.from_name("rtdetr_r18vd", num_classes=3, **base)


class Boxes(Dataset):
    """Images with one or two flat-coloured rectangles; label = which colour."""

    def __init__(self, n=4, size=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
        for _ in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.2
            boxes, labels = [], []
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
                w, h = torch.randint(size // 6, size // 2, (2,), generator=g).tolist()
                c = int(torch.randint(0, 3, (1,), generator=g))
                img[:, y0:y0 + h, x0:x0 + w] = colours[c][:, None, None]
                boxes.append([x0, y0, x0 + w, y0 + h])
                labels.append(c)
            self.items.append((img, {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                     "labels": torch.tensor(labels)}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def cfg(tmp_path, **kw):
    base = dict(epochs=1, lr=1e-4, backbone_lr=1e-5, warmup_steps=2, ema_warmups=5,
                output_dir=str(tmp_path), progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_param_groups_follow_the_official_recipe():
    model = tiny()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig())}
    assert groups["backbone"]["lr"] == 1e-5 and groups["backbone_norm"]["weight_decay"] == 0
    assert groups["no_decay"]["weight_decay"] == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("backbone" in names[id(p)] for p in groups["backbone"]["params"])
    assert all(("norm" in names[id(p)] or "bias" in names[id(p)])
               for p in groups["no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(p.requires_grad for p in model.parameters())
    opt = build_optimizer(model, TrainConfig())
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 1e-4


V2_RECIPES = {  # preset: (epochs, strong-augmentation stop, multi-scale stop or None,
    #                  backbone lr, weight decay of encoder/decoder biases)
    "rtdetrv2_r18vd": (120, 117, None, 1e-4, 1e-4),
    "rtdetrv2_r34vd": (120, 117, 117, 5e-5, 0.0),
    "rtdetrv2_r50vd_m": (84, 81, 81, 1e-5, 1e-4),
    "rtdetrv2_r50vd": (72, 71, 71, 1e-5, 1e-4),
    "rtdetrv2_r101vd": (72, 71, 71, 1e-6, 1e-4),
}


@pytest.mark.parametrize("preset", list(V2_RECIPES))
def test_v2_param_groups_follow_the_official_recipes(preset):
    from rtdetr_fast.engine.recipes import recipe_for

    epochs, stop, ms_stop, backbone_lr, bias_wd = V2_RECIPES[preset]
    recipe = recipe_for(preset)
    assert (recipe.epochs, recipe.stop_epoch) == (epochs, stop)
    assert (recipe.multi_scale_stop_epoch if recipe.multi_scale else None) == ms_stop
    model = RTDETR.from_name(preset, num_classes=3, hidden_dim=64, dim_feedforward=128,
                             num_queries=20, cross_attn_method="discrete")
    opt = recipe.build_optimizer(model)
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 1e-4
    setting = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in setting, "a parameter in two groups"
            setting[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert {n for n in named if id(named[n]) in setting} == trainable
    # discrete sampling: the frozen sampling offsets are in no group
    assert not any("sampling_offsets" in n for n in trainable)
    lr = {n: setting[id(named[n])] for n in trainable}
    assert lr["backbone.res_layers.1.blocks.0.branch2a.conv.weight"] == (backbone_lr, 1e-4)
    assert lr["decoder.dec_bbox_head.0.layers.0.weight"] == (1e-4, 1e-4)
    assert lr["decoder.decoder.layers.0.norm1.weight"] == (1e-4, 0.0)
    assert lr["encoder.input_proj.0.norm.weight"] == (1e-4, 0.0)
    assert lr["decoder.dec_bbox_head.0.layers.0.bias"] == (1e-4, bias_wd)
    backbone_norm = "backbone.res_layers.1.blocks.0.branch2a.norm.weight"
    if preset in ("rtdetrv2_r18vd", "rtdetrv2_r34vd"):  # trainable backbone norms
        assert lr[backbone_norm] == (backbone_lr, 0.0)
    else:  # frozen: buffers, not parameters
        assert backbone_norm not in named


def test_v1_recipe_groups_are_the_trainers():
    from rtdetr_fast.engine.recipes import recipe_for

    model = tiny()
    ours = {g["name"]: (g.get("lr"), g.get("weight_decay"), [id(p) for p in g["params"]])
            for g in recipe_for("rtdetr_r18vd").param_groups(model)}
    theirs = {g["name"]: (g.get("lr"), g.get("weight_decay"), [id(p) for p in g["params"]])
              for g in param_groups(model, TrainConfig())}
    assert ours == theirs


def test_v2_recipe_stops_strong_augmentation_and_multi_scale(tmp_path):
    from rtdetr_fast.engine.recipes import recipe_for

    recipe = recipe_for("rtdetrv2_r34vd")
    policy = recipe.train_transforms((64, 64))
    names = [type(t).__name__ for t in policy.transforms]
    assert names[:3] == ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]
    collate = recipe.collate(64, policy)
    calls = []
    policy.transforms = [type(n, (), {"__call__": lambda self, i, t, n=n: (calls.append(n), (i, t))[1]})()
                         for n in names]
    batch = [(torch.rand(3, 64, 64), {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
                                      "labels": torch.tensor([0])})] * 2
    for epoch, strong, multi in [(0, True, True), (116, True, True), (117, False, False)]:
        collate.set_epoch(epoch)
        calls.clear()
        policy(None, {})
        assert ("RandomIoUCrop" in calls) == strong and "Resize" in calls
        assert collate.collate.enabled == multi
        images, _ = collate(batch)
        assert images.shape[0] == 2
    sizes = recipe.collate(640).collate.sizes
    assert sizes == [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]
    assert not recipe_for("rtdetrv2_r18vd").multi_scale


def test_v2_recipe_trainer_and_criterion(tmp_path):
    from rtdetr_fast.engine.recipes import recipe_for

    recipe = recipe_for("rtdetrv2_r101vd")
    model = RTDETR.from_name("rtdetrv2_r18vd", num_classes=3, hidden_dim=64,
                             dim_feedforward=128, num_queries=20, num_denoising=20)
    trainer = Trainer.from_recipe(recipe, model, [], cfg(tmp_path))
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["backbone", "no_decay",
                                                                   "default"]
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-6
    trainer.schedule.apply(0, 0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 / 2)
    crit = model.criterion
    assert crit.weights == dict(recipe.loss_weights)
    assert (crit.alpha, crit.gamma) == (recipe.vfl_alpha, recipe.vfl_gamma)
    m = crit.matcher
    assert dict(cost_class=m.cost_class, cost_bbox=m.cost_bbox,
                cost_giou=m.cost_giou) == dict(recipe.matcher_weights)
    assert (m.alpha, m.gamma) == (recipe.matcher_alpha, recipe.matcher_gamma)


def test_trainer_with_a_recipe_and_a_backbone_lr(tmp_path):
    """TrainConfig.recipe: the Trainer builds the recipe's groups itself (cfg.lr the base);
    backbone_lr None keeps the recipe's backbone lrs, a number sets every backbone parameter's."""
    from rtdetr_fast.engine.recipes import recipe_for

    model = RTDETR.from_name("rtdetrv2_r18vd", num_classes=3, hidden_dim=64,
                             dim_feedforward=128, num_queries=20, num_denoising=20)
    trainer = Trainer(model, [], cfg(tmp_path, recipe="rtdetrv2_r34vd", backbone_lr=None))
    ids = [[id(p) for p in g["params"]] for g in trainer.optimizer.param_groups]
    theirs = recipe_for("rtdetrv2_r34vd").param_groups(model)
    assert ids == [[id(p) for p in g["params"]] for g in theirs]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [5e-5, 5e-5, 1e-4, 1e-4]
    trainer = Trainer(model, [], cfg(tmp_path, recipe="rtdetrv2_r34vd", lr=2e-4,
                                     backbone_lr=3e-5))
    assert [(g["name"], g["lr"]) for g in trainer.optimizer.param_groups] == [
        ("backbone", 3e-5), ("backbone_norm", 3e-5), ("no_decay", 2e-4), ("default", 2e-4)]
    assert trainer.state_dict()["train_config"]["recipe"] == "rtdetrv2_r34vd"
    with pytest.raises(ValueError, match="no training recipe for 'nope'"):
        cfg(tmp_path, recipe="nope")
    with pytest.raises(ValueError, match="backbone_lr=None needs a recipe"):
        cfg(tmp_path, backbone_lr=None)
    # from_recipe records its recipe in the config (and so in every checkpoint)
    made = Trainer.from_recipe(recipe_for("rtdetrv2_r18vd"), model, [], cfg(tmp_path))
    assert made.cfg.recipe == "rtdetrv2_r18vd" and made.cfg.backbone_lr is None


def test_resume_refuses_another_recipe(tmp_path):
    model = RTDETR.from_name("rtdetrv2_r18vd", num_classes=3, hidden_dim=64,
                             dim_feedforward=128, num_queries=20, num_denoising=20)
    trainer = Trainer(model, [], cfg(tmp_path, recipe="rtdetrv2_r18vd", backbone_lr=None))
    trainer.save(str(tmp_path / "last.pth"))
    other = Trainer(model, [], cfg(tmp_path))
    with pytest.raises(ValueError, match="trained with recipe rtdetrv2_r18vd, this run has "
                                         "the v1 groups"):
        other.resume(str(tmp_path / "last.pth"))
    same = Trainer(model, [], cfg(tmp_path, recipe="rtdetrv2_r18vd", backbone_lr=None))
    same.resume(str(tmp_path / "last.pth"))
    # a checkpoint of an engine without recipes: the v1 groups
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    del state["train_config"]["recipe"]
    torch.save(state, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="trained with the v1 groups"):
        Trainer(model, [], cfg(tmp_path, recipe="rtdetrv2_r18vd", backbone_lr=None)).resume(
            str(tmp_path / "old.pth"))


def test_warmup_and_milestones():
    model = nn.Linear(2, 2)
    c = TrainConfig(warmup_steps=4, lr_milestones=(2,), lr=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    s = LRSchedule(opt, c)
    assert [s.factor(i, 0) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert abs(s.factor(10, 2) - 0.1) < 1e-12


def test_ema_decay_ramp():
    model = nn.Linear(1, 1, bias=False)
    ema = ModelEMA(model, decay=0.9, warmups=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model)
    d = 0.9 * (1 - torch.exp(torch.tensor(-0.5))).item()
    assert abs(ema.module.weight.item() - (1 - d)) < 1e-6


def test_overfits_a_tiny_batch(tmp_path):
    """The final-layer loss on a fixed batch falls by a large factor within 60 steps."""
    torch.manual_seed(0)
    model = tiny()
    data = Boxes(n=2)
    batch = collate([data[0], data[1]])

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(*batch)["loss"].item()

    trainer = Trainer(model, [batch], cfg(tmp_path, lr=2e-3, backbone_lr=2e-4, warmup_steps=1,
                                          ema=False, clip_max_norm=0.0))
    before = eval_loss()
    model.train()
    for _ in range(60):
        trainer.train_step(*batch)
    after = eval_loss()
    assert after < before / 3, (before, after)


def _run(tmp_path, epochs, resume=None, stop_after=None):
    torch.manual_seed(0)
    loader = DataLoader(Boxes(n=4), batch_size=2, shuffle=True, collate_fn=collate)
    trainer = Trainer(tiny(), loader, cfg(tmp_path, epochs=epochs))
    if resume:
        trainer.resume(resume)
    trainer.fit()
    return trainer


def test_resume_is_exact(tmp_path):
    full = _run(tmp_path / "full", epochs=2)
    _run(tmp_path / "part", epochs=1)
    resumed = _run(tmp_path / "resumed", epochs=2, resume=str(tmp_path / "part" / "last.pth"))
    assert resumed.step == full.step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = full.ema.module.state_dict(), resumed.ema.module.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    lines = [json.loads(s) for s in open(tmp_path / "full" / "log.jsonl")]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [1, 2]
    # the checkpoint is an official-layout file: from_pretrained reads its EMA weights
    loaded = RTDETR.from_pretrained(tmp_path / "full" / "last.pth")
    assert all(torch.equal(loaded.state_dict()[k], ea[k]) for k in ea)


def test_all_empty_batch_trains(tmp_path):
    model = tiny()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    trainer = Trainer(model, [], cfg(tmp_path))
    stats = trainer.train_step(torch.rand(2, 3, 64, 64), empty)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert model.decoder.denoising_class_embed.weight.grad is not None


def test_bf16_autocast_on_cpu(tmp_path):
    data = Boxes(n=2)
    trainer = Trainer(tiny(), [], cfg(tmp_path, amp="bf16"))
    stats = trainer.train_step(*collate([data[0], data[1]]))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    data = Boxes(n=2)
    batch = collate([data[0], data[1]])
    trainer = Trainer(tiny(), [batch], cfg(tmp_path, epochs=2))
    trainer.fit()
    last = tmp_path / "last.pth"
    before = last.read_bytes()
    with torch.no_grad():
        trainer.model.decoder.dec_score_head[-1].weight.fill_(float("nan"))
    trainer.cfg = dataclasses.replace(trainer.cfg, epochs=3)
    with pytest.raises(TrainingDiverged, match="training stopped.*last good checkpoint"):
        trainer.fit()
    assert last.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_bad_config():
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
