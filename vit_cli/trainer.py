"""`fit`: a training run from start to end, over the parts `build_components` makes.

Build, resume, then for each epoch: train (`loop.train_one_epoch`), score val, report to
the sinks and write checkpoints from the main process. The loop hands back control in the
middle of an epoch for a step checkpoint, trainer.max_steps or a stop signal, and says
which; the trainer checkpoints and continues, scores, or stops.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from vit_cli.checkpoint_writer import CheckpointWriter, recorded_config, run_record
from vit_cli.components import Components, build_components
from vit_cli.config import TrainConfig, TrainerConfig, validate
from vit_cli.evaluation import evaluate
from vit_cli.inspection import Pictures, confusion_table, model_summary
from vit_cli.loop import LoopExit, Pauses, train_one_epoch
from vit_cli.report import run_report
from vit_cli.resume import restore, resume_path
from vit_cli.runtime import Runtime, resolve_device
from vit_cli.sinks import EpochReport, Sinks, build_sinks
from vit_cli.stopping import Stopped, stop_on_signals
from vit_cli.train_state import TrainState

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_acc1: float
    best_epoch: int
    final_metrics: dict[str, float]
    num_params: int
    wall_time: float
    run_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    cfg: TrainConfig,
    run_dir: Path,
    runtime: Runtime | None = None,
    overrides: Sequence[str] = (),
) -> FitResult:
    """Train `cfg` and write logs and checkpoints into `run_dir`.

    `runtime` is this process's place in a job of several (`runtime.start_runtime`); by
    default, one process on the device `cfg.device` names. `overrides` are the command
    line's (Hydra's `key=value` task overrides): TensorBoard's HParams table leads with them.
    On SIGTERM or SIGUSR1 the run finishes its optimizer step, writes `last.pt` and raises
    `Stopped`.
    """
    validate(cfg)
    t0 = time.perf_counter()
    runtime = runtime or Runtime(resolve_device(cfg.device))
    # Each process draws its own augmentations; DDP gives them all rank 0's initial weights.
    seed_everything(cfg.seed + runtime.rank)
    resume = resume_path(cfg.trainer.resume, run_dir)
    c = build_components(cfg, runtime, with_pretrained=resume is None)
    cfg_dict = recorded_config(cfg, c.data.num_classes, c.training.precision.chosen)
    had_events = any(run_dir.glob("events.out.tfevents.*"))
    state, metrics = restore(resume, cfg, cfg_dict, c, runtime) if resume else (TrainState(), {})
    record = run_record(cfg, c, runtime.world_size)
    _log_setup(cfg, c, record, run_dir)
    checkpoints = CheckpointWriter(c, cfg_dict, record, run_dir)
    pictures = None
    if cfg.trainer.images_every_n_epochs is not None:
        pictures = Pictures(
            c.data.class_names, cfg.data.mean, cfg.data.std, cfg.trainer.images_per_grid
        )
    # A run continued in its own folder hides what the stopped run logged after its
    # checkpoint; a fresh run in a folder of a run that never wrote one hides all of it.
    purge_step = (state.step + 1 if resume else 0) if had_events else None
    sinks = build_sinks(
        run_dir, runtime.is_main, purge_step, pictures.train_batch if pictures else None
    )
    with stop_on_signals() as stop, sinks:
        _report_setup(cfg, cfg_dict, c, state, sinks)
        pauses = Pauses(stop, runtime, cfg.trainer.max_steps, cfg.trainer.checkpoint_every_n_steps)
        while state.epoch < cfg.trainer.epochs and not pauses.at_max_steps(state):
            if state.epoch_batches == 0:
                state.start_epoch()
            why = train_one_epoch(c.training, state, sinks, pauses)
            if why is LoopExit.STOP_SIGNAL:
                checkpoints.save(state, metrics)
                raise Stopped(pauses.signum, checkpoints.last, state.step)
            if why is LoopExit.CHECKPOINT_DUE:
                checkpoints.save(state, metrics)
                continue
            ended = why is LoopExit.END_OF_EPOCH  # else trainer.max_steps, mid-epoch
            metrics, is_best = _score_epoch(c, state, ended, sinks, pictures, cfg.trainer)
            checkpoints.save(state, metrics, best=is_best)
        wall = time.perf_counter() - t0
        sinks.run_done(run_report(cfg, cfg_dict, c, state, metrics, wall, run_dir, overrides))
    return FitResult(state.best_acc1, state.best_epoch, metrics, c.num_params, wall, run_dir)


def _log_setup(cfg: TrainConfig, c: Components, record: dict, run_dir: Path) -> None:
    """What the run trains, where, and its batch sizes; with distillation off, that a DeiT's
    two heads train on the labels alone."""
    runtime, batches = c.training.runtime, record["distributed"]
    log.info(
        "model %s: %.2fM parameters, img_size %d, %d classes; device %s, precision %s; run dir %s",
        cfg.model.name, c.num_params / 1e6, c.img_size, c.data.num_classes, runtime.device,
        c.training.precision.label, run_dir,
    )  # fmt: skip
    log.info(
        "global batch %d = data.batch_size %d x %d process(es) x trainer.accumulate %d",
        batches["global_batch"], cfg.data.batch_size, runtime.world_size, cfg.trainer.accumulate,
    )  # fmt: skip
    if getattr(c.model, "both_heads", False) and not c.distilling:
        log.info(
            "no teacher (distill.type=%s): both heads train on the labels; this is not distillation",
            cfg.distill.type,
        )


def _report_setup(
    cfg: TrainConfig, cfg_dict: dict, c: Components, state: TrainState, sinks: Sinks
) -> None:
    """The config, the model, what model.pretrained gave it and the teacher's val score, to
    TensorBoard and the log before the first epoch."""
    sinks.text("config", OmegaConf.to_yaml(cfg_dict), state.step)
    sinks.text("model", model_summary(c.model), state.step)
    if c.pretrained is not None:
        for line in c.pretrained.summary().splitlines():
            log.info("%s", line)
        sinks.text("pretrained", c.pretrained.summary(), state.step)
    if c.distilling:
        runtime = c.training.runtime
        teacher_val = evaluate(
            c.teacher, c.data.val_loader, c.training.precision, runtime.device, reduce=runtime.sum
        )
        sinks.scalars({"teacher/val_acc1": teacher_val["acc1"]}, state.step)
        log.info(
            "teacher (%s distillation): val acc1 %.2f%%", cfg.distill.type, teacher_val["acc1"]
        )


def _score_epoch(
    c: Components,
    state: TrainState,
    ended: bool,
    sinks: Sinks,
    pictures: Pictures | None,
    trainer: TrainerConfig,
) -> tuple[dict[str, float], bool]:
    """Score val after an epoch (`ended`) or the steps up to trainer.max_steps, and report;
    returns the figures by TensorBoard tag, and whether val top-1 is the best so far. Every
    trainer.images_every_n_epochs epochs, and after the last, val's pictures too."""
    runtime, precision = c.training.runtime, c.training.precision
    train = state.train_figures(runtime)
    epoch = state.epoch + 1
    pictures_due = pictures is not None and (
        epoch % trainer.images_every_n_epochs == 0 or epoch >= trainer.epochs
    )
    snapshot = pictures.snapshot() if pictures_due else None
    val = evaluate(
        c.eval_model, c.data.val_loader, precision, runtime.device, runtime.sum,
        observe=snapshot,
    )  # fmt: skip
    if snapshot is not None:
        confusion = runtime.sum(snapshot.confusion)  # every process scored its share
        if runtime.is_main:
            sinks.pictures(pictures.val(snapshot, confusion, c.model), state.step)
            table = confusion_table(confusion, c.data.class_names)
            if table is not None:
                sinks.text("val/confusion_matrix", table, state.step)
    if ended:
        state.end_epoch()
    metrics = {f"val/{k}": v for k, v in val.items()}
    val_ema = None
    if c.ema is not None:
        val_ema = evaluate(
            c.ema_eval_model, c.data.val_loader, precision, runtime.device, runtime.sum,
        )  # fmt: skip
        metrics.update({f"val_ema/{k}": v for k, v in val_ema.items()})
    if c.data.skipped is not None:
        skipped = int(runtime.sum(torch.tensor([c.data.skipped.take()]))[0])
        metrics["data/skipped_images"] = skipped
        if skipped and runtime.is_main:
            log.warning("epoch %d: skipped %d unreadable images", state.epoch, skipped)
    metrics.update({f"train/{k}": v for k, v in train.items() if k not in ("loss", "throughput")})
    metrics["throughput"] = train["throughput"]
    is_best = state.record_val(val["acc1"], val_ema["acc1"] if val_ema else None)
    sinks.epoch_done(
        EpochReport(
            state.epoch, c.training.settings.epochs, state.step, train, val, val_ema, metrics,
            is_best,
        )
    )  # fmt: skip
    return metrics, is_best
