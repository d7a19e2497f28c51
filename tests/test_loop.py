"""The loop says why it returned, and a paused epoch continues where it stopped."""

import signal

import pytest
import torch

from vit_cli.config import DataConfig
from vit_cli.data import build_data
from vit_cli.loop import LoopExit, LoopSettings, Pauses, Training, Updater, train_one_epoch
from vit_cli.losses import ClassificationLoss
from vit_cli.models.vit import VisionTransformer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import Runtime
from vit_cli.sinks import Sinks
from vit_cli.stopping import StopRequest
from vit_cli.train_state import TrainState

BATCHES = 1437 // 64  # digits' training split at batch 64, the last partial batch dropped


def tiny_training(accumulate: int = 1) -> Training:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2
    )
    # A shift draws augmentation randomness, so a resumed epoch must not draw it twice.
    data = build_data(DataConfig(batch_size=64, shift=1), 8, torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    runtime = Runtime(torch.device("cpu"))
    precision = resolve_precision("fp32", runtime.device)
    updater = Updater(model, optimizer, scheduler, precision.grad_scaler(), accumulate)
    settings = LoopSettings(epochs=1, seed=0, max_bad_steps=3, log_every_n_steps=100)
    loss_fn = ClassificationLoss(torch.nn.CrossEntropyLoss())
    return Training(model, data, loss_fn, updater, precision, runtime, settings)


def pauses(max_steps=None, every=None, stop: StopRequest | None = None) -> Pauses:
    return Pauses(stop or StopRequest(), Runtime(torch.device("cpu")), max_steps, every)


def test_an_epoch_without_pauses_ends_at_its_last_batch():
    state = TrainState()
    assert train_one_epoch(tiny_training(), state, Sinks([])) is LoopExit.END_OF_EPOCH
    assert (state.epoch_batches, state.step, state.seen) == (BATCHES, BATCHES, BATCHES * 64)


@pytest.mark.parametrize(
    ("max_steps", "every", "why", "steps"),
    [
        (None, 5, LoopExit.CHECKPOINT_DUE, 5),
        (3, 5, LoopExit.MAX_STEPS, 3),
        (5, 5, LoopExit.MAX_STEPS, 5),  # both due: the run ends rather than checkpointing
        (None, BATCHES, LoopExit.END_OF_EPOCH, BATCHES),  # due on the last batch: epoch ends
        (BATCHES, None, LoopExit.END_OF_EPOCH, BATCHES),  # max steps on the last batch too
    ],
)
def test_the_loop_returns_why_it_stopped(max_steps, every, why, steps):
    state = TrainState()
    got = train_one_epoch(tiny_training(), state, Sinks([]), pauses(max_steps, every))
    assert got is why
    assert state.step == steps and state.epoch_batches == steps


def test_a_stop_signal_pauses_after_the_step_and_names_the_signal():
    stop = StopRequest()
    stop(signal.SIGTERM, None)
    state, paused = TrainState(), pauses(stop=stop)
    assert train_one_epoch(tiny_training(), state, Sinks([]), paused) is LoopExit.STOP_SIGNAL
    assert state.step == 1 and paused.signum == signal.SIGTERM


@pytest.mark.parametrize("accumulate", [1, 2])
def test_an_epoch_paused_and_continued_trains_as_one_pass(accumulate):
    whole = tiny_training(accumulate)
    state = TrainState()
    train_one_epoch(whole, state, Sinks([]))

    halves = tiny_training(accumulate)
    paused = TrainState()
    got = train_one_epoch(halves, paused, Sinks([]), pauses(every=4))
    assert got is LoopExit.CHECKPOINT_DUE and paused.epoch_batches == 4 * accumulate
    assert train_one_epoch(halves, paused, Sinks([])) is LoopExit.END_OF_EPOCH

    assert (paused.step, paused.epoch_batches, paused.seen) == (state.step, BATCHES, state.seen)
    assert paused.loss_sum == pytest.approx(state.loss_sum, rel=1e-12)
    for a, b in zip(whole.model.parameters(), halves.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_state_rescales_consumed_batches_and_keeps_the_best_score():
    state = TrainState(epoch=3, epoch_batches=10)
    state.rescale(saved_world_size=2, world_size=4)
    assert state.epoch_batches == 5  # 10 batches of 2 processes are 5 batches of 4
    assert state.record_val(80.0) and state.best_epoch == 3
    assert not state.record_val(79.0, ema_acc1=81.0)
    assert (state.best_acc1, state.best_ema_acc1) == (80.0, 81.0)
    state.end_epoch()
    assert (state.epoch, state.epoch_batches) == (4, 0)
