"""A Hydra sweeper over Optuna's ask-and-tell interface.

Hydra's own Optuna sweeper (hydra-optuna-sweeper 1.2) needs Optuna 2, whose SQLite storage
fails with SQLAlchemy 2, and it stops a whole search when one trial fails. This one asks
Optuna for each trial's parameters, has Hydra's launcher (basic, or submitit on Slurm) run
the trials, and tells Optuna each result; a trial that fails or returns no finite value is
told as failed, and the search goes on. The study, its storage, sampler and search logic
are Optuna's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from vit_cli.cli import reported_errors
from vit_cli.errors import UserError

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        storage: str,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        params: dict[str, str],
    ) -> None:
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler = sampler
        self.params = dict(params or {})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> dict:
        # A mistake in the search is one short message, as in every vit-train run.
        with reported_errors():
            return self._search(arguments)

    def _search(self, arguments: list[str]) -> dict:
        import optuna

        if self.n_trials < 1 or self.n_jobs < 1:
            raise UserError(
                f"hydra.sweeper.n_trials={self.n_trials} and hydra.sweeper.n_jobs={self.n_jobs} "
                "must both be at least 1."
            )
        space, fixed = search_space(
            [f"{key}={value}" for key, value in self.params.items()], arguments
        )
        if not space:
            raise UserError(
                "The search space is empty: give hydra.sweeper.params (or a preset such as "
                "hparams_search=digits_optuna), or sweeps such as "
                "optimizer.lr='tag(log, interval(1e-4, 1e-2))' on the command line."
            )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        self._check_same_space(study, space)
        earlier = len(study.trials)
        log.info(
            "Optuna study %r in %s: %d earlier trial(s); %d more, %d at a time",
            self.study_name, self.storage, earlier, self.n_trials, self.n_jobs,
        )  # fmt: skip
        for name, distribution in space.items():
            log.info("\t%s: %s", name, distribution)

        remaining = self.n_trials
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            remaining -= len(trials)
            batch = [fixed + trial_overrides(trial.params) for trial in trials]
            for trial, overrides in zip(trials, batch, strict=True):
                trial.set_user_attr("overrides", overrides)
            searched_all = False
            for trial, outcome in zip(trials, self._run(trials, batch), strict=True):
                value = _value(outcome)
                if value is None:
                    log.warning("trial %d failed: it gets no value", trial.number)
                else:
                    log.info("trial %d: %s", trial.number, value)
                searched_all |= _tell(study, trial, value)
            if searched_all:
                log.info("The sampler has tried its whole search space.")
                break
        return self._report(study, earlier)

    def _check_same_space(self, study, space: dict) -> None:
        """Refuse a search whose space differs in kind from the one the study has searched,
        before any trial is asked (Optuna would leave it unfinished)."""
        from optuna.distributions import check_distribution_compatibility

        for trial in study.get_trials(deepcopy=False):
            for key, distribution in space.items():
                if key not in trial.distributions:
                    continue
                try:
                    check_distribution_compatibility(trial.distributions[key], distribution)
                except ValueError as e:
                    raise UserError(
                        f"{key}: {e} Study {self.study_name!r} in {self.storage} searched "
                        f"{trial.distributions[key]}; give this search another "
                        "hydra.sweeper.study_name (or storage)."
                    ) from e

    def _run(self, trials: list, batch: list[list[str]]) -> Sequence[JobReturn | Exception]:
        """Run a batch with the launcher; each trial's run folder is named by its number."""
        numbers = [trial.number for trial in trials]
        # One launch for the batch when its numbers follow each other (as they do unless
        # another process adds trials to the same study at the same time).
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            groups = [(numbers[0], batch)]
        else:
            groups = [
                (number, [overrides]) for number, overrides in zip(numbers, batch, strict=True)
            ]
        outcomes: list[JobReturn | Exception] = []
        for first, overrides in groups:
            try:
                outcomes += self.launcher.launch(overrides, initial_job_idx=first)
            except Exception as e:  # e.g. a Slurm job killed by the scheduler
                log.error("the launcher could not run trial(s) from %d: %s", first, e)
                outcomes += [e] * len(overrides)
        return outcomes

    def _report(self, study, earlier: int) -> dict:
        from optuna.trial import TrialState

        finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
        failed = [t for t in study.trials[earlier:] if t.state == TrialState.FAIL]
        if not finished:
            raise UserError(
                f"No trial of study {self.study_name!r} has finished ({len(failed)} failed in "
                "this search): the trials' own messages above say why."
            )
        best = study.best_trial
        results = {
            "study_name": self.study_name,
            "storage": self.storage,
            "direction": self.direction,
            "trials": len(study.trials),
            "failed_trials": [t.number for t in study.trials if t.state == TrialState.FAIL],
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "best_overrides": best.user_attrs.get("overrides", []),
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / RESULTS_FILE)
        log.info(
            "Best of %d trial(s) (%d failed in this search): trial %d, value %s",
            len(study.trials), len(failed), best.number, best.value,
        )  # fmt: skip
        log.info("Its overrides: %s", " ".join(results["best_overrides"]))
        log.info("Written to %s", self.sweep_dir / RESULTS_FILE)
        return results


def search_space(configured: list[str], arguments: list[str]) -> tuple[dict, list[str]]:
    """Optuna distributions for the swept keys, and the fixed overrides of every trial.

    `configured` comes from hydra.sweeper.params, `arguments` from the command line, which
    wins for a key given in both.
    """
    parser = OverridesParser.create()
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(configured) + parser.parse_overrides(arguments):
        by_key[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in by_key.items():
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def _distribution(override: Override):
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    key, sweep = override.get_key_element(), override.value()
    tags = set(getattr(sweep, "tags", ()))
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)) and values:
            return IntDistribution(values[0], values[-1], step=sweep.step)
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    if override.is_interval_sweep():
        log_scale = "log" in tags
        if "int" in tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise UserError(f"{override.input_line}: {key} has a sweep Optuna cannot search.")


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """`key=value` overrides of one trial's parameters, floats written in full."""
    return [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
            for key, value in params.items()]  # fmt: skip


def _tell(study, trial, value: float | None) -> bool:
    """Record the trial's outcome; True when the sampler asks to end the study.

    Optuna's grid and brute-force samplers end a study by calling `Study.stop`, which only
    `Study.optimize` expects: here it raises, after the outcome is stored.
    """
    from optuna.trial import TrialState

    try:
        if value is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
        return True
    return False


def _value(outcome: JobReturn | Exception) -> float | None:
    """The trial's value, or None when its run failed or returned no finite number."""
    if isinstance(outcome, Exception) or outcome.status != JobStatus.COMPLETED:
        return None
    value = outcome.return_value
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
