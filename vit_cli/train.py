"""`vit-train`: Hydra composes the config, and `trainer.fit` trains it.

Run as `vit-train <overrides>`, `python -m vit_cli.train <overrides>`, or in several
processes with `torchrun --nproc_per_node=N -m vit_cli.train <overrides>`. In a sweep
(`vit-train -m`), Hydra's launcher calls the task function below once per run: in this
process, or in the tasks of a submitit job (Slurm, `submitit_local`).
"""

from __future__ import annotations

import contextlib
import sys
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vit_cli.cli import reported_errors, to_train_config
from vit_cli.composition import register_configs
from vit_cli.errors import UserError
from vit_cli.host_memory import choose_freed_memory
from vit_cli.launch import (
    adopt_submitit_tasks,
    hydra_overrides_for_this_process,
    in_submitit_job,
    launched_processes,
)
from vit_cli.run_folder import run_folder_locked

CONFIG_PATH = "pkg://vit_cli.configs"
_ONE_JOB_PER_TORCHRUN = (
    "vit-train -m runs a sweep of jobs one after another, and a torchrun job is one run: "
    "start one torchrun per configuration (docs/distributed.md)."
)


# Whether Hydra got as far as running the task: before it, a failure is in the config.
_task = {"started": False}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float:
    _task["started"] = True
    # The trainer, torchvision and TensorBoard load after argument parsing, so that --help
    # and typos answer without them (composing the config loads torch, for the model schemas).
    from vit_cli.runtime import start_runtime
    from vit_cli.trainer import fit

    adopt_submitit_tasks()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rank, world_size = launched_processes()
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with reported_errors(run_dir, in_sweep=in_sweep):
        if world_size > 1 and in_sweep and not in_submitit_job():
            raise UserError(_ONE_JOB_PER_TORCHRUN)
        train_cfg = to_train_config(cfg)
        if in_submitit_job() and train_cfg.trainer.resume is None:
            # A requeued job (after preemption or a time limit) runs this again in its own
            # run folder: it continues from its last checkpoint there.
            train_cfg.trainer.resume = "auto"
        # A single run's folder is locked already (run_folder.RunFolderCheck); a sweep's job,
        # requeued ones included, locks its own here. The other processes write nowhere.
        locked = run_folder_locked(run_dir, train_cfg.trainer.lock_wait_s) if rank == 0 else None
        with (
            locked or contextlib.nullcontext(),
            start_runtime(train_cfg.device, train_cfg.trainer.dist_timeout_s) as runtime,
        ):
            # One run folder for the whole job: the main process's.
            run_dir = runtime.broadcast(run_dir)
            choose_freed_memory(train_cfg.keep_freed_memory, runtime.device.type)
            overrides = list(HydraConfig.get().overrides.task)
            result = fit(train_cfg, run_dir, runtime, overrides)
    # The returned value is what Hydra sweepers (e.g. Optuna) optimise.
    return result.best_acc1


def check_group_choices(args: list[str]) -> None:
    """A config group's choice (`model=deit`) must be a name: Hydra answers `model=0` or
    `model=null` with a traceback of its own, not a message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = {p.name for p in files("vit_cli.configs").iterdir() if p.is_dir()}
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # Hydra reports a line it cannot parse itself, as one message
        if override.is_sweep_override() or override.key_or_group not in groups:
            continue
        value = override.value()
        if not isinstance(value, (str, list)) or not all(isinstance(v, str) for v in value):
            raise UserError(
                f"{arg}: {override.key_or_group} is a config group and takes the name of one "
                f"of configs/{override.key_or_group}/ (vit-train --help lists them)."
            )


def main() -> None:
    """`vit-train`: train a model from the configs in vit_cli.configs plus overrides."""
    register_configs()
    _, world_size = launched_processes()
    if world_size > 1 and ("-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]):
        with reported_errors():
            raise UserError(_ONE_JOB_PER_TORCHRUN)
    with reported_errors():
        check_group_choices(sys.argv[1:])
    sys.argv += hydra_overrides_for_this_process()
    try:
        _train()
    except SystemExit as e:
        # Hydra reports an unknown option, a misspelt key or a wrong type with status 1;
        # like every other error in a config, it is status 2 here.
        if e.code == 1 and not _task["started"]:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
