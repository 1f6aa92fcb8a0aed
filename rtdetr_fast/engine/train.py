"""The training engine: the official RT-DETR recipe (AdamW with a slow backbone, linear warm-up,
EMA, gradient clipping, AMP), exact resume, atomic checkpoints, evaluation each epoch, a JSONL
log and progress bars. Works alone or under torchrun (DistributedDataParallel)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import distributed as D
from .ema import ModelEMA, unwrap
from .recipes import Recipe, recipe_for
from .seeding import seed_epoch, set_deterministic


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 72
    lr: float = 1e-4
    # the backbone's lr; with a ``recipe``, None keeps the recipe's backbone groups as they are
    backbone_lr: Optional[float] = 1e-5
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 2000
    # epochs after which the learning rate is multiplied by lr_gamma
    lr_milestones: Tuple[int, ...] = ()
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmups: int = 2000
    # "none", "bf16" (autocast, no scaler) or "fp16" (autocast with a GradScaler)
    amp: str = "none"
    sync_bn: bool = False
    output_dir: str = "outputs/train"
    eval_every: int = 1
    log_every: int = 10
    progress: bool = True
    # cap on steps per epoch (smoke tests, demos); None = the whole loader
    max_steps_per_epoch: Optional[int] = None
    # the metric that picks best.pth (a key of the evaluation's result)
    best_metric: str = "AP"
    # every epoch's randomness (data order, worker and main-process generators: augmentation,
    # multi-scale sizes, denoising noise) drawn from (seed, epoch, rank); None: the generators
    # run on from wherever they are (still restored exactly by resume)
    seed: Optional[int] = None
    # torch.use_deterministic_algorithms(True) and the ops' deterministic backward
    deterministic: bool = False
    # a preset whose training recipe (engine.recipes.recipe_for) gives the optimizer groups and
    # the loss and matcher weights; ``lr``/``weight_decay``/``betas`` stay this config's (the
    # recipe's base settings where the caller passes them). None: the v1 groups above
    recipe: Optional[str] = None
    # what the command line gave over the recipe, as (option, value) pairs: recorded in the
    # checkpoint so that ``--resume`` repeats them (the engine itself does not read them)
    recipe_overrides: Tuple[Tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.recipe is not None:
            recipe_for(self.recipe)  # an unknown name is a ValueError naming the choices
        elif self.backbone_lr is None:
            raise ValueError("backbone_lr=None needs a recipe (it keeps the recipe's backbone "
                             "lrs); give a number for the v1 groups")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def scaled_schedule(total_steps: int, warmup_steps: int = 2000, ema_warmups: int = 2000,
                    ema_decay: float = 0.9999) -> Dict[str, float]:
    """Warm-up and EMA settings for a run of ``total_steps`` optimizer steps.

    The official recipe (2000 warm-up steps, EMA decay 0.9999 over 2000 warm-up updates) is
    made for COCO, where 72 epochs are ~260k steps and the warm-up is under 1% of the run. On a
    small data set the same numbers mean the whole run stays in warm-up (lr near zero) and the
    EMA averages mostly the initial weights. So: warm-up = 5% of the run (at most 2000), the
    EMA's warm-up = 10% of the run (at most 2000) and its decay such that it averages over
    about the last 10% of the run (1 - 1 / (0.1 * steps), at most 0.9999). A COCO-sized run
    gets the official values back. ``warmup_steps``, ``ema_warmups``, ``ema_decay``: the
    recipe's values, the caps (the official ones by default)."""
    total_steps = max(int(total_steps), 1)
    return {"warmup_steps": min(int(warmup_steps), total_steps // 20),
            "ema_warmups": max(1, min(int(ema_warmups), total_steps // 10)),
            "ema_decay": min(float(ema_decay), max(0.0, 1.0 - 10.0 / total_steps))}


# official parameter groups, by parameter name (the regexes of the released configs)
_BACKBONE_NORM = re.compile(r"^(?=.*backbone)(?=.*norm).*$")
_BACKBONE_OTHER = re.compile(r"^(?=.*backbone)(?!.*norm).*$")
_HEAD_NORM_BIAS = re.compile(r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$")


def param_groups(model: nn.Module, cfg: TrainConfig,
                 recipe: Optional[Recipe] = None) -> List[Dict]:
    """The optimizer groups: ``recipe``'s or ``cfg.recipe``'s (see :func:`recipe_param_groups`),
    else the v1 groups: backbone at ``backbone_lr`` (its norms without weight decay),
    encoder/decoder norms and biases without weight decay, the rest at ``lr``."""
    if recipe is not None or cfg.recipe is not None:
        return recipe_param_groups(model, cfg, recipe)
    groups = {"backbone_norm": [], "backbone": [], "no_decay": [], "default": []}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        if _BACKBONE_NORM.match(name):
            groups["backbone_norm"].append(p)
        elif _BACKBONE_OTHER.match(name):
            groups["backbone"].append(p)
        elif _HEAD_NORM_BIAS.match(name):
            groups["no_decay"].append(p)
        else:
            groups["default"].append(p)
    settings = {"backbone_norm": dict(lr=cfg.backbone_lr, weight_decay=0.0),
                "backbone": dict(lr=cfg.backbone_lr), "no_decay": dict(weight_decay=0.0),
                "default": {}}
    return [dict(params=ps, name=n, **settings[n]) for n, ps in groups.items() if ps]


def recipe_param_groups(model: nn.Module, cfg: TrainConfig,
                        recipe: Optional[Recipe] = None) -> List[Dict]:
    """The groups of ``recipe`` (default: the registered recipe named by ``cfg.recipe``);
    groups without an lr of their own take ``cfg.lr`` (the optimizer's). ``cfg.backbone_lr``
    not None sets every trainable backbone parameter's lr: a group holding backbone and other
    parameters is split, its backbone part (``backbone_<name>``, or ``backbone`` for the
    default group) placed just before it."""
    groups = (recipe or recipe_for(cfg.recipe)).param_groups(model)
    if cfg.backbone_lr is None:
        return groups
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    out = []
    for g in groups:
        rest = {k: v for k, v in g.items() if k not in ("params", "name", "lr")}
        bb = [p for p in g["params"] if "backbone" in names[id(p)]]
        other = [p for p in g["params"] if "backbone" not in names[id(p)]]
        if bb and not other:
            out.append(dict(g, lr=cfg.backbone_lr))
            continue
        if bb:
            name = g["name"]
            bb_name = name if name.startswith("backbone") else (
                "backbone" if name == "default" else f"backbone_{name}")
            out.append(dict(params=bb, name=bb_name, lr=cfg.backbone_lr, **rest))
        out.append(dict(g, params=other))
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    recipe: Optional[Recipe] = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg, recipe), lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)


class LRSchedule:
    """lr = base * min(1, (step + 1) / warmup_steps) * gamma ** (milestones passed)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.optimizer = optimizer
        self.cfg = cfg
        self.base = [g["lr"] for g in optimizer.param_groups]

    def factor(self, step: int, epoch: int) -> float:
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps > 0 else 1.0
        decay = self.cfg.lr_gamma ** sum(epoch >= m for m in self.cfg.lr_milestones)
        return warm * decay

    def apply(self, step: int, epoch: int) -> None:
        f = self.factor(step, epoch)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def state_dict(self) -> dict:
        return {"base": list(self.base)}

    def load_state_dict(self, state: dict) -> None:
        self.base = list(state["base"])


def _rng_state() -> dict:
    # numpy's key array as a tensor, so the checkpoint loads with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


class Trainer:
    """``train_loader`` yields (images [B,3,H,W] float in [0,1], targets) with targets as
    :meth:`RTDETR.forward` takes them. ``evaluate_fn(model)`` returns a dict of metrics (the
    COCO numbers); it gets the EMA model when EMA is on. ``recipe``: a :class:`Recipe` whose
    optimizer groups and loss and matcher weights the run takes (default: the registered recipe
    ``cfg.recipe`` names, if any); :meth:`from_recipe` also takes its base settings."""

    def __init__(self, model: nn.Module, train_loader: Iterable, cfg: TrainConfig,
                 evaluate_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                 device: torch.device | str = "cpu", recipe: Optional[Recipe] = None):
        self.cfg = cfg
        if cfg.deterministic:
            set_deterministic(True)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.evaluate_fn = evaluate_fn
        if recipe is not None and cfg.recipe != recipe.preset:
            raise ValueError(f"recipe {recipe.preset!r} given with TrainConfig(recipe="
                             f"{cfg.recipe!r}): they must name the same preset "
                             "(Trainer.from_recipe sets it)")
        if recipe is None and cfg.recipe is not None:
            recipe = recipe_for(cfg.recipe)
        if recipe is not None:
            recipe.configure_criterion(self.model)
        self.optimizer = build_optimizer(self.model, cfg, recipe)
        self.schedule = LRSchedule(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_warmups) if cfg.ema else None
        self.ddp_model = D.wrap_model(self.model, self.device, cfg.sync_bn)
        self.epoch = 0
        self.step = 0
        self.best: Optional[float] = None
        self.history: List[Dict] = []
        self.main = D.is_main_process()
        self.log_path = os.path.join(cfg.output_dir, "log.jsonl")

    @classmethod
    def from_recipe(cls, recipe: Recipe, model: nn.Module, train_loader: Iterable,
                    cfg: Optional[TrainConfig] = None, **kwargs) -> "Trainer":
        """A Trainer with ``recipe``'s optimizer groups, loss and matcher weights
        (``TrainConfig.recipe`` set to its preset; ``cfg``'s other settings are kept, its base
        lr, weight decay and betas become the recipe's and the backbone groups keep the
        recipe's lrs)."""
        if cfg is None:
            cfg = TrainConfig(epochs=recipe.epochs, warmup_steps=recipe.warmup_steps,
                              ema_decay=recipe.ema_decay, ema_warmups=recipe.ema_warmups,
                              clip_max_norm=recipe.clip_max_norm)
        cfg = dataclasses.replace(cfg, recipe=recipe.preset, lr=recipe.lr, backbone_lr=None,
                                  weight_decay=recipe.weight_decay, betas=recipe.betas)
        return cls(model, train_loader, cfg, recipe=recipe, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": unwrap(self.model).state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "best": self.best,
                "rng": _rng_state(), "seed": self.cfg.seed,
                "train_config": dataclasses.asdict(self.cfg),
                "model_config": dataclasses.asdict(unwrap(self.model).config)
                if hasattr(unwrap(self.model), "config") else None}

    def save(self, path: str) -> None:
        if self.main:
            atomic_save(self.state_dict(), path)

    def save_best(self, path: str, metric: Optional[float] = None) -> None:
        """The model only (EMA weights when EMA is on) and its config: what ``from_pretrained``,
        ``eval`` and ``predict`` need, without the optimizer state (a third of the size)."""
        if not self.main:
            return
        model = self.ema.module if self.ema else unwrap(self.model)
        atomic_save({"model": model.state_dict(),
                     "model_config": dataclasses.asdict(model.config)
                     if hasattr(model, "config") else None,
                     "epoch": self.epoch, "step": self.step,
                     "metric": {self.cfg.best_metric: metric}}, path)

    def resume(self, path: str) -> None:
        """Continue exactly where the checkpoint at ``path`` stopped."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint to resume from at {path!r}")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read training checkpoint {path!r}: {exc}") from exc
        missing = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng"} - set(state)
        if missing:
            raise ValueError(f"{path!r} is not a training checkpoint of this engine (lacks "
                             f"{sorted(missing)}); to start from its weights, load them with "
                             "RTDETR.from_pretrained instead")
        saved_cfg = state.get("train_config")
        if isinstance(saved_cfg, dict):
            # a checkpoint of an engine without recipes trained with the v1 groups
            theirs = saved_cfg.get("recipe")
            if theirs != self.cfg.recipe:
                def say(r):
                    return f"recipe {r}" if r else "the v1 groups (no recipe)"

                raise ValueError(f"cannot resume {path!r}: it was trained with {say(theirs)}, "
                                 f"this run has {say(self.cfg.recipe)}")
        model = unwrap(self.model)
        saved, own = state.get("model_config"), getattr(model, "config", None)
        if isinstance(saved, dict) and own is not None:
            mine = dataclasses.asdict(own)
            for key in ("name", "num_classes"):
                if key in saved and saved[key] != mine.get(key):
                    what = "classes" if key == "num_classes" else "preset"
                    raise ValueError(f"cannot resume {path!r}: it was trained with {what} "
                                     f"{saved[key]!r}, this run has {mine.get(key)!r}")
        try:
            model.load_state_dict(state["model"])
            if self.ema and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot resume {path!r}: its model does not fit this run's "
                             f"({str(exc).splitlines()[0]})") from exc
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state.get("best")
        _set_rng_state(state["rng"])
        saved_seed = state.get("seed")
        if self.cfg.seed is None and saved_seed is not None:
            # the run's own seed, so the next epochs draw what the uninterrupted run draws
            self.cfg = dataclasses.replace(self.cfg, seed=int(saved_seed))
        elif saved_seed is not None and self.cfg.seed != saved_seed:
            import warnings

            warnings.warn(f"resuming {path!r} with seed {self.cfg.seed}; it was trained with "
                          f"seed {saved_seed}, so the next epochs differ from that run's",
                          RuntimeWarning, stacklevel=2)
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop the log records of steps after the checkpoint (an interrupted epoch), so the
        resumed run's log reads as the uninterrupted run's."""
        if not (self.main and os.path.isfile(self.log_path)):
            return
        with open(self.log_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) > self.step:
                    continue
            except (ValueError, AttributeError):
                pass
            keep.append(line)
        if len(keep) != len(lines):
            with open(self.log_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.log_path + ".tmp", self.log_path)

    # ------------------------------------------------------------------ loop
    def _log(self, record: Dict) -> None:
        self.history.append(record)
        if self.main:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _autocast(self):
        if self.cfg.amp == "none":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, images, targets) -> Dict[str, float]:
        images, targets = _to_device(images, targets, self.device)
        self.schedule.apply(self.step, self.epoch)
        with self._autocast():
            out = self.ddp_model(images, targets)
        loss = out["loss"]
        if not torch.isfinite(loss):
            last = os.path.join(self.cfg.output_dir, "last.pth")
            terms = {k: float(v.detach()) for k, v in out["loss_dict"].items()
                     if not torch.isfinite(v)}
            raise TrainingDiverged(
                f"loss is {float(loss.detach())} in epoch {self.epoch + 1} at step {self.step + 1} "
                f"(non-finite terms: {terms}); training stopped. The last good checkpoint is "
                f"untouched{' at ' + last if os.path.exists(last) else ''}; lower the learning "
                "rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return {"loss": float(loss.detach()),
                **{k: float(v.detach()) for k, v in out["loss_dict"].items()
                   if "_aux_" not in k and "_dn_" not in k}}

    def train_one_epoch(self) -> Dict[str, float]:
        self.ddp_model.train()
        # self.epoch: epochs done so far, i.e. the 0-based index of this epoch (what PyTorch's
        # set_epoch takes); the log, progress bar and checkpoints show it plus one
        if self.cfg.seed is not None:
            seed_epoch(self.cfg.seed, self.epoch, D.get_rank())
        for obj in (getattr(self.train_loader, "sampler", None),
                    getattr(self.train_loader, "collate_fn", None),
                    getattr(self.train_loader, "worker_init_fn", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        total = None
        if hasattr(self.train_loader, "__len__"):
            total = len(self.train_loader)
            if self.cfg.max_steps_per_epoch:
                total = min(total, self.cfg.max_steps_per_epoch)
        bar = None
        if self.cfg.progress and self.main:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        sums: Dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        try:
            for images, targets in self.train_loader:
                stats = self.train_step(images, targets)
                n += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}",
                                    lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}")
                if self.cfg.log_every and self.step % self.cfg.log_every == 0:
                    # epochs count from 1 in the log, as in the epoch records
                    self._log({"type": "step", "epoch": self.epoch + 1, "step": self.step,
                               "lr": self.optimizer.param_groups[-1]["lr"], **stats})
                if self.cfg.max_steps_per_epoch and n >= self.cfg.max_steps_per_epoch:
                    break
        finally:
            # also on an error or Ctrl-C, so a message starts on a clean line
            if bar is not None:
                bar.close()
        if n == 0:
            size = len(getattr(self.train_loader, "dataset", ())) if hasattr(
                getattr(self.train_loader, "dataset", None), "__len__") else "?"
            raise ValueError(f"the training loader yielded no batch (data set of {size} images, "
                             f"batch size {getattr(self.train_loader, 'batch_size', '?')}); "
                             "use a smaller batch size or more images")
        means = {k: v / max(n, 1) for k, v in sums.items()}
        means["steps"] = n
        means["seconds"] = time.perf_counter() - t0
        return means

    def evaluate(self) -> Dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        model = self.ema.module if self.ema else unwrap(self.model)
        return self.evaluate_fn(model)

    def fit(self) -> List[Dict]:
        """Train from ``self.epoch`` to ``cfg.epochs``: last.pth every epoch, best.pth on the
        best ``best_metric``. Returns the epoch records."""
        return self.fit_epochs(self.cfg.epochs - self.epoch)

    def fit_epochs(self, n: int) -> List[Dict]:
        """Train ``n`` more epochs (at most up to ``cfg.epochs``), as :meth:`fit` does."""
        out = self.cfg.output_dir
        epochs = []
        stop = min(self.epoch + n, self.cfg.epochs)
        while self.epoch < stop:
            train_stats = self.train_one_epoch()
            self.epoch += 1
            record = {"type": "epoch", "epoch": self.epoch, "step": self.step,
                      **{f"train_{k}": v for k, v in train_stats.items()}}
            if self.evaluate_fn and (self.epoch % self.cfg.eval_every == 0
                                     or self.epoch == self.cfg.epochs):
                metrics = self.evaluate()
                record.update({f"eval_{k}": v for k, v in metrics.items()})
                score = metrics.get(self.cfg.best_metric)
                if score is not None and (self.best is None or score > self.best):
                    self.best = score
                    self.save_best(os.path.join(out, "best.pth"), score)
            self.save(os.path.join(out, "last.pth"))
            self._log(record)
            epochs.append(record)
        return epochs
