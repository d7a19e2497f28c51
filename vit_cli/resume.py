"""Resuming a run: which checkpoint, whether it was trained with the same setup, and the
state it hands back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from vit_cli.checkpoint import load_checkpoint, load_model_state, set_rng_state
from vit_cli.config import TrainConfig
from vit_cli.errors import UserError
from vit_cli.runtime import Runtime
from vit_cli.train_state import TrainState

if TYPE_CHECKING:
    from vit_cli.components import Components

log = logging.getLogger(__name__)

# What a resumed run must share with its checkpoint: everything that decided the steps
# already taken. trainer.epochs and max_steps (to train longer), logging, compile, the
# number of processes and the timeout may change, and what precision=amp comes to on
# another host.
RESUME_MUST_MATCH = (
    "model", "data", "distill", "optimizer", "scheduler", "precision.name",
    "precision.allow_tf32", "seed", "trainer.grad_clip", "trainer.label_smoothing",
    "trainer.accumulate", "trainer.ema", "trainer.freeze",
)  # fmt: skip


def resume_path(resume: str | None, run_dir: Path) -> str | None:
    """trainer.resume as a checkpoint path: `auto` is the run folder's last.pt, if any."""
    if resume != "auto":
        return resume
    last = run_dir / "last.pt"
    return str(last) if last.is_file() else None


def config_differences(saved: object, current: object, key: str, default: object) -> list[str]:
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
            for diff in config_differences(
                saved[name] if name in saved else default.get(name),
                current.get(name),
                f"{key}.{name}",
                default.get(name),
            )
        ]
    return [] if saved == current else [f"{key}: checkpoint {saved!r}, now {current!r}"]


def check_same_setup(path: str, saved: object, cfg: TrainConfig, cfg_dict: dict) -> None:
    """Refuse to resume a checkpoint whose RESUME_MUST_MATCH keys differ from `cfg_dict`'s."""
    if not isinstance(saved, dict):
        raise UserError(f"Checkpoint {path} holds no readable config; it cannot be resumed.")
    defaults = _defaults(cfg)
    diffs = [
        diff
        for key in RESUME_MUST_MATCH
        for diff in config_differences(
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


def restore(
    path: str, cfg: TrainConfig, cfg_dict: dict, c: Components, runtime: Runtime
) -> tuple[TrainState, dict[str, float]]:
    """Load a checkpoint for resuming into `c`, after checking it was trained with the same
    setup; returns its train state and last metrics.

    Every process loads the same file; each takes back its own random state, so a run
    resumed with as many processes ends as the uninterrupted one. With another number of
    processes, the global batch and the lr schedule's length change with it.
    """
    ckpt = load_checkpoint(path)
    check_same_setup(path, ckpt["config"], cfg, cfg_dict)
    load_model_state(c.model, ckpt["model"], source=path)
    updater = c.training.updater
    try:
        updater.optimizer.load_state_dict(ckpt["optimizer"])
        updater.scheduler.load_state_dict(ckpt["scheduler"])
        updater.scaler.load_state_dict(ckpt["scaler"])
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
        state.rescale(saved_world, runtime.world_size)
        log.info(
            "%s was written by %d process(es) and resumes in %d: the global batch changes "
            "with it", path, saved_world, runtime.world_size,
        )  # fmt: skip
    log.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.step)
    return state, metrics


def _defaults(cfg: TrainConfig) -> dict:
    """Every key's schema default, for the model family and the data source `cfg` trains."""
    defaults = TrainConfig(model=type(cfg.model)(), data=type(cfg.data)())
    return OmegaConf.to_container(OmegaConf.structured(defaults))


def _lookup(cfg_dict: dict, key: str) -> object:
    for part in key.split("."):
        cfg_dict = cfg_dict.get(part) if isinstance(cfg_dict, dict) else None
    return cfg_dict
