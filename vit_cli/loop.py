"""One training epoch: forward, loss, backward and optimizer step, batch after batch.

The loop takes the run's components as they are built (`components.build_components`) and
knows nothing of config files or ranks: several processes differ only in what their
`Runtime` does (average gradients, agree on skipping a step, sum the epoch's counts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
    """Where training stands; saved in every checkpoint, also in the middle of an epoch."""

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
    # The current epoch so far (in a checkpoint: of all processes), so that an epoch resumed
    # in its middle reports what the uninterrupted epoch reports.
    epoch_seconds: float = 0.0
    loss_sum: float = 0.0  # summed over trained images
    correct: int = 0
    seen: int = 0
    part_sums: dict[str, float] = field(default_factory=dict)  # the loss's parts, summed
    window_loss: float = 0.0  # summed over batches since train/loss was last logged
    window_batches: int = 0

    def start_epoch(self) -> None:
        self.epoch_batches, self.epoch_seconds, self.part_sums = 0, 0.0, {}
        self.clear_sums()

    def clear_sums(self) -> None:
        """Zero the epoch's sums, keeping their names: in every process but the main one,
        whose checkpointed sums hold those of all processes."""
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.part_sums = dict.fromkeys(self.part_sums, 0.0)
        self.window_loss, self.window_batches = 0.0, 0

    def totals(self) -> list[float]:
        """The epoch's sums, in a fixed order, to add up over processes."""
        return [self.loss_sum, self.correct, self.seen, self.window_loss, self.window_batches,
                *self.part_sums.values()]  # fmt: skip

    def set_totals(self, totals: list[float]) -> None:
        self.loss_sum, self.correct, self.seen = totals[0], int(totals[1]), int(totals[2])
        self.window_loss, self.window_batches = totals[3], int(totals[4])
        self.part_sums = dict(zip(self.part_sums, totals[5:], strict=True))


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
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

    def lrs_by_scale(self) -> dict[str, float]:
        """With layer decay or a head lr scale: the lr of each scale of the base lr, by
        TensorBoard tag (`lr/x0.75`); else nothing, as `lr` says it all."""
        groups = self.optimizer.param_groups
        base = groups[0]["initial_lr"]
        lrs = {f"lr/x{group['initial_lr'] / base:.4g}": group["lr"] for group in groups}
        return lrs if len(lrs) > 1 else {}

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
    pause: Callable[[TrainState], bool] | None = None,
) -> None:
    """Train on `loader` from batch `state.epoch_batches` on, until it ends or, after an
    optimizer step, `pause(state)` is true (a step limit, a checkpoint, a stop signal).

    `model` is the module that steps (under DDP and torch.compile when they are on). Each
    optimizer step accumulates gradients over `updater.accumulate` micro-batches; a trailing
    group too small for a full step is dropped, like a partial batch. `mixer` turns each
    batch into mixed images and soft targets. The epoch's sums so far stay in `state`
    (`epoch_train_figures` reads them); the loader skips the batches already done by its
    sampler, without drawing their augmentations.
    """
    model.train()
    device = runtime.device
    micro = 0
    start = time.perf_counter() - state.epoch_seconds
    sinks.epoch_started(state.epoch + 1, settings.epochs, len(loader) - state.epoch_batches)
    updater.zero_grad()
    for images, targets in resumed_epoch(loader, state.epoch_batches):
        state.epoch_batches += 1
        empty = len(targets) == 0  # every file of the batch was unreadable (counted by the data)
        loss_value = 0.0
        with runtime.gradient_sync(model, enabled=micro + 1 == updater.accumulate):
            if not empty:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if mixer is not None:
                    images, targets = mixer(images, targets)  # targets: (B, K) distributions
                if state.epoch == 0 and state.epoch_batches == 1:
                    sinks.train_batch(images, targets, state.step)
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
        state.loss_sum += loss_value * batch
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixed: dominant
        state.correct += int((logits.argmax(dim=1) == labels).sum())
        state.seen += batch
        for name, value in parts.items():
            state.part_sums[name] = state.part_sums.get(name, 0.0) + float(value) * batch
        state.window_loss += loss_value
        state.window_batches += 1
        if micro < updater.accumulate:
            sinks.batch_done(None)
            continue
        micro = 0
        grad_norm = updater.step(state)
        state.epoch_seconds = time.perf_counter() - start
        sinks.batch_done(
            Running(
                loss=state.loss_sum / state.seen,
                acc=state.correct / state.seen,
                lr=updater.lr,
                images_per_s=state.seen * runtime.world_size / state.epoch_seconds,
                parts={name: total / state.seen for name, total in state.part_sums.items()},
            )
        )
        if state.step % settings.log_every_n_steps == 0:
            window = [state.window_loss, state.window_batches]
            window_loss, window_batches = runtime.sum(torch.tensor(window, dtype=torch.float64))
            scalars = {
                "train/loss": float(window_loss / window_batches),
                "lr": updater.lr,
                "grad_norm": grad_norm,
                **updater.lrs_by_scale(),
            }
            scaler = updater.scaler
            if scaler.is_enabled():
                scalars["amp/loss_scale"] = scaler.get_scale()
                scalars["amp/skipped_steps"] = state.skipped_steps
            sinks.scalars(scalars, state.step)
            state.window_loss, state.window_batches = 0.0, 0
        if pause is not None and pause(state):
            break
    state.epoch_seconds = time.perf_counter() - start


def resumed_epoch(loader: DataLoader, skip_batches: int) -> Iterator:
    """The loader's batches from number `skip_batches` on. Its sampler starts further on
    rather than the loader making and dropping those batches, so that their augmentations
    draw nothing from the random state a resumed run continues from."""
    loader.sampler.start = skip_batches * loader.batch_size
    try:
        yield from loader
    finally:
        loader.sampler.start = 0


def summed_over_processes(state: TrainState, runtime: Runtime) -> TrainState:
    """A copy of `state` holding the epoch's sums of all processes: what a checkpoint saves."""
    summed = dataclasses.replace(state, part_sums=dict(state.part_sums))
    summed.set_totals(runtime.sum(torch.tensor(state.totals(), dtype=torch.float64)).tolist())
    return summed


def epoch_train_figures(state: TrainState, runtime: Runtime) -> dict[str, float]:
    """The epoch's train loss, accuracy (%), throughput (img/s) and loss parts, over all
    processes, from the sums in `state`."""
    summed = summed_over_processes(state, runtime)
    if summed.seen == 0:
        return {"loss": float("nan"), "acc": 0.0, "throughput": 0.0}
    return {
        "loss": summed.loss_sum / summed.seen,
        "acc": 100.0 * summed.correct / summed.seen,
        "throughput": summed.seen / max(state.epoch_seconds, 1e-9),
        **{name: total / summed.seen for name, total in summed.part_sums.items()},
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
