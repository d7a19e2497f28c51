"""The weight average: its decay schedule, its update, and its round trip through resume."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from tests.conftest import TINY
from vit_cli.checkpoint import load_checkpoint
from vit_cli.ema import ModelEma, ema_decay
from vit_cli.trainer import fit


def test_decay_warms_up_then_stays_at_its_value():
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)
    assert ema_decay(0.999, 90, warmup=True) == pytest.approx(0.91)
    assert ema_decay(0.999, 100_000, warmup=True) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999


def test_update_moves_the_average_towards_the_weights():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.5, warmup=False)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 0.5 * model.weight)
    assert ema.updates == 1
    assert not ema.module.training and not ema.module.weight.requires_grad


def test_average_of_unchanging_weights_is_those_weights():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    for _ in range(5):
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight)


EMA_RUN = [*TINY, "trainer.ema.decay=0.9", "data.augment.mixup_alpha=0.2"]


def test_ema_is_evaluated_checkpointed_and_logged(compose_cfg, tmp_path):
    result = fit(compose_cfg(*EMA_RUN), tmp_path)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["ema"]["updates"] == last["state"]["step"] == 2 * (1437 // 32)
    assert set(last["ema"]["model"]) == set(last["model"])
    assert "val_ema/acc1" in result.final_metrics
    # best.pt follows the raw model's val top-1; the EMA's best is tracked beside it.
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["metrics"]["val/acc1"] == pytest.approx(result.best_acc1)
    assert last["state"]["best_ema_acc1"] >= last["metrics"]["val_ema/acc1"]
    tags = set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    assert {"val_ema/acc1", "val_ema/loss", "hparam/best_ema_acc1"} <= tags


def test_resumed_ema_equals_the_uninterrupted_one_exactly(compose_cfg, tmp_path):
    # A constant lr makes the 2-epoch run the first 2 epochs of the 3-epoch run.
    args = [*EMA_RUN, "scheduler=constant", "data.shift=1", "data.augment.repeats=2"]
    fit(compose_cfg(*args, "trainer.epochs=3"), tmp_path / "full")
    fit(compose_cfg(*args, "trainer.epochs=2"), tmp_path / "first")
    fit(
        compose_cfg(*args, "trainer.epochs=3", f"trainer.resume={tmp_path / 'first' / 'last.pt'}"),
        tmp_path / "resumed",
    )
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["ema"]["updates"] == full["ema"]["updates"]
    for key, value in full["ema"]["model"].items():
        torch.testing.assert_close(resumed["ema"]["model"][key], value, rtol=0, atol=0)
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)
