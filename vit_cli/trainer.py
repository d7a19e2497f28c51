"""`fit`: a training run from start to end, over the parts `build_components` makes.

Seeds, builds, resumes, then alternates training epochs (`loop.train_one_epoch`) with
val scoring, reporting to the sinks and writing checkpoints from the main process. The loop
hands back control in the middle of an epoch for a step checkpoint, trainer.max_steps or a
stop signal; the trainer then checkpoints and continues, scores, or stops.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
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
from vit_cli.config import TrainConfig, TrainerConfig, validate
from vit_cli.errors import UserError
from vit_cli.evaluation import evaluate
from vit_cli.inspection import Pictures, confusion_table, model_summary
from vit_cli.loop import TrainState, epoch_train_figures, summed_over_processes, train_one_epoch
from vit_cli.runtime import Runtime, resolve_device
from vit_cli.sinks import EpochReport, RunReport, Sinks, build_sinks
from vit_cli.stopping import Stopped, StopRequest, stop_on_signals

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


# What a resumed run must share with its checkpoint: everything that decided the steps
# already taken. trainer.epochs and max_steps (to train longer), logging, compile, the
# number of processes and the timeout may change, and what precision=amp comes to on
# another host.
RESUME_MUST_MATCH = (
    "model", "data", "distill", "optimizer", "scheduler", "precision.name",
    "precision.allow_tf32", "seed", "trainer.grad_clip", "trainer.label_smoothing",
    "trainer.accumulate", "trainer.ema", "trainer.freeze",
)  # fmt: skip


def _config_differences(saved: object, current: object, key: str, default: object) -> list[str]:
    """`key: checkpoint X, now Y` for each leaf under `key` that differs.

    A key the checkpoint's config lacks was added to vit_cli after the checkpoint was
    written: that run trained as the key's `default` says. A key the current config lacks
    is one its schema no longer has (a flat data config of older versions held the keys of
    every source): nothing reads it, so it is not compared.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        default = default if isinstance(default, dict) else {}
        return [
            diff
            for name in sorted(current)
            for diff in _config_differences(
                saved[name] if name in saved else default.get(name),
                current.get(name),
                f"{key}.{name}",
                default.get(name),
            )
        ]
    return [] if saved == current else [f"{key}: checkpoint {saved!r}, now {current!r}"]


def _defaults(cfg: TrainConfig) -> dict:
    """Every key's schema default, for the model family and the data source `cfg` trains."""
    defaults = TrainConfig(model=type(cfg.model)(), data=type(cfg.data)())
    return OmegaConf.to_container(OmegaConf.structured(defaults))


def _lookup(cfg_dict: dict, key: str) -> object:
    for part in key.split("."):
        cfg_dict = cfg_dict.get(part) if isinstance(cfg_dict, dict) else None
    return cfg_dict


def _restore(
    path: str, cfg_dict: dict, defaults: dict, c: Components, runtime: Runtime
) -> tuple[TrainState, dict[str, float]]:
    """Load a checkpoint for resuming, after checking it was trained with the same setup.

    Every process loads the same file; each takes back its own random state, so a run
    resumed with as many processes ends as the uninterrupted one. With another number of
    processes, the global batch and the lr schedule's length change with it.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    if not isinstance(saved, dict):
        raise UserError(f"Checkpoint {path} holds no readable config; it cannot be resumed.")
    diffs = [
        diff
        for key in RESUME_MUST_MATCH
        for diff in _config_differences(
            _lookup(saved, key), _lookup(cfg_dict, key), key, _lookup(defaults, key)
        )
    ]
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise UserError(
            f"trainer.resume={path} was trained with other settings: "
            + "; ".join(diffs[:6])
            + f"{more}. Resume with the settings of the original run (only trainer.epochs, "
            "trainer.max_steps, logging and compile may change), or start a new run."
        )
    load_model_state(c.model, ckpt["model"], source=path)
    try:
        c.updater.optimizer.load_state_dict(ckpt["optimizer"])
        c.updater.scheduler.load_state_dict(ckpt["scheduler"])
        c.updater.scaler.load_state_dict(ckpt["scaler"])
        rng_states = ckpt.get("rng_ranks") or [ckpt["rng"]]
        state = TrainState(**ckpt["state"])
        metrics = dict(ckpt.get("metrics", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"Checkpoint {path} lacks what resuming needs ({type(e).__name__}: {e}); it can "
            "still be scored with vit-eval. Resume from another last.pt, or start a new run."
        ) from e
    if c.ema is not None and "ema" in ckpt:
        c.ema.load_state_dict(ckpt["ema"], source=path)
    elif c.ema is not None:
        log.warning("%s holds no weight average: trainer.ema starts from its weights", path)
        c.ema.module.load_state_dict(c.model.state_dict())
    if runtime.rank < len(rng_states):
        set_rng_state(rng_states[runtime.rank])  # else: the fresh seed + rank of this process
    if not runtime.is_main:
        state.clear_sums()  # the main process's checkpointed sums hold everyone's
    saved_world = ckpt.get("distributed", {}).get("world_size", 1)
    if saved_world != runtime.world_size:
        # A resumed epoch skips the samples already seen, counted in the new batches.
        state.epoch_batches = state.epoch_batches * saved_world // runtime.world_size
        log.info(
            "%s was written by %d process(es) and resumes in %d: the global batch changes "
            "with it", path, saved_world, runtime.world_size,
        )  # fmt: skip
    return state, metrics


class _Checkpoints:
    """Writes `last.pt` (and `best.pt`) from the main process, with every process's random
    state and the epoch's sums of all processes."""

    def __init__(
        self, c: Components, cfg_dict: dict, run_info: dict, runtime: Runtime, run_dir: Path
    ) -> None:
        self.c, self.cfg_dict, self.run_info = c, cfg_dict, run_info
        self.runtime, self.last = runtime, run_dir / "last.pt"
        self.best = run_dir / "best.pt"

    def save(self, state: TrainState, metrics: dict[str, float], best: bool = False) -> None:
        rng_states = self.runtime.gather(rng_state())
        saved_state = summed_over_processes(state, self.runtime)
        if not self.runtime.is_main:
            return
        c, updater = self.c, self.c.updater
        ckpt = {
            "format_version": FORMAT_VERSION,
            "model": c.model.state_dict(),
            "optimizer": updater.optimizer.state_dict(),
            "scheduler": updater.scheduler.state_dict(),
            "scaler": updater.scaler.state_dict(),
            "state": asdict(saved_state),
            "metrics": metrics,
            "rng": rng_states[0],
            "config": self.cfg_dict,
            **self.run_info,
        }
        if len(rng_states) > 1:
            ckpt["rng_ranks"] = rng_states
        if c.ema is not None:
            ckpt["ema"] = c.ema.state_dict()
        save_checkpoint(ckpt, self.last, *([self.best] if best else []))


class _Pauses:
    """When the loop hands back control after an optimizer step: at trainer.max_steps, every
    trainer.checkpoint_every_n_steps, and on a stop signal that any process received."""

    def __init__(
        self, stop: StopRequest, runtime: Runtime, max_steps: int | None, every: int | None
    ) -> None:
        self.stop, self.runtime = stop, runtime
        self.max_steps, self.every = max_steps, every
        self.signum: int | None = None  # the signal all processes stop for

    def __call__(self, state: TrainState) -> bool:
        (signalled,) = self.runtime.any([self.stop.requested])
        if signalled:
            self.signum = next(n for n in self.runtime.gather(self.stop.signum) if n is not None)
        return (
            signalled
            or self.at_max_steps(state)
            or (self.every is not None and state.step % self.every == 0)
        )

    def at_max_steps(self, state: TrainState) -> bool:
        return self.max_steps is not None and state.step >= self.max_steps


def _run_info(cfg: TrainConfig, c: Components, runtime: Runtime) -> dict:
    """What every checkpoint records besides the state: what inference needs to read images
    as the model saw them, and the batch sizes of the job."""
    return {
        "data": {
            "class_names": c.data.class_names,
            "num_classes": c.data.num_classes,
            "in_chans": c.data.in_chans,
            "img_size": c.img_size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "distributed": {
            "world_size": runtime.world_size,
            "batch_size": cfg.data.batch_size,
            "accumulate": cfg.trainer.accumulate,
            "global_batch": cfg.data.batch_size * runtime.world_size * cfg.trainer.accumulate,
        },
    }


def _resume_path(resume: str | None, run_dir: Path) -> str | None:
    """trainer.resume as a checkpoint path: `auto` is the run folder's last.pt, if any."""
    if resume != "auto":
        return resume
    last = run_dir / "last.pt"
    return str(last) if last.is_file() else None


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
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    # Each process draws its own augmentations; DDP gives them all rank 0's initial weights.
    seed_everything(cfg.seed + runtime.rank)
    resume = _resume_path(cfg.trainer.resume, run_dir)
    c = build_components(cfg, runtime, with_pretrained=resume is None)
    data = c.data
    # The class count the data has, where its config may leave it out (data=imagefolder).
    cfg_dict["data"]["num_classes"] = data.num_classes
    # What precision.name came to on this device (amp: fp16, bf16 or fp32), for the record.
    cfg_dict["precision"]["chosen"] = c.precision.chosen
    state, metrics = TrainState(), {}
    had_events = any(run_dir.glob("events.out.tfevents.*"))
    if resume:
        state, metrics = _restore(resume, cfg_dict, _defaults(cfg), c, runtime)
        log.info("resumed from %s at epoch %d, step %d", resume, state.epoch, state.step)
    run_info = _run_info(cfg, c, runtime)
    global_batch = run_info["distributed"]["global_batch"]
    log.info(
        "model %s: %.2fM parameters, img_size %d, %d classes; device %s, precision %s; run dir %s",
        cfg.model.name, c.num_params / 1e6, c.img_size, data.num_classes, runtime.device,
        c.precision.label, run_dir,
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
    checkpoints = _Checkpoints(c, cfg_dict, run_info, runtime, run_dir)
    # A run continued in its own folder hides what the stopped run logged after its
    # checkpoint; a fresh run in a folder of a run that never wrote one hides all of it.
    purge_step = (state.step + 1 if resume else 0) if had_events else None
    pictures = None
    if cfg.trainer.images_every_n_epochs is not None:
        pictures = Pictures(
            data.class_names, cfg.data.mean, cfg.data.std, cfg.trainer.images_per_grid
        )
    sinks = build_sinks(
        run_dir, runtime.is_main, purge_step, pictures.train_batch if pictures else None
    )
    sinks.text("config", OmegaConf.to_yaml(cfg_dict), state.step)
    sinks.text("model", model_summary(c.model), state.step)
    if c.pretrained is not None:
        for line in c.pretrained.summary().splitlines():
            log.info("%s", line)
        sinks.text("pretrained", c.pretrained.summary(), state.step)
    loader = data.train_loader
    with stop_on_signals() as stop:
        pauses = _Pauses(stop, runtime, cfg.trainer.max_steps, cfg.trainer.checkpoint_every_n_steps)
        try:
            if distilling:
                teacher_val = evaluate(
                    c.teacher, data.val_loader, c.precision, runtime.device, reduce=runtime.sum
                )
                sinks.scalars({"teacher/val_acc1": teacher_val["acc1"]}, state.step)
                log.info(
                    "teacher (%s distillation): val acc1 %.2f%%", cfg.distill.type,
                    teacher_val["acc1"],
                )  # fmt: skip
            while state.epoch < cfg.trainer.epochs and not pauses.at_max_steps(state):
                # A per-epoch seed fixes the data order, so a resumed run sees the same batches.
                c.generator.manual_seed(cfg.seed + state.epoch)
                if state.epoch_batches == 0:
                    state.start_epoch()
                train_one_epoch(
                    c.step_model, loader, c.loss_fn, c.updater, c.precision, runtime, state,
                    c.settings, sinks, c.mixer, pauses,
                )  # fmt: skip
                if pauses.signum is not None:
                    checkpoints.save(state, metrics)
                    raise Stopped(pauses.signum, checkpoints.last, state.step)
                if state.epoch_batches < len(loader) and not pauses.at_max_steps(state):
                    checkpoints.save(state, metrics)  # trainer.checkpoint_every_n_steps
                    continue
                metrics, is_best = _end_epoch(c, state, runtime, sinks, pictures, cfg.trainer)
                checkpoints.save(state, metrics, best=is_best)
            wall = time.perf_counter() - t0
            hparams = {
                **_flat_hparams(cfg_dict),
                "world_size": runtime.world_size,
                "global_batch": global_batch,
            }
            hparams, leading = _leading_hparams(hparams, overrides, c.img_size)
            sinks.run_done(
                RunReport(
                    hparams=hparams,
                    leading=leading,
                    results={
                        "hparam/best_acc1": state.best_acc1,
                        "hparam/final_acc1": metrics.get("val/acc1", 0.0),
                        **({"hparam/best_ema_acc1": state.best_ema_acc1} if c.ema else {}),
                        "hparam/wall_time_s": wall,
                    },
                    summary=_summary(cfg, c, state, metrics, wall, run_dir),
                )
            )
        finally:
            sinks.close()
    return FitResult(state.best_acc1, state.best_epoch, metrics, c.num_params, wall, run_dir)


def _end_epoch(
    c: Components,
    state: TrainState,
    runtime: Runtime,
    sinks: Sinks,
    pictures: Pictures | None,
    trainer: TrainerConfig,
) -> tuple[dict[str, float], bool]:
    """Score val after an epoch (or the steps up to trainer.max_steps) and report; returns
    the epoch's figures by TensorBoard tag, and whether its val top-1 is the best so far.
    Every trainer.images_every_n_epochs epochs, and after the last, val's pictures too."""
    train = epoch_train_figures(state, runtime)
    epoch = state.epoch + 1
    pictures_due = pictures is not None and (
        epoch % trainer.images_every_n_epochs == 0 or epoch >= trainer.epochs
    )
    snapshot = pictures.snapshot() if pictures_due else None
    val = evaluate(
        c.eval_model, c.data.val_loader, c.precision, runtime.device, c.two_heads, runtime.sum,
        observe=snapshot,
    )  # fmt: skip
    if snapshot is not None:
        confusion = runtime.sum(snapshot.confusion)  # every process scored its share
        if runtime.is_main:
            sinks.pictures(pictures.val(snapshot, confusion, c.model), state.step)
            table = confusion_table(confusion, c.data.class_names)
            if table is not None:
                sinks.text("val/confusion_matrix", table, state.step)
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


# The columns a user compares first, after the overridden keys; TensorBoard sorts by name,
# and "core." sorts before every config section.
CORE_HPARAMS = {
    "core.model": "model.name", "core.optimizer": "optimizer.name", "core.lr": "optimizer.lr",
    "core.batch": "data.batch_size", "core.epochs": "trainer.epochs",
    "core.precision": "precision.name", "core.seed": "seed",
}  # fmt: skip


def _leading_hparams(
    hparams: dict, overrides: Sequence[str], img_size: int
) -> tuple[dict, list[str]]:
    """`hparams` with the command line's keys first, then the core, then the rest; and the
    overridden keys, which the HParams table shows first.

    A config group chosen on the command line (`model=deit_small`) is a column of its own,
    holding the choice; Hydra's own settings (`hydra.*`) are not hparams.
    """
    overridden = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        key = key.split("@")[0]
        if key in hparams:
            overridden[key] = hparams[key]
        elif key and "." not in key and not key.startswith(("hydra", "hparams_search")):
            overridden[key] = value  # a config group's choice
    core = {name: hparams[key] for name, key in CORE_HPARAMS.items()}
    core["core.img_size"] = img_size
    rest = {k: v for k, v in hparams.items() if k not in overridden}
    return {**overridden, **dict(sorted(core.items())), **rest}, list(overridden)


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
