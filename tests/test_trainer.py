import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.data import build_data
from vit_cli.errors import UserError
from vit_cli.evaluation import accuracy_counts, evaluate
from vit_cli.loop import LoopSettings, Training, Updater, train_one_epoch
from vit_cli.losses import ClassificationLoss
from vit_cli.models.vit import VisionTransformer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import Runtime
from vit_cli.sinks import Sinks
from vit_cli.train_state import TrainState
from vit_cli.trainer import fit


def test_accuracy_counts_top1_and_top5():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert accuracy_counts(logits, targets, (1, 2, 5)) == [1, 1, 3]


def test_fit_writes_checkpoints_and_tensorboard_scalars(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "trainer.log_every_n_steps=5")
    result = fit(cfg, tmp_path)
    assert result.best_acc1 > 20.0  # chance is 10% on 10 classes
    assert result.final_metrics["val/acc5"] >= result.final_metrics["val/acc1"]
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    assert last["state"]["epoch"] == 2 and last["state"]["step"] == 2 * (1437 // 32)
    assert best["metrics"]["val/acc1"] == pytest.approx(result.best_acc1)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "data"} <= set(last)
    assert last["config"]["model"]["depth"] == 2
    assert last["data"]["class_names"] == [str(d) for d in range(10)]
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc1",
        "val/acc5",
        "lr",
        "throughput",
        "grad_norm",
    } <= tags
    logged = [e.value for e in events.Scalars("val/acc1")]
    assert len(logged) == 2
    assert max(logged) == pytest.approx(best["metrics"]["val/acc1"])
    assert logged[-1] == pytest.approx(last["metrics"]["val/acc1"])
    assert "hparam/best_acc1" in tags


def test_max_steps_stops_mid_epoch(compose_cfg, tmp_path):
    fit(compose_cfg(*TINY, "trainer.max_steps=5"), tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    assert (state["step"], state["epoch"]) == (5, 0)


def test_max_steps_on_an_epochs_last_step_completes_that_epoch(compose_cfg, tmp_path):
    steps = 1437 // 32  # TINY's batch of 32 on digits' training split
    fit(compose_cfg(*TINY, f"trainer.max_steps={steps}"), tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    assert (state["step"], state["epoch"], state["epoch_batches"]) == (steps, 1, 0)


def test_non_finite_loss_stops_training_after_max_bad_steps(compose_cfg):
    cfg = compose_cfg(*TINY, "trainer.max_bad_steps=3")
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2
    )
    with torch.no_grad():
        model.head.bias.fill_(math.nan)
    data = build_data(cfg.data, 8, torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    precision = resolve_precision("fp32", torch.device("cpu"))
    state = TrainState()
    updater = Updater(model, optimizer, scheduler, precision.grad_scaler())
    settings = LoopSettings(epochs=2, seed=0, max_bad_steps=3, log_every_n_steps=10)
    loss_fn = ClassificationLoss(torch.nn.CrossEntropyLoss())
    runtime = Runtime(torch.device("cpu"))
    training = Training(model, data, loss_fn, updater, precision, runtime, settings)
    with pytest.raises(UserError, match="for 3 consecutive steps"):
        train_one_epoch(training, state, Sinks([]))
    assert state.step == 0
    # No update was applied from a non-finite loss.
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b) or torch.isnan(a).any()


def test_evaluate_is_deterministic_and_in_percent(compose_cfg):
    cfg = compose_cfg()
    data = build_data(cfg.data, 8, torch.Generator())
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2
    )
    precision = resolve_precision("fp32", torch.device("cpu"))
    a = evaluate(model, data.val_loader, precision, torch.device("cpu"))
    b = evaluate(model, data.val_loader, precision, torch.device("cpu"))
    assert a == b
    assert 0.0 <= a["acc1"] <= a["acc5"] <= 100.0
    assert not model.training


def test_a_step_skipped_for_nan_does_not_repeat_the_epoch(compose_cfg, tmp_path, monkeypatch):
    calls = []
    real_loss = ClassificationLoss.__call__

    def nan_on_third_batch(self, images, outputs, targets):
        loss, logits, parts = real_loss(self, images, outputs, targets)
        calls.append(len(targets))
        return (loss * math.nan if len(calls) == 3 else loss), logits, parts

    monkeypatch.setattr(ClassificationLoss, "__call__", nan_on_third_batch)
    fit(compose_cfg(*TINY), tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")["state"]
    batches = 1437 // 32
    assert len(calls) == 2 * batches  # every batch of both epochs once, none twice
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (2, 2 * batches - 1, 0)


def test_resuming_with_another_lr_schedule_or_seed_is_refused_naming_each_key(
    compose_cfg, tmp_path
):
    fit(compose_cfg(*TINY, "trainer.epochs=1"), tmp_path / "first")
    resume = f"trainer.resume={tmp_path / 'first' / 'last.pt'}"
    for overrides, expected in [
        (["optimizer.lr=1e-3"], "optimizer.lr: checkpoint 0.003, now 0.001"),
        (["optimizer.weight_decay=0.1"], "optimizer.weight_decay: checkpoint 0.05, now 0.1"),
        (["scheduler=constant"], "scheduler.name: checkpoint 'cosine', now 'constant'"),
        (["seed=1"], "seed: checkpoint 0, now 1"),
        (["trainer.grad_clip=5"], "trainer.grad_clip: checkpoint 1.0, now 5.0"),
    ]:
        with pytest.raises(UserError, match="was trained with other settings") as info:
            fit(compose_cfg(*TINY, resume, *overrides), tmp_path / "second")
        assert expected in str(info.value)
        assert not (tmp_path / "second" / "last.pt").exists()
    # Training for longer is what resuming is for.
    result = fit(compose_cfg(*TINY, resume, "trainer.epochs=2"), tmp_path / "longer")
    assert load_checkpoint(tmp_path / "longer" / "last.pt")["state"]["epoch"] == 2
    assert result.best_epoch >= 1


def test_a_checkpoint_from_before_a_key_existed_resumes_as_that_key_s_default(
    compose_cfg, tmp_path
):
    fit(compose_cfg(*TINY, "trainer.epochs=1"), tmp_path / "first")
    ckpt = load_checkpoint(tmp_path / "first" / "last.pt")
    # As written before these keys were added to the schema.
    del ckpt["config"]["optimizer"]["head_lr_scale"], ckpt["config"]["model"]["pretrained_ema"]
    del ckpt["config"]["trainer"]["freeze"]
    save_checkpoint(ckpt, tmp_path / "older.pt")
    fit(compose_cfg(*TINY, f"trainer.resume={tmp_path / 'older.pt'}", "trainer.epochs=2"),
        tmp_path / "resumed")  # fmt: skip
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["epoch"] == 2
    with pytest.raises(UserError, match=r"optimizer.head_lr_scale: checkpoint 1.0, now 2.0"):
        fit(compose_cfg(*TINY, f"trainer.resume={tmp_path / 'older.pt'}",
                        "optimizer.head_lr_scale=2"), tmp_path / "other")  # fmt: skip


def test_a_checkpoint_without_optimizer_state_or_config_cannot_be_resumed(compose_cfg, tmp_path):
    fit(compose_cfg(*TINY, "trainer.max_steps=2"), tmp_path / "first")
    ckpt = load_checkpoint(tmp_path / "first" / "last.pt")
    del ckpt["optimizer"]
    save_checkpoint(ckpt, tmp_path / "no_optimizer.pt")
    save_checkpoint({**ckpt, "config": "not a config"}, tmp_path / "bad_config.pt")
    for name, message in [("no_optimizer.pt", "lacks what resuming needs (KeyError: 'optimizer')"),
                          ("bad_config.pt", "holds no readable config")]:  # fmt: skip
        with pytest.raises(UserError, match=re.escape(message)):
            fit(compose_cfg(*TINY, f"trainer.resume={tmp_path / name}"), tmp_path / name[:-3])
