"""The run folder of a single run: refused when it holds something else, before Hydra writes.

Hydra saves `.hydra/config.yaml` and opens `train.log` in `hydra.run.dir` before the run
starts, so the check runs as a Hydra callback (`configs/train.yaml`), at the start of the
run, in the main process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vit_cli.cli import reported_errors
from vit_cli.errors import UserError
from vit_cli.launch import launched_processes


def check_run_folder(run_dir: Path, resume: str | None) -> None:
    """Refuse a run folder that is a file, or that holds files, unless the run continues the
    one in it (trainer.resume=auto, or a checkpoint of that folder)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"hydra.run.dir={run_dir} is a file; it must name a folder.")
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not held or resume == "auto":
        return
    if resume and Path(resume).expanduser().resolve().parent == run_dir.resolve():
        return
    shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
    raise UserError(
        f"hydra.run.dir={run_dir} already holds {shown}. A new run needs a folder of its own: "
        "choose another hydra.run.dir (or leave it out), or continue the run in it with "
        "trainer.resume=auto."
    )


class RunFolderCheck(Callback):
    """Hydra callback: `check_run_folder` before the run writes anything."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        rank, _ = launched_processes()
        if rank != 0:
            return  # the other processes write nowhere (launch.py)
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir"))
        with reported_errors():
            check_run_folder(run_dir, OmegaConf.select(config, "trainer.resume"))
