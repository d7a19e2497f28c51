"""What a finished run reports: its row in TensorBoard's HParams table and the summary table
printed at the end."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vit_cli.components import Components
from vit_cli.config import TrainConfig
from vit_cli.sinks import Hparams, RunReport
from vit_cli.train_state import TrainState

# The columns a user compares first, after the overridden keys; TensorBoard sorts by name,
# and "core." sorts before every config section.
CORE_HPARAMS = {
    "core.model": "model.name", "core.optimizer": "optimizer.name", "core.lr": "optimizer.lr",
    "core.batch": "data.batch_size", "core.epochs": "trainer.epochs",
    "core.precision": "precision.name", "core.seed": "seed",
}  # fmt: skip


def run_report(
    cfg: TrainConfig,
    cfg_dict: dict,
    c: Components,
    state: TrainState,
    metrics: dict[str, float],
    wall: float,
    run_dir: Path,
    overrides: Sequence[str],
) -> RunReport:
    """The report of a run that trained `cfg` (recorded as `cfg_dict`) to `state`, whose last
    val figures are `metrics`; `overrides` are the command line's keys."""
    world_size = c.training.runtime.world_size
    hparams = {
        **flat_hparams(cfg_dict),
        "world_size": world_size,
        "global_batch": cfg.data.batch_size * world_size * cfg.trainer.accumulate,
    }
    hparams, leading = leading_hparams(hparams, overrides, c.img_size)
    return RunReport(
        hparams=hparams,
        leading=leading,
        results={
            "hparam/best_acc1": state.best_acc1,
            "hparam/final_acc1": metrics.get("val/acc1", 0.0),
            **({"hparam/best_ema_acc1": state.best_ema_acc1} if c.ema else {}),
            "hparam/wall_time_s": wall,
        },
        summary=summary_rows(cfg, c, state, metrics, wall, run_dir),
    )


def summary_rows(
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


def leading_hparams(
    hparams: Hparams, overrides: Sequence[str], img_size: int
) -> tuple[Hparams, list[str]]:
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


def flat_hparams(cfg_dict: dict) -> Hparams:
    """Config leaves as `section.key` entries in the types the HParams plugin accepts."""

    def leaves(prefix: str, node: dict) -> Hparams:
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
