"""What a training run of a preset trains with: a v2 preset's recipe scaled to the run, the
v1 presets' defaults, the flags given and, on resume, the settings the checkpoint recorded."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import torch

from .recipes import RECIPES, Recipe, recipe_for


# the v1 presets' training defaults (the command's own, unchanged); v2 presets use their recipe
V1_TRAIN_DEFAULTS = dict(epochs=72, lr=1e-4, backbone_lr=1e-5, stop_aug_epochs=2,
                         multi_scale=False)
# train flags that override a recipe: argparse dest -> option (their defaults are None)
RECIPE_FLAGS = {"epochs": "--epochs", "lr": "--lr", "backbone_lr": "--backbone-lr",
                "warmup_steps": "--warmup-steps", "stop_aug_epochs": "--stop-aug-epochs",
                "multi_scale": "--multi-scale", "augment": "--augment", "no_ema": "--no-ema"}


def uses_recipe(preset: str) -> bool:
    """Whether ``rtdetr-fast train`` trains ``preset`` with its recipe
    (:func:`rtdetr_fast.engine.recipes.recipe_for`): the RT-DETRv2 presets. The v1 presets keep
    the command's defaults (``V1_TRAIN_DEFAULTS``; their optimizer groups equal the v1 recipe's)."""
    return preset in RECIPES and not preset.startswith("rtdetr_")


def saved_train_config(path: Optional[str]) -> Optional[dict]:
    """The ``train_config`` a training checkpoint holds, or None (none, or unreadable: resuming
    reports that)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: no mmap
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    cfg = state.get("train_config") if isinstance(state, dict) else None
    return cfg if isinstance(cfg, dict) else None


def _given(args) -> dict:
    """The recipe flags given on the command line (dest -> value)."""
    out = {}
    for dest in RECIPE_FLAGS:
        value = getattr(args, dest, None)
        if value is not None and not (dest == "no_ema" and not value):
            out[dest] = value
    return out


@dataclasses.dataclass
class TrainPlan:
    """What ``rtdetr-fast train`` trains with: ``recipe`` is the preset's recipe scaled to the
    run (``Recipe.for_epochs``, then the flags), None for the v1 defaults."""
    preset: str
    recipe: Optional[Recipe]
    epochs: int
    lr: float
    backbone_lr: Optional[float]
    warmup_steps: Optional[int]
    stop_epoch: Optional[int]  # 0-based epoch from which strong augmentation stops (None: never)
    multi_scale: bool
    multi_scale_stop_epoch: Optional[int]
    augment: str
    ema: bool
    overrides: Tuple[Tuple[str, object], ...]
    from_checkpoint: bool = False


def plan_training(args, preset: str, saved: Optional[dict] = None) -> TrainPlan:
    """The settings of a run of ``preset``: a v2 preset's recipe, the command's defaults for a v1
    preset; flags given explicitly win. ``saved``: the resumed checkpoint's ``train_config``,
    whose recipe (None for runs without one, v1 and runs of older versions) and recorded flags
    the run continues with; flags given again win over those."""
    given = _given(args)
    resumed = saved is not None
    name = saved.get("recipe") if resumed else (preset if uses_recipe(preset) else None)
    if name is None:
        d = dict(V1_TRAIN_DEFAULTS, **given)
        epochs = d["epochs"]
        multi = bool(d["multi_scale"])
        return TrainPlan(preset, None, epochs, d["lr"], d["backbone_lr"], d.get("warmup_steps"),
                         None, multi, epochs - d["stop_aug_epochs"] if multi else None,
                         d.get("augment", "official"), not d.get("no_ema", False),
                         tuple(given.items()), resumed)
    recipe = recipe_for(name)
    overrides = dict(saved.get("recipe_overrides") or ()) if resumed else {}
    overrides.update(given)
    if resumed and "epochs" not in given:
        epochs = int(saved.get("epochs", recipe.epochs))
    else:
        epochs = int(overrides.get("epochs", recipe.epochs))
    multi = overrides.get("multi_scale")
    if multi is not None and bool(multi) != recipe.multi_scale:
        recipe = dataclasses.replace(recipe, multi_scale=bool(multi),
                                     multi_scale_stop_epoch=recipe.stop_epoch)
    run = recipe.for_epochs(epochs)
    if "stop_aug_epochs" in overrides:
        stop = max(0, epochs - int(overrides["stop_aug_epochs"]))
        run = dataclasses.replace(run, stop_epoch=stop, multi_scale_stop_epoch=stop)
    return TrainPlan(name, run, epochs, float(overrides.get("lr", recipe.lr)),
                     overrides.get("backbone_lr"), overrides.get("warmup_steps"), run.stop_epoch,
                     run.multi_scale, run.multi_scale_stop_epoch if run.multi_scale else None,
                     overrides.get("augment", "official"), not overrides.get("no_ema", False),
                     tuple(overrides.items()), resumed)
