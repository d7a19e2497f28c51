"""The config of `hydra/sweeper=vit_optuna`, registered with Hydra when it scans its plugins.

Importing this module must stay cheap and must not need optuna: Hydra imports every plugin
module at start-up, also for users who never sweep. (Hydra runs it before it is in
sys.modules, so no `from __future__ import annotations`: dataclasses would look it up.)
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.vit_cli_optuna.sweeper.OptunaSweeper"
    # The study's name and where it lives: a second `vit-train -m` with the same storage
    # and name adds trials to it.
    study_name: str = "${hydra.job.name}"
    storage: str = "sqlite:///${hydra.sweep.dir}/optuna.db"
    # `vit-train` returns the best val top-1 of the run.
    direction: str = "maximize"
    # Trials this invocation runs, and how many the launcher runs at a time (side by side
    # with a submitit launcher; one after another with Hydra's basic one).
    n_trials: int = 20
    n_jobs: int = 1
    # Any Optuna sampler, e.g. {_target_: optuna.samplers.TPESampler, seed: 0}.
    sampler: Any = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0}
    )
    # The search space, in Hydra's sweep syntax: a key and `interval(a, b)`,
    # `tag(log, interval(a, b))`, `range(a, b)` (ints, b excluded) or `choice(x, y, ...)`.
    # A plain value fixes the key in every trial. Sweeps on the command line join these.
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="vit_optuna", node=OptunaSweeperConf, provider="vit_cli"
)
