"""`TrainState`: where a run stands, saved in every checkpoint, also in the middle of an epoch.

Its methods are the only code that changes it: the loop consumes batches, adds their sums
and advances steps; the trainer ends epochs and records val scores; a resumed run rescales
it to another number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vit_cli.runtime import Runtime


@dataclass
class TrainState:
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

    # ------------------------------------------------------------------ within an epoch

    def start_epoch(self) -> None:
        self.epoch_batches, self.epoch_seconds, self.part_sums = 0, 0.0, {}
        self.clear_sums()

    def consume_batch(self) -> None:
        """A batch left the loader, whether it trains or is skipped."""
        self.epoch_batches += 1

    def bad_step(self) -> int:
        """A non-finite loss; returns how many came in a row."""
        self.bad_steps += 1
        return self.bad_steps

    def add_batch(
        self, loss: float, correct: int, batch: int, parts: dict[str, torch.Tensor]
    ) -> None:
        """A trained batch of `batch` images: its mean loss, correct count and loss parts."""
        self.bad_steps = 0
        self.loss_sum += loss * batch
        self.correct += correct
        self.seen += batch
        for name, value in parts.items():
            self.part_sums[name] = self.part_sums.get(name, 0.0) + float(value) * batch
        self.window_loss += loss
        self.window_batches += 1

    def advance_step(self, skipped: bool, epoch_seconds: float) -> None:
        """An optimizer step was taken (`skipped`: the GradScaler skipped its update)."""
        self.step += 1
        self.skipped_steps += int(skipped)
        self.epoch_seconds = epoch_seconds

    def pause(self, epoch_seconds: float) -> None:
        """The loop handed back control, at the epoch's end or in its middle."""
        self.epoch_seconds = epoch_seconds

    def take_window(self) -> tuple[float, int]:
        """The summed loss and batch count since the last call, which starts a new window."""
        window = self.window_loss, self.window_batches
        self.window_loss, self.window_batches = 0.0, 0
        return window

    # ------------------------------------------------------------------ between epochs

    def end_epoch(self) -> None:
        self.epoch, self.epoch_batches = self.epoch + 1, 0

    def record_val(self, acc1: float, ema_acc1: float | None = None) -> bool:
        """Val top-1 after an epoch (and the weight average's); returns whether it is the
        best so far."""
        if ema_acc1 is not None:
            self.best_ema_acc1 = max(self.best_ema_acc1, ema_acc1)
        if acc1 <= self.best_acc1:
            return False
        self.best_acc1, self.best_epoch = acc1, self.epoch
        return True

    # ------------------------------------------------------------------ across processes

    def clear_sums(self) -> None:
        """Zero the epoch's sums, keeping their names: in every process but the main one,
        whose checkpointed sums hold those of all processes."""
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.part_sums = dict.fromkeys(self.part_sums, 0.0)
        self.window_loss, self.window_batches = 0.0, 0

    def rescale(self, saved_world_size: int, world_size: int) -> None:
        """Resumed in another number of processes: the epoch's batches already consumed,
        counted in the new per-process batches."""
        self.epoch_batches = self.epoch_batches * saved_world_size // world_size

    def summed(self, runtime: Runtime) -> TrainState:
        """A copy holding the epoch's sums of all processes: what a checkpoint saves."""
        totals = [self.loss_sum, self.correct, self.seen, self.window_loss, self.window_batches,
                  *self.part_sums.values()]  # fmt: skip
        totals = runtime.sum(torch.tensor(totals, dtype=torch.float64)).tolist()
        return dataclasses.replace(
            self,
            loss_sum=totals[0],
            correct=int(totals[1]),
            seen=int(totals[2]),
            window_loss=totals[3],
            window_batches=int(totals[4]),
            part_sums=dict(zip(self.part_sums, totals[5:], strict=True)),
        )

    def train_figures(self, runtime: Runtime) -> dict[str, float]:
        """The epoch's train loss, accuracy (%), throughput (img/s) and loss parts, over all
        processes."""
        summed = self.summed(runtime)
        if summed.seen == 0:
            return {"loss": float("nan"), "acc": 0.0, "throughput": 0.0}
        return {
            "loss": summed.loss_sum / summed.seen,
            "acc": 100.0 * summed.correct / summed.seen,
            "throughput": summed.seen / max(self.epoch_seconds, 1e-9),
            **{name: total / summed.seen for name, total in summed.part_sums.items()},
        }
