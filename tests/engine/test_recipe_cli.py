"""``rtdetr-fast train`` uses the preset's training recipe (engine.recipes.recipe_for) for the
RT-DETRv2 presets: optimizer groups and lrs, loss and matcher weights, the strong-augmentation and
multi-scale stop epochs scaled to --epochs, EMA and clipping; flags win; --resume keeps the
recipe; the v1 presets keep the command's defaults."""
import json

import pytest
import torch

from rtdetr_fast import RTDETR
from rtdetr_fast.cli import build_parser, main
from rtdetr_fast.cli.train import prepare_train, recipe_line
from rtdetr_fast.data.policies import EpochCollate, StopEpochPolicy
from rtdetr_fast.data.synthetic import make_synthetic_coco
from rtdetr_fast.data.transforms import Compose, MultiScaleCollate, collate_fn
from rtdetr_fast.engine.plan import plan_training
from rtdetr_fast.engine.recipes import recipe_for
from rtdetr_fast.engine.train import TrainConfig, param_groups, scaled_schedule

SMALL = dict(hidden_dim=64, dim_feedforward=128, num_queries=30, num_denoising=10)
TINY = ["--size", "128", "--workers", "0", "--batch-size", "2", "--set", "hidden_dim=64",
        "dim_feedforward=128", "num_queries=30", "num_denoising=10"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=4, num_val=2, size=(128, 128), seed=0)
    return str(root)


def prepare(coco, tmp_path, *argv):
    args = build_parser().parse_args(["train", "--data", coco, "--output-dir", str(tmp_path),
                                      *TINY, *argv])
    return prepare_train(args)


def groups_of(trainer):
    """(name, base lr, weight decay, parameter names) per optimizer group."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [(g["name"], base, g["weight_decay"], [names[id(p)] for p in g["params"]])
            for g, base in zip(trainer.optimizer.param_groups, trainer.schedule.base)]


def recipe_groups(recipe, model, lr=None):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], g.get("lr", lr or recipe.lr), g.get("weight_decay", recipe.weight_decay),
             [names[id(p)] for p in g["params"]]) for g in recipe.param_groups(model)]


# ------------------------------------------------------------------------- v2: the recipe
@pytest.mark.pycocotools
def test_v2_preset_trains_with_its_recipe(coco, tmp_path):
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r34vd")
    recipe = recipe_for("rtdetrv2_r34vd")
    cfg = trainer.cfg
    assert cfg.recipe == "rtdetrv2_r34vd" and cfg.epochs == recipe.epochs == 120
    assert (cfg.lr, cfg.weight_decay, cfg.betas) == (recipe.lr, recipe.weight_decay, recipe.betas)
    assert cfg.clip_max_norm == recipe.clip_max_norm and cfg.ema
    assert plan.overrides == ()
    ours = groups_of(trainer)
    assert ours == recipe_groups(recipe, trainer.model)
    assert [g[:3] for g in ours] == [("backbone", 5e-5, 1e-4), ("backbone_norm", 5e-5, 0.0),
                                     ("no_decay", 1e-4, 0.0), ("default", 1e-4, 1e-4)]
    # EMA and warm-up: the recipe's values, scaled to the run's 2 x 120 steps as v1's are
    assert (cfg.warmup_steps, cfg.ema_warmups, cfg.ema_decay) == tuple(
        scaled_schedule(2 * 120).values())
    # strong augmentation and multi-scale stop at the recipe's epoch 117 (0-based)
    policy = trainer.train_loader.dataset.transforms
    assert isinstance(policy, StopEpochPolicy) and policy.stop_epoch == 117
    collate = trainer.train_loader.collate_fn
    assert isinstance(collate, EpochCollate) and collate.followers == (policy,)
    assert isinstance(collate.collate, MultiScaleCollate)
    assert collate.collate.stop_epoch == 117 and collate.collate.sizes == recipe.collate(
        128).collate.sizes
    crit = trainer.model.criterion
    assert crit.weights == dict(recipe.loss_weights)
    assert (crit.alpha, crit.gamma) == (recipe.vfl_alpha, recipe.vfl_gamma)
    m = crit.matcher
    assert dict(cost_class=m.cost_class, cost_bbox=m.cost_bbox,
                cost_giou=m.cost_giou) == dict(recipe.matcher_weights)
    line = recipe_line(plan, trainer)
    assert "\n" not in line and line.startswith("recipe: rtdetrv2_r34vd (120 epochs)")
    assert "strong augmentation in epochs 1-117 of 120" in line
    assert "backbone 5e-05" in line and line.endswith("overridden by flags: nothing")


@pytest.mark.pycocotools
def test_v2_checkpoint_infers_the_preset_and_its_recipe(coco, tmp_path):
    torch.manual_seed(0)
    model = RTDETR.from_name("rtdetrv2_r18vd", num_classes=80, **SMALL)
    path = tmp_path / "v2_coco80.pth"
    torch.save({"model": model.state_dict()}, path)
    trainer, plan, _ = prepare(coco, tmp_path / "run", "--checkpoint", str(path))
    recipe = recipe_for("rtdetrv2_r18vd")
    assert trainer.model.config.name == plan.preset == trainer.cfg.recipe == "rtdetrv2_r18vd"
    assert groups_of(trainer) == recipe_groups(recipe, trainer.model)
    assert [g[0] for g in groups_of(trainer)] == ["no_decay", "default"]
    # r18's recipe trains at one scale: the collate only forwards set_epoch to the policy
    collate = trainer.train_loader.collate_fn
    assert collate.collate is collate_fn
    assert trainer.train_loader.dataset.transforms.stop_epoch == 117


# ------------------------------------------------------------------------- flags win
@pytest.mark.pycocotools
def test_flags_override_the_recipe(coco, tmp_path):
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r34vd", "--epochs", "12",
                               "--lr", "2e-4", "--backbone-lr", "3e-5", "--no-multi-scale",
                               "--warmup-steps", "1", "--no-ema")
    cfg = trainer.cfg
    assert (cfg.epochs, cfg.lr, cfg.warmup_steps, cfg.ema) == (12, 2e-4, 1, False)
    assert [g[:3] for g in groups_of(trainer)] == [
        ("backbone", 3e-5, 1e-4), ("backbone_norm", 3e-5, 0.0), ("no_decay", 2e-4, 0.0),
        ("default", 2e-4, 1e-4)]
    assert trainer.train_loader.collate_fn.collate is collate_fn
    assert trainer.train_loader.dataset.transforms.stop_epoch == 9
    line = recipe_line(plan, trainer)
    assert "(120 epochs), run for 12" in line and "no multi-scale" in line
    assert line.endswith("overridden by flags: --epochs 12, --lr 0.0002, --backbone-lr 3e-05, "
                         "--warmup-steps 1, --no-multi-scale, --no-ema")


@pytest.mark.pycocotools
def test_backbone_lr_splits_a_recipe_without_backbone_groups(coco, tmp_path):
    # rtdetrv2_r18vd trains its backbone at the base lr: --backbone-lr takes the backbone's
    # parameters out of the groups they share with the encoder and decoder
    trainer, _, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r18vd", "--backbone-lr",
                            "3e-5")
    groups = groups_of(trainer)
    assert [g[:3] for g in groups] == [("backbone_no_decay", 3e-5, 0.0), ("no_decay", 1e-4, 0.0),
                                       ("backbone", 3e-5, 1e-4), ("default", 1e-4, 1e-4)]
    for name, lr, wd, params in groups:
        assert all(("backbone" in p) == name.startswith("backbone") for p in params)
    total = sum(len(g[3]) for g in groups)
    assert total == sum(p.requires_grad for p in trainer.model.parameters())


# ------------------------------------------------------------------------- the stop epochs
@pytest.mark.parametrize("preset,epochs,stop", [
    ("rtdetrv2_r18vd", 120, 117),  # the recipe's own length: its own stop
    ("rtdetrv2_r18vd", 240, 237),  # longer: the same 3 final epochs
    ("rtdetrv2_r18vd", 12, 9),     # shorter: the same 3 final epochs ...
    ("rtdetrv2_r18vd", 6, 3),
    ("rtdetrv2_r18vd", 4, 2),      # ... but never before half the run
    ("rtdetrv2_r18vd", 2, 1),
    ("rtdetrv2_r18vd", 1, 1),
    ("rtdetrv2_r50vd_m", 84, 81),
    ("rtdetrv2_r50vd_m", 24, 21),
    ("rtdetrv2_r50vd", 72, 71),
    ("rtdetrv2_r50vd", 12, 11),
    ("rtdetrv2_r50vd", 1, 1),
])
def test_stop_epochs_keep_the_recipes_distance_from_the_end(preset, epochs, stop):
    run = recipe_for(preset).for_epochs(epochs)
    assert run.epochs == epochs and run.stop_epoch == stop
    if run.multi_scale:
        assert run.multi_scale_stop_epoch == stop
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        recipe_for(preset).for_epochs(0)


@pytest.mark.pycocotools
def test_stop_epochs_from_the_command_line(coco, tmp_path):
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r34vd", "--epochs", "12")
    assert (plan.stop_epoch, plan.multi_scale_stop_epoch) == (9, 9)
    assert trainer.train_loader.collate_fn.collate.stop_epoch == 9
    assert "strong augmentation in epochs 1-9 of 12" in recipe_line(plan, trainer)
    # --stop-aug-epochs: the final epochs without strong augmentation and multi-scale
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r34vd", "--epochs", "12",
                               "--stop-aug-epochs", "5")
    assert trainer.train_loader.dataset.transforms.stop_epoch == 7
    assert trainer.train_loader.collate_fn.collate.stop_epoch == 7
    # --multi-scale on a recipe without it: it stops with the strong augmentation
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetrv2_r18vd", "--epochs", "12",
                               "--multi-scale")
    assert isinstance(trainer.train_loader.collate_fn.collate, MultiScaleCollate)
    assert trainer.train_loader.collate_fn.collate.stop_epoch == 9


# ------------------------------------------------------------------------- resume
@pytest.mark.pycocotools
def test_resume_keeps_the_recipe_and_its_flags(coco, tmp_path, capsys):
    first = tmp_path / "first"
    argv = ["train", "--data", coco, *TINY, "--preset", "rtdetrv2_r18vd", "--epochs", "1",
            "--backbone-lr", "3e-5", "--stop-aug-epochs", "1", "--max-steps", "1"]
    assert main([*argv, "--output-dir", str(first)]) == 0
    assert "recipe: rtdetrv2_r18vd (120 epochs), run for 1" in capsys.readouterr().err
    state = torch.load(first / "last.pth", weights_only=True)
    saved = state["train_config"]
    assert saved["recipe"] == "rtdetrv2_r18vd"
    assert dict(saved["recipe_overrides"]) == {"backbone_lr": 3e-5, "stop_aug_epochs": 1}
    # resumed without those flags: the same recipe, groups and stop rule
    trainer, plan, _ = prepare(coco, tmp_path / "second", "--resume", str(first / "last.pth"),
                               "--epochs", "3")
    assert plan.from_checkpoint and trainer.cfg.recipe == "rtdetrv2_r18vd"
    assert [g[0] for g in groups_of(trainer)] == ["backbone_no_decay", "no_decay", "backbone",
                                                  "default"]
    assert trainer.schedule.base == state["scheduler"]["base"]
    assert trainer.train_loader.dataset.transforms.stop_epoch == 2  # 3 - 1
    assert "from the resumed checkpoint" in recipe_line(plan, trainer)
    # and it trains on (the optimizer state fits the recipe's groups)
    assert main(["train", "--data", coco, *TINY, "--resume", str(first / "last.pth"),
                 "--epochs", "2", "--max-steps", "1", "--output-dir", str(tmp_path / "third")]
                ) == 0
    resumed = torch.load(tmp_path / "third" / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["train_config"]["recipe"] == "rtdetrv2_r18vd"
    assert dict(resumed["train_config"]["recipe_overrides"]) == dict(saved["recipe_overrides"])


def test_a_run_without_a_recorded_recipe_resumes_with_the_v1_groups():
    # checkpoints of v1 runs, and of v2 runs of versions before recipes: the v1 groups
    args = build_parser().parse_args(["train", "--data", "x"])
    plan = plan_training(args, "rtdetrv2_r18vd", saved={"epochs": 5})
    assert plan.recipe is None and plan.epochs == 72 and plan.lr == 1e-4
    plan = plan_training(args, "rtdetrv2_r18vd", saved={"epochs": 5, "recipe": None})
    assert plan.recipe is None
    plan = plan_training(args, "rtdetrv2_r18vd", saved={"epochs": 5,
                                                        "recipe": "rtdetrv2_r18vd"})
    assert plan.recipe is not None and plan.epochs == 5 and plan.from_checkpoint


# ------------------------------------------------------------------------- v1 unchanged
@pytest.mark.pycocotools
def test_v1_preset_keeps_the_command_defaults(coco, tmp_path):
    trainer, plan, info = prepare(coco, tmp_path, "--preset", "rtdetr_r18vd")
    assert plan.recipe is None and plan.overrides == ()
    steps = info["steps_per_epoch"] * 72
    sched = scaled_schedule(steps)
    assert trainer.cfg == TrainConfig(
        epochs=72, lr=1e-4, backbone_lr=1e-5, warmup_steps=sched["warmup_steps"],
        ema_decay=sched["ema_decay"], ema_warmups=sched["ema_warmups"],
        output_dir=str(tmp_path), seed=0)
    ours = groups_of(trainer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert ours == [(g["name"], g.get("lr", 1e-4), g.get("weight_decay", 1e-4),
                     [names[id(p)] for p in g["params"]])
                    for g in param_groups(trainer.model, TrainConfig())]
    assert trainer.train_loader.collate_fn is collate_fn
    assert isinstance(trainer.train_loader.dataset.transforms, Compose)
    assert recipe_line(plan, trainer).startswith("recipe: none for rtdetr_r18vd")
    # --multi-scale: 0.75x..1.25x the size until the last --stop-aug-epochs (2) epochs
    trainer, plan, _ = prepare(coco, tmp_path, "--preset", "rtdetr_r18vd", "--multi-scale",
                               "--epochs", "10")
    ms = trainer.train_loader.collate_fn
    assert isinstance(ms, MultiScaleCollate) and ms.stop_epoch == 8
    assert ms.sizes == [96, 128, 160]
    assert isinstance(trainer.train_loader.dataset.transforms, Compose)
