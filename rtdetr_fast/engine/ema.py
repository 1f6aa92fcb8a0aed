"""Exponential moving average of the model's weights (decay ramped up over the first updates)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model, (
        nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0

    def current_decay(self) -> float:
        # small decay early, so the average is not dominated by the random initialisation
        return self.decay * (1 - math.exp(-self.updates / self.warmups))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        live = unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(live[k].detach(), alpha=1 - d)
            else:
                v.copy_(live[k])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "warmups": self.warmups}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
        self.decay = state.get("decay", self.decay)
        self.warmups = state.get("warmups", self.warmups)
