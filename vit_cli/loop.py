"""One training epoch: forward, loss, backward and optimizer step, batch after batch.

The loop takes the run's components as they are built (`components.build_components`) and
knows nothing of config files or ranks: several processes differ only in what their
`Runtime` does (average gradients, agree on skipping a step, sum the epoch's counts).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from vit_cli.augment import MixupCutmix
from vit_cli.ema import ModelEma
from vit_cli.errors import UserError
from vit_cli.losses import LossOutput
from vit_cli.precision import Precision
from vit_cli.runtime import Runtime
from vit_cli.sinks import Running, Sink

log = logging.getLogger(__name__)

Loss = Callable[[torch.Tensor, object, torch.Tensor], LossOutput]


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_acc1: float = 0.0
    best_epoch: int = 0
    best_ema_acc1: float = 0.0  # best val top-1 of the weight average (trainer.ema)
    bad_steps: int = 0  # consecutive steps with a non-finite loss
    # Loader batches of the current epoch already consumed, trained on or not (a NaN loss,
    # a batch of unreadable files): a resumed epoch skips exactly these.
    epoch_batches: int = 0
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped for non-finite gradients


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    max_steps: int | None  # stop once this many optimizer steps are done
    max_bad_steps: int  # stop after this many consecutive non-finite losses
    log_every_n_steps: int


class Updater:
    """The optimizer side of a step on `model`'s parameters: loss scaling, accumulation over
    `accumulate` micro-batches, gradient clipping, the optimizer, its lr schedule and the
    weight average."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        accumulate: int = 1,
        grad_clip: float | None = None,
        ema: ModelEma | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.accumulate = accumulate
        self.clip = grad_clip or math.inf
        self.ema = ema

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate).backward()

    def step(self, state: TrainState) -> float:
        """Apply the accumulated gradients; returns their norm before clipping."""
        # Unscale first so that clipping sees the true gradient norm.
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped by the scaler when gradients are not finite
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            state.skipped_steps += 1
        self.zero_grad()
        self.scheduler.step()
        state.step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Loss,
    updater: Updater,
    precision: Precision,
    runtime: Runtime,
    state: TrainState,
    settings: LoopSettings,
    sinks: Sink,
    mixer: MixupCutmix | None = None,
) -> dict[str, float]:
    """One pass over `loader`, less the `state.epoch_batches` a resumed epoch already did.

    `model` is the module that steps (under DDP and torch.compile when they are on). Each
    optimizer step accumulates gradients over `updater.accumulate` micro-batches; a trailing
    group too small for a full step is dropped, like a partial batch. `mixer` turns each
    batch into mixed images and soft targets. Returns the epoch's train loss, accuracy (%),
    throughput (img/s) and loss parts, over all processes.
    """
    model.train()
    device = runtime.device
    skip = state.epoch_batches
    loss_sum, correct, seen, micro = 0.0, 0, 0, 0
    part_sums: dict[str, float] = {}
    window_loss, window_batches = 0.0, 0
    start = time.perf_counter()
    sinks.epoch_started(state.epoch + 1, settings.epochs, len(loader) - skip)
    updater.zero_grad()
    for images, targets in itertools.islice(loader, skip, None):
        if settings.max_steps is not None and state.step >= settings.max_steps:
            break
        state.epoch_batches += 1
        empty = len(targets) == 0  # every file of the batch was unreadable (counted by the data)
        loss_value = 0.0
        with runtime.gradient_sync(model, enabled=micro + 1 == updater.accumulate):
            if not empty:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if mixer is not None:
                    images, targets = mixer(images, targets)  # targets: (B, K) distributions
                with precision.autocast():
                    loss, logits, parts = loss_fn(images, model(images), targets)
                loss_value = float(loss.detach())
            # Every process skips a batch that any of them cannot train on: DDP's backward
            # waits for all of them.
            any_empty, any_bad = runtime.any([empty, not math.isfinite(loss_value)])
            if any_empty:
                sinks.batch_done(None)
                continue
            if any_bad:
                _count_bad_step(state, loss_value, settings.max_bad_steps)
                # The whole accumulation group is dropped: its gradients are incomplete.
                updater.zero_grad()
                micro = 0
                sinks.batch_done(None)
                continue
            state.bad_steps = 0
            updater.backward(loss)
        micro += 1

        batch = len(targets)
        loss_sum += loss_value * batch
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixed: dominant
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += batch
        for name, value in parts.items():
            part_sums[name] = part_sums.get(name, 0.0) + float(value) * batch
        window_loss += loss_value
        window_batches += 1
        if micro < updater.accumulate:
            sinks.batch_done(None)
            continue
        micro = 0
        grad_norm = updater.step(state)
        elapsed = time.perf_counter() - start
        sinks.batch_done(
            Running(
                loss=loss_sum / seen,
                acc=correct / seen,
                lr=updater.lr,
                images_per_s=seen * runtime.world_size / elapsed,
                parts={name: total / seen for name, total in part_sums.items()},
            )
        )
        if state.step % settings.log_every_n_steps == 0:
            window = runtime.sum(torch.tensor([window_loss, window_batches], dtype=torch.float64))
            scalars = {
                "train/loss": float(window[0] / window[1]),
                "lr": updater.lr,
                "grad_norm": grad_norm,
            }
            scaler = updater.scaler
            if scaler.is_enabled():
                scalars["amp/loss_scale"] = scaler.get_scale()
                scalars["amp/skipped_steps"] = state.skipped_steps
            sinks.scalars(scalars, state.step)
            window_loss, window_batches = 0.0, 0
    elapsed = time.perf_counter() - start
    counts = torch.tensor([loss_sum, correct, seen, *part_sums.values()], dtype=torch.float64)
    totals = runtime.sum(counts).tolist()
    loss_sum, correct, seen = totals[0], int(totals[1]), int(totals[2])
    if seen == 0:
        return {"loss": float("nan"), "acc": 0.0, "throughput": 0.0}
    parts_mean = {name: total / seen for name, total in zip(part_sums, totals[3:], strict=True)}
    return {
        "loss": loss_sum / seen,
        "acc": 100.0 * correct / seen,
        "throughput": seen / elapsed,
        **parts_mean,
    }


def _count_bad_step(state: TrainState, loss_value: float, max_bad_steps: int) -> None:
    """Skip a non-finite loss, and stop the run when too many come in a row."""
    state.bad_steps += 1
    shown = "NaN or inf in another process" if math.isfinite(loss_value) else loss_value
    if state.bad_steps >= max_bad_steps:
        raise UserError(
            f"Loss was {shown} for {state.bad_steps} consecutive steps (last at step "
            f"{state.step}). Lower optimizer.lr or trainer.grad_clip, or use precision=bf16 or "
            "fp32; the checkpoints already written are untouched."
        )
    log.warning("non-finite loss %s at step %d: step skipped", shown, state.step)
