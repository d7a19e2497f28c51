"""`fit`: a training run from start to end, over the parts `build_components` makes.

Seeds, builds, resumes, then alternates training epochs (`loop.train_one_epoch`) with
val scoring, reporting to the sinks and writing checkpoints from the main process.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from vit_cli.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vit_cli.components import Components, build_components
from vit_cli.config import TrainConfig, validate
from vit_cli.errors import UserError
from vit_cli.evaluation import evaluate
from vit_cli.loop import TrainState, train_one_epoch
from vit_cli.runtime import Runtime, resolve_device
from vit_cli.sinks import EpochReport, RunReport, Sinks, build_sinks

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


def _config_differences(saved: dict, current: dict, prefix: str) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def _restore(path: str, cfg_dict: dict, c: Components, runtime: Runtime) -> TrainState:
    """Load a checkpoint for resuming, after checking it was trained with the same setup.

    Every process loads the same file; each takes back its own random state, so a run
    resumed with as many processes ends as the uninterrupted one. With another number of
    processes, the global batch and the lr schedule's length change with it.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    diffs = []
    for section in ("model", "data", "distill"):
        diffs += _config_differences(saved.get(section, {}), cfg_dict[section], f"{section}.")
    if saved.get("optimizer", {}).get("name") != cfg_dict["optimizer"]["name"]:
        diffs.append(
            f"optimizer.name: checkpoint {saved.get('optimizer', {}).get('name')!r}, "
            f"now {cfg_dict['optimizer']['name']!r}"
        )
    if diffs:
        raise UserError(
            f"trainer.resume={path} was trained with other settings: "
            + "; ".join(diffs[:6])
            + ". Resume with the same model, data and optimizer as the original run."
        )
    load_model_state(c.model, ckpt["model"], source=path)
    c.updater.optimizer.load_state_dict(ckpt["optimizer"])
    c.updater.scheduler.load_state_dict(ckpt["scheduler"])
    c.updater.scaler.load_state_dict(ckpt["scaler"])
    if c.ema is not None and "ema" in ckpt:
        c.ema.load_state_dict(ckpt["ema"], source=path)
    elif c.ema is not None:
        log.warning("%s holds no weight average: trainer.ema starts from its weights", path)
        c.ema.module.load_state_dict(c.model.state_dict())
    rng_states = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if runtime.rank < len(rng_states):
        set_rng_state(rng_states[runtime.rank])  # else: the fresh seed + rank of this process
    state = TrainState(**ckpt["state"])
    saved_world = ckpt.get("distributed", {}).get("world_size", 1)
    if saved_world != runtime.world_size:
        # A resumed epoch skips the samples already seen, counted in the new batches.
        state.epoch_batches = state.epoch_batches * saved_world // runtime.world_size
        log.info(
            "%s was written by %d process(es) and resumes in %d: the global batch changes "
            "with it", path, saved_world, runtime.world_size,
        )  # fmt: skip
    return state


def _checkpoint(
    c: Components,
    state: TrainState,
    metrics: dict[str, float],
    cfg_dict: dict,
    run_info: dict,
    rng_states: list[dict],
) -> dict:
    updater = c.updater
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model": c.model.state_dict(),
        "optimizer": updater.optimizer.state_dict(),
        "scheduler": updater.scheduler.state_dict(),
        "scaler": updater.scaler.state_dict(),
        "state": asdict(state),
        "metrics": metrics,
        "rng": rng_states[0],
        "config": cfg_dict,
        **run_info,
    }
    if len(rng_states) > 1:
        ckpt["rng_ranks"] = rng_states
    if c.ema is not None:
        ckpt["ema"] = c.ema.state_dict()
    return ckpt


def fit(cfg: TrainConfig, run_dir: Path, runtime: Runtime | None = None) -> FitResult:
    """Train `cfg` and write logs and checkpoints into `run_dir`.

    `runtime` is this process's place in a job of several (`runtime.start_runtime`); by
    default, one process on the device `cfg.device` names.
    """
    validate(cfg)
    t0 = time.perf_counter()
    runtime = runtime or Runtime(resolve_device(cfg.device))
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    # Each process draws its own augmentations; DDP gives them all rank 0's initial weights.
    seed_everything(cfg.seed + runtime.rank)
    c = build_components(cfg, runtime)
    data = c.data
    state = TrainState()
    if cfg.trainer.resume:
        state = _restore(cfg.trainer.resume, cfg_dict, c, runtime)
        log.info(
            "resumed from %s at epoch %d, step %d", cfg.trainer.resume, state.epoch, state.step
        )
    global_batch = cfg.data.batch_size * runtime.world_size * cfg.trainer.accumulate
    run_info = {
        "data": {
            "class_names": data.class_names,
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": c.img_size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "distributed": {
            "world_size": runtime.world_size,
            "batch_size": cfg.data.batch_size,
            "accumulate": cfg.trainer.accumulate,
            "global_batch": global_batch,
        },
    }
    log.info(
        "model %s: %.2fM parameters, img_size %d, %d classes; device %s, precision %s; run dir %s",
        cfg.model.name, c.num_params / 1e6, c.img_size, data.num_classes, runtime.device,
        c.precision.name, run_dir,
    )  # fmt: skip
    log.info(
        "global batch %d = data.batch_size %d x %d process(es) x trainer.accumulate %d",
        global_batch, cfg.data.batch_size, runtime.world_size, cfg.trainer.accumulate,
    )  # fmt: skip
    distilling = c.teacher is not None and cfg.distill.type != "none"
    if c.two_heads and not distilling:
        log.info(
            "no teacher (distill.type=%s): both heads train on the labels; this is not distillation",
            cfg.distill.type,
        )
    sinks = build_sinks(run_dir, runtime.is_main)
    metrics: dict[str, float] = {}
    try:
        if distilling:
            teacher_val = evaluate(
                c.teacher, data.val_loader, c.precision, runtime.device, reduce=runtime.sum
            )
            sinks.scalars({"teacher/val_acc1": teacher_val["acc1"]}, state.step)
            log.info(
                "teacher (%s distillation): val acc1 %.2f%%", cfg.distill.type, teacher_val["acc1"]
            )
        while state.epoch < cfg.trainer.epochs and (
            cfg.trainer.max_steps is None or state.step < cfg.trainer.max_steps
        ):
            metrics, is_best = _run_epoch(cfg.seed, c, state, runtime, sinks)
            rng_states = runtime.gather(rng_state())
            if runtime.is_main:
                ckpt = _checkpoint(c, state, metrics, cfg_dict, run_info, rng_states)
                save_checkpoint(ckpt, run_dir / "last.pt")
                if is_best:
                    save_checkpoint(ckpt, run_dir / "best.pt")
        wall = time.perf_counter() - t0
        sinks.run_done(
            RunReport(
                hparams={
                    **_flat_hparams(cfg_dict),
                    "world_size": runtime.world_size,
                    "global_batch": global_batch,
                },
                results={
                    "hparam/best_acc1": state.best_acc1,
                    "hparam/final_acc1": metrics.get("val/acc1", 0.0),
                    **({"hparam/best_ema_acc1": state.best_ema_acc1} if c.ema else {}),
                },
                summary=_summary(cfg, c, state, metrics, wall, run_dir),
            )
        )
    finally:
        sinks.close()
    return FitResult(state.best_acc1, state.best_epoch, metrics, c.num_params, wall, run_dir)


def _run_epoch(
    seed: int, c: Components, state: TrainState, runtime: Runtime, sinks: Sinks
) -> tuple[dict[str, float], bool]:
    """Train an epoch (or the rest of one), score val, report; returns the epoch's figures
    by TensorBoard tag, and whether its val top-1 is the best so far."""
    # A per-epoch seed fixes the data order, so a resumed run sees the same batches.
    c.generator.manual_seed(seed + state.epoch)
    train = train_one_epoch(
        c.step_model, c.data.train_loader, c.loss_fn, c.updater, c.precision, runtime, state,
        c.settings, sinks, c.mixer,
    )  # fmt: skip
    val = evaluate(
        c.eval_model, c.data.val_loader, c.precision, runtime.device, c.two_heads, runtime.sum
    )
    if state.epoch_batches == len(c.data.train_loader):
        state.epoch, state.epoch_batches = state.epoch + 1, 0
    metrics = {f"val/{k}": v for k, v in val.items()}
    val_ema = None
    if c.ema is not None:
        val_ema = evaluate(
            c.ema_eval_model, c.data.val_loader, c.precision, runtime.device, c.two_heads,
            runtime.sum,
        )  # fmt: skip
        metrics.update({f"val_ema/{k}": v for k, v in val_ema.items()})
        state.best_ema_acc1 = max(state.best_ema_acc1, val_ema["acc1"])
    if c.data.skipped is not None:
        skipped = int(runtime.sum(torch.tensor([c.data.skipped.take()]))[0])
        metrics["data/skipped_images"] = skipped
        if skipped and runtime.is_main:
            log.warning("epoch %d: skipped %d unreadable images", state.epoch, skipped)
    metrics.update({f"train/{k}": v for k, v in train.items() if k not in ("loss", "throughput")})
    metrics["throughput"] = train["throughput"]
    is_best = val["acc1"] > state.best_acc1
    if is_best:
        state.best_acc1, state.best_epoch = val["acc1"], state.epoch
    sinks.epoch_done(
        EpochReport(
            state.epoch, c.settings.epochs, state.step, train, val, val_ema, metrics, is_best
        )
    )
    return metrics, is_best


def _summary(
    cfg: TrainConfig,
    c: Components,
    state: TrainState,
    metrics: dict[str, float],
    wall: float,
    run_dir: Path,
) -> dict[str, str]:
    """The rows of the table printed at the end of a run."""
    rows = {
        "model": f"{cfg.model.name} ({c.num_params / 1e6:.2f}M parameters)",
        "data": f"{cfg.data.name} ({c.img_size}x{c.img_size}, {c.data.num_classes} classes)",
        "best val top-1": f"{state.best_acc1:.2f}% (epoch {state.best_epoch})",
        "final val top-1": f"{metrics.get('val/acc1', float('nan')):.2f}%",
    }
    if c.ema is not None:
        rows["best val top-1 (EMA)"] = f"{state.best_ema_acc1:.2f}%"
        rows["final val top-1 (EMA)"] = f"{metrics.get('val_ema/acc1', float('nan')):.2f}%"
    rows["wall time"] = f"{wall:.1f} s"
    rows["output dir"] = str(run_dir)
    return rows


def _flat_hparams(cfg_dict: dict) -> dict[str, float | int | str | bool]:
    """Config leaves as `section.key` entries in the types the HParams plugin accepts."""

    def leaves(prefix: str, node: dict) -> dict[str, float | int | str | bool]:
        flat = {}
        for key, value in node.items():
            if isinstance(value, dict):  # e.g. data.augment, trainer.ema
                flat.update(leaves(f"{prefix}{key}.", value))
            elif isinstance(value, (bool, int, float, str)):
                flat[f"{prefix}{key}"] = value
            elif isinstance(value, list):
                flat[f"{prefix}{key}"] = str(value)
        return flat

    flat = {}
    for section in ("model", "data", "optimizer", "scheduler", "precision", "trainer"):
        flat.update(leaves(f"{section}.", cfg_dict[section]))
    flat["seed"] = cfg_dict["seed"]
    return flat
