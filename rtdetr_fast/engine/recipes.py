"""The official training recipes, by preset: plain data (epochs, stop epochs, AdamW groups,
EMA, clipping, loss and matcher weights) that the Trainer takes
(:meth:`rtdetr_fast.engine.train.Trainer.from_recipe`, ``TrainConfig(recipe=...)``)."""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Tuple

import torch

from ..data.policies import EpochCollate, StopEpochPolicy
from ..data.transforms import MultiScaleCollate, collate_fn, train_transforms
from .ema import unwrap


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One optimizer group of an official config: the parameters whose name matches
    ``pattern`` (the config's regex, searched as the official ``re.findall``), with their own
    ``lr`` and/or ``weight_decay`` (None: the optimizer's)."""
    name: str
    pattern: str
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


OFFICIAL_SCALES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An official training recipe (configs/rtdetr*/): epochs, the 0-based epoch from which the
    strong augmentations and multi-scale training stop, the AdamW groups, EMA, clipping, the
    loss and matcher weights. Defaults are the shared include files' values."""
    preset: str
    epochs: int = 72
    stop_epoch: int = 71
    multi_scale: bool = True
    multi_scale_stop_epoch: int = 71
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    groups: Tuple[ParamGroup, ...] = ()
    warmup_steps: int = 2000
    ema_decay: float = 0.9999
    ema_warmups: int = 2000
    clip_max_norm: float = 0.1
    total_batch_size: int = 16
    # RTDETRCriterion(v2) and HungarianMatcher, as the configs set them
    loss_weights: Tuple[Tuple[str, float], ...] = (("loss_vfl", 1.0), ("loss_bbox", 5.0),
                                                   ("loss_giou", 2.0))
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    matcher_weights: Tuple[Tuple[str, float], ...] = (("cost_class", 2.0), ("cost_bbox", 5.0),
                                                      ("cost_giou", 2.0))
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0

    def param_groups(self, model) -> list:
        """AdamW groups as the official ``get_optim_params`` makes them: each group takes the
        trainable parameters its regex finds in their names, the rest form a last group with
        the optimizer's settings. A parameter matched by two groups is an error (the official
        optimizer refuses it too)."""
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        taken: Dict[str, str] = {}
        out = []
        for g in self.groups:
            params = []
            for n, p in named:
                if re.findall(g.pattern, n):
                    if n in taken:
                        raise ValueError(f"parameter {n} is in optimizer groups {taken[n]} and "
                                         f"{g.name}")
                    taken[n] = g.name
                    params.append(p)
            settings = {k: v for k, v in (("lr", g.lr), ("weight_decay", g.weight_decay))
                        if v is not None}
            if params:
                out.append(dict(params=params, name=g.name, **settings))
        rest = [p for n, p in named if n not in taken]
        if rest:
            out.append(dict(params=rest, name="default"))
        return out

    def build_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def train_transforms(self, size: Tuple[int, int], generator=None) -> "StopEpochPolicy":
        """The official train pipeline whose strong augmentations stop at ``stop_epoch``."""
        return StopEpochPolicy(train_transforms(size, generator=generator).transforms,
                               self.stop_epoch)

    def collate(self, size: int, *followers) -> "EpochCollate":
        """Batches resized to a size drawn from the official scales (scaled to ``size``)
        until ``multi_scale_stop_epoch`` when the recipe trains multi-scale; ``set_epoch``
        reaches ``followers`` too (pass the ``train_transforms`` policy)."""
        inner = collate_fn
        if self.multi_scale:
            sizes = [max(32, int(round(s * size / 640 / 32)) * 32) for s in OFFICIAL_SCALES]
            inner = MultiScaleCollate(sizes=sizes, stop_epoch=self.multi_scale_stop_epoch)
        return EpochCollate(inner, *followers)

    def for_epochs(self, epochs: int) -> "Recipe":
        """This recipe for a run of ``epochs`` epochs: the stop epochs keep the recipe's
        distance from the end (its last ``epochs - stop_epoch`` epochs train without strong
        augmentation / multi-scale), but never before half the run:
        ``stop = max(epochs - (self.epochs - stop_epoch), ceil(epochs / 2))``. The recipe's own
        length gives its own stops back; a 12-epoch run of a 120-epoch recipe stopping at 117
        stops at 9; a 2-epoch run at 1."""
        epochs = int(epochs)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")

        def scale(stop: int) -> int:
            return max(epochs - max(self.epochs - stop, 0), -(-epochs // 2))

        return dataclasses.replace(self, epochs=epochs, stop_epoch=scale(self.stop_epoch),
                                   multi_scale_stop_epoch=scale(self.multi_scale_stop_epoch))

    def configure_criterion(self, model) -> None:
        """Set the model's loss and matcher weights to this recipe's."""
        crit = getattr(unwrap(model), "criterion", None)
        if crit is None:
            return
        crit.weights = dict(self.loss_weights)
        crit.alpha, crit.gamma = self.vfl_alpha, self.vfl_gamma
        matcher = getattr(crit, "matcher", None)
        if matcher is not None:
            for key, value in self.matcher_weights:
                setattr(matcher, key, value)
            matcher.alpha, matcher.gamma = self.matcher_alpha, self.matcher_gamma


_V1_GROUPS = (  # rtdetr_r18vd_6x_coco.yml (train.param_groups applies them to every v1 preset)
    ParamGroup("backbone_norm", r"^(?=.*backbone)(?=.*norm).*$", lr=1e-5, weight_decay=0.0),
    ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm).*$", lr=1e-5),
    ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", weight_decay=0.0),
)
_V2_R50_GROUPS = (  # configs/rtdetrv2/include/optimizer.yml, rtdetrv2_r50vd{,_m}_*.yml
    ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm).*$", lr=1e-5),
    ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", weight_decay=0.0),
)
RECIPES: Dict[str, Recipe] = {
    **{name: Recipe(name, groups=_V1_GROUPS) for name in
       ("rtdetr_r18vd", "rtdetr_r34vd", "rtdetr_r50vd_m", "rtdetr_r50vd", "rtdetr_r101vd")},
    # rtdetrv2_r18vd_120e_coco.yml: 120 epochs, strong augmentation until 117, no multi-scale
    # (collate scales ~), the backbone at the base lr, no weight decay on any norm
    "rtdetrv2_r18vd": Recipe(
        "rtdetrv2_r18vd", epochs=120, stop_epoch=117, multi_scale=False,
        groups=(ParamGroup("no_decay", r"^(?=.*(?:norm|bn)).*$", weight_decay=0.0),)),
    # rtdetrv2_r34vd_120e_coco.yml: the backbone at 5e-5, multi-scale until 117
    "rtdetrv2_r34vd": Recipe(
        "rtdetrv2_r34vd", epochs=120, stop_epoch=117, multi_scale_stop_epoch=117,
        groups=(ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", lr=5e-5),
                ParamGroup("backbone_norm", r"^(?=.*backbone)(?=.*norm|bn).*$", lr=5e-5,
                           weight_decay=0.0),
                ParamGroup("no_decay", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$",
                           weight_decay=0.0))),
    # rtdetrv2_r50vd_m_7x_coco.yml: 84 epochs, both stops at 81
    "rtdetrv2_r50vd_m": Recipe("rtdetrv2_r50vd_m", epochs=84, stop_epoch=81,
                               multi_scale_stop_epoch=81, groups=_V2_R50_GROUPS),
    "rtdetrv2_r50vd": Recipe("rtdetrv2_r50vd", groups=_V2_R50_GROUPS),
    # rtdetrv2_r101vd_6x_coco.yml: the backbone at 1e-6
    "rtdetrv2_r101vd": Recipe(
        "rtdetrv2_r101vd",
        groups=(ParamGroup("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", lr=1e-6),
                _V2_R50_GROUPS[1])),
}


def recipe_for(preset: str) -> Recipe:
    """The official training recipe of ``preset`` (a model config's ``name``)."""
    if preset not in RECIPES:
        raise ValueError(f"no training recipe for {preset!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    return RECIPES[preset]
