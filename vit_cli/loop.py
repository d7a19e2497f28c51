"""One training epoch: forward, loss, backward and optimizer step, batch after batch.

The loop takes the run's parts as `components.build_components` builds them (`Training`)
and knows nothing of config files or ranks: several processes differ only in what their
`Runtime` does (average gradients, agree on skipping a step, sum the epoch's counts). It
returns why it stopped (`LoopExit`): the epoch ended, or, after an optimizer step, a step
checkpoint is due, trainer.max_steps is reached or a stop signal came.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vit_cli.augment import MixupCutmix
from vit_cli.ema import ModelEma
from vit_cli.errors import UserError
from vit_cli.losses import LossOutput
from vit_cli.precision import Precision
from vit_cli.runtime import Runtime
from vit_cli.sinks import Running, Sink
from vit_cli.stopping import StopRequest
from vit_cli.train_state import TrainState

if TYPE_CHECKING:
    from vit_cli.data import DataBundle

log = logging.getLogger(__name__)

Loss = Callable[[torch.Tensor, object, torch.Tensor], LossOutput]


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    seed: int  # epoch e's data order is fixed by seed + e
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

    def step(self) -> tuple[float, bool]:
        """Apply the accumulated gradients; returns their norm before clipping, and whether
        the GradScaler skipped the update for non-finite gradients."""
        # Unscale first so that clipping sees the true gradient norm.
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped by the scaler when gradients are not finite
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.zero_grad()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm, skipped


@dataclass(frozen=True)
class Training:
    """What the loop trains with. `model` is the module that steps (under DDP and
    torch.compile when they are on); `mixer` turns each batch into mixed images and soft
    targets."""

    model: nn.Module
    data: DataBundle
    loss_fn: Loss
    updater: Updater
    precision: Precision
    runtime: Runtime
    settings: LoopSettings
    mixer: MixupCutmix | None = None


class LoopExit(enum.Enum):
    """Why `train_one_epoch` returned."""

    END_OF_EPOCH = "end of epoch"
    CHECKPOINT_DUE = "step checkpoint due"  # trainer.checkpoint_every_n_steps
    MAX_STEPS = "max steps"  # trainer.max_steps
    STOP_SIGNAL = "stop signal"  # SIGTERM or SIGUSR1, in any process


class Pauses:
    """Whether the loop hands back control after an optimizer step, and why: a stop signal
    that any process received, trainer.max_steps, or every trainer.checkpoint_every_n_steps."""

    def __init__(
        self, stop: StopRequest, runtime: Runtime, max_steps: int | None, every: int | None
    ) -> None:
        self.stop, self.runtime = stop, runtime
        self.max_steps, self.every = max_steps, every
        self.signum: int | None = None  # the signal all processes stop for

    def __call__(self, state: TrainState) -> LoopExit | None:
        (signalled,) = self.runtime.any([self.stop.requested])
        if signalled:
            self.signum = next(n for n in self.runtime.gather(self.stop.signum) if n is not None)
            return LoopExit.STOP_SIGNAL
        if self.at_max_steps(state):
            return LoopExit.MAX_STEPS
        if self.every is not None and state.step % self.every == 0:
            return LoopExit.CHECKPOINT_DUE
        return None

    def at_max_steps(self, state: TrainState) -> bool:
        return self.max_steps is not None and state.step >= self.max_steps


def train_one_epoch(
    t: Training,
    state: TrainState,
    sinks: Sink,
    pause: Callable[[TrainState], LoopExit | None] | None = None,
) -> LoopExit:
    """Train epoch `state.epoch` from batch `state.epoch_batches` on, until it ends or, after
    an optimizer step, `pause(state)` gives a reason to stop.

    Each optimizer step accumulates gradients over `t.updater.accumulate` micro-batches; a
    trailing group too small for a full step is dropped, like a partial batch. The epoch's
    sums so far stay in `state` (`TrainState.train_figures` reads them).
    """
    t.model.train()
    device, updater, runtime = t.runtime.device, t.updater, t.runtime
    epoch_length = len(t.data.train_loader)
    batches = t.data.train_epoch(t.settings.seed + state.epoch, state.epoch_batches, state.epoch)
    micro = 0
    start = time.perf_counter() - state.epoch_seconds
    sinks.epoch_started(state.epoch + 1, t.settings.epochs, epoch_length - state.epoch_batches)
    updater.zero_grad()
    why = LoopExit.END_OF_EPOCH
    for images, targets in batches:
        state.consume_batch()
        empty = len(targets) == 0  # every file of the batch was unreadable (counted by the data)
        loss_value = 0.0
        with runtime.gradient_sync(t.model, enabled=micro + 1 == updater.accumulate):
            if not empty:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if t.mixer is not None:
                    images, targets = t.mixer(images, targets)  # targets: (B, K) distributions
                if state.epoch == 0 and state.epoch_batches == 1:
                    sinks.train_batch(images, targets, state.step)
                with t.precision.autocast():
                    loss, logits, parts = t.loss_fn(images, t.model(images), targets)
                loss_value = float(loss.detach())
            # Every process skips a batch that any of them cannot train on: DDP's backward
            # waits for all of them.
            any_empty, any_bad = runtime.any([empty, not math.isfinite(loss_value)])
            if any_empty:
                sinks.batch_done(None)
                continue
            if any_bad:
                _count_bad_step(state, loss_value, t.settings.max_bad_steps)
                # The whole accumulation group is dropped: its gradients are incomplete.
                updater.zero_grad()
                micro = 0
                sinks.batch_done(None)
                continue
            updater.backward(loss)
        micro += 1

        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixed: dominant
        correct = int((logits.argmax(dim=1) == labels).sum())
        state.add_batch(loss_value, correct, len(targets), parts)
        if micro < updater.accumulate:
            sinks.batch_done(None)
            continue
        micro = 0
        grad_norm, skipped = updater.step()
        state.advance_step(skipped, time.perf_counter() - start)
        sinks.batch_done(
            Running(
                loss=state.loss_sum / state.seen,
                acc=state.correct / state.seen,
                lr=updater.lr,
                images_per_s=state.seen * runtime.world_size / state.epoch_seconds,
                parts={name: total / state.seen for name, total in state.part_sums.items()},
            )
        )
        if state.step % t.settings.log_every_n_steps == 0:
            _log_scalars(state, updater, runtime, sinks, grad_norm)
        paused = pause(state) if pause is not None else None
        if paused is not None:
            why = paused
            break
    state.pause(time.perf_counter() - start)
    # A step checkpoint or trainer.max_steps on the epoch's last batch ends the epoch; a
    # stop signal there still stops first (the resumed run ends the epoch).
    if why is not LoopExit.STOP_SIGNAL and state.epoch_batches == epoch_length:
        return LoopExit.END_OF_EPOCH
    return why


def _log_scalars(
    state: TrainState, updater: Updater, runtime: Runtime, sinks: Sink, grad_norm: float
) -> None:
    """train/loss over the batches since the last call (of all processes), lr, the gradient
    norm and, in fp16, the loss scale."""
    window = torch.tensor(state.take_window(), dtype=torch.float64)
    window_loss, window_batches = runtime.sum(window)
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


def _count_bad_step(state: TrainState, loss_value: float, max_bad_steps: int) -> None:
    """Skip a non-finite loss, and stop the run when too many come in a row."""
    bad_steps = state.bad_step()
    shown = "NaN or inf in another process" if math.isfinite(loss_value) else loss_value
    if bad_steps >= max_bad_steps:
        raise UserError(
            f"Loss was {shown} for {bad_steps} consecutive steps (last at step "
            f"{state.step}). Lower optimizer.lr or trainer.grad_clip, or use precision=bf16 or "
            "fp32; the checkpoints already written are untouched."
        )
    log.warning("non-finite loss %s at step %d: step skipped", shown, state.step)
