"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vit_cli.checkpoint import load_model_state, unwrap_model


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number `updates` (0-based).

    With warmup, min(decay, (1 + n) / (10 + n)): early averages follow the fast-changing
    weights closely instead of remembering the random initialisation for thousands of
    steps (the schedule of TensorFlow's ExponentialMovingAverage with num_updates).
    """
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class ModelEma:
    """ema = decay * ema + (1 - decay) * weights, for parameters; buffers are copied.

    The average lives in its own frozen copy of the model (`.module`), in eval mode, on the
    model's device.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap_model(model)
        weight = 1.0 - ema_decay(self.decay, self.updates, self.warmup)
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), weight)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict, source: str) -> None:
        load_model_state(self.module, state["model"], source=f"{source} (ema)")
        self.updates = int(state["updates"])
