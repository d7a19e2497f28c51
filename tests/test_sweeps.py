"""Sweeps beyond one process: Hydra's submitit launcher (local jobs, requeue after a
preemption signal, a job of two tasks training with DDP) and Optuna searches
(hydra/sweeper=vit_optuna), end to end through the real vit-train."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from hydra_plugins.vit_cli_optuna.sweeper import search_space, trial_overrides
from tests.conftest import (
    RUN_TIMEOUT_S,
    TINY,
    _vit_train_command,
    finish,
    run_command,
    wait_for_checkpoint,
)
from tests.test_distributed import EXACT, env, run, torchrun
from tests.test_recovery import ARGS, assert_same_end
from vit_cli.checkpoint import load_checkpoint
from vit_cli.composition import register_configs
from vit_cli.errors import UserError
from vit_cli.stopping import hand_on, stop_on_signals, stop_signals

LOCAL = "hydra/launcher=submitit_local"


def _descendants(pid: int) -> list[int]:
    parents = {}
    for child in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        parents[child] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _submitit_task(pid: int) -> int:
    """The process that runs the (first) task of the submitit job started under `pid`."""
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline:
            return child
    raise LookupError(f"no submitit task under {pid}")


@pytest.mark.slow
def test_submitit_local_runs_each_job_of_a_sweep(tmp_path):
    result = run(
        [*_vit_train_command(), "-m", LOCAL, *TINY, "trainer.epochs=1",
         "optimizer.lr=1e-3,3e-4", "hydra.sweep.dir=sweep"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for job, lr in [("0", 1e-3), ("1", 3e-4)]:
        run_dir = tmp_path / "sweep" / job
        assert (run_dir / "best.pt").is_file() and len(list(run_dir.glob("events.*"))) == 1
        ckpt = load_checkpoint(run_dir / "last.pt")
        assert ckpt["config"]["optimizer"]["lr"] == lr and ckpt["state"]["epoch"] == 1
        # A job that is not requeued starts afresh: resume=auto finds nothing to resume.
        assert "resumed" not in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_ends_as_if_uninterrupted(start, tmp_path):
    reference = run([*_vit_train_command(), *ARGS, "hydra.run.dir=reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr

    proc = start(
        [*_vit_train_command(), "-m", LOCAL, *ARGS, "hydra.sweep.dir=sweep",
         "trainer.checkpoint_every_n_steps=50"],
        tmp_path, env(),
    )  # fmt: skip
    run_dir = tmp_path / "sweep" / "0"
    wait_for_checkpoint(run_dir / "last.pt", proc, step=50)  # in the middle of epoch 2 of 4
    # What Slurm sends ahead of a preemption or time limit, and submitit_local ahead of
    # its timeout: submitit's SIGUSR2, to the task.
    os.kill(_submitit_task(proc.pid), signal.SIGUSR2)
    _, stderr = finish(proc, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, stderr

    (task_log,) = (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.err")
    log = task_log.read_text()
    assert "Stopped by SIGUSR2 after step" in log and "submitit requeues the job" in log
    train_log = (run_dir / "train.log").read_text()
    assert "Requeued job" in train_log and "resumed from" in train_log
    stopped_at = int(train_log.split("resumed from")[1].split("step ")[1].split()[0])
    assert 1437 // 32 < stopped_at < 4 * (1437 // 32)  # in the middle of the run
    assert_same_end(run_dir, tmp_path / "reference")


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_trains_with_ddp_as_torchrun_does(tmp_path):
    args = [*EXACT, "trainer.max_steps=20", "data.batch_size=16"]
    result = run_command(
        [*_vit_train_command(), "-m", LOCAL, "hydra.launcher.tasks_per_node=2", *args,
         "hydra.sweep.dir=sweep"],
        tmp_path,
        # One thread per process, as torchrun sets: the same sums in the same order.
        env={**env(), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reference = run([*torchrun(2, *args, "hydra.run.dir=torchrun")], tmp_path)
    assert reference.returncode == 0, reference.stderr

    ckpt = load_checkpoint(tmp_path / "sweep" / "0" / "last.pt")
    assert ckpt["distributed"]["world_size"] == 2 and ckpt["state"]["step"] == 20
    expected = load_checkpoint(tmp_path / "torchrun" / "last.pt")["model"]
    for key, value in expected.items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=0)
    # Rank 1 logs warnings only, and not into the run's train.log.
    train_log = (tmp_path / "sweep" / "0" / "train.log").read_text()
    assert train_log.count("global batch 32 = data.batch_size 16 x 2 process(es)") == 1


def _optuna(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run(
        [*_vit_train_command(), "-m", "hydra/sweeper=vit_optuna", *TINY, "trainer.epochs=1",
         "hydra.sweeper.study_name=search", "hydra.sweep.dir=search",
         "hydra.sweep.subdir=trial_${hydra.job.num}", *args],
        tmp_path,
    )  # fmt: skip


@pytest.mark.slow
def test_an_optuna_search_survives_a_diverged_trial_and_a_rerun_adds_trials(tmp_path):
    # Every lr once, in a seeded random order; 1e12 makes the loss NaN at once.
    lrs = "optimizer.lr=choice(3e-3,1e-2,3e-2,1e12)"
    brute_force = "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler"
    first = _optuna(tmp_path, lrs, brute_force, "hydra.sweeper.n_trials=4")
    assert first.returncode == 0, first.stderr
    assert "Loss was nan for 5 consecutive steps" in first.stderr

    storage = f"sqlite:///{tmp_path / 'search' / 'optuna.db'}"
    study = optuna.load_study(study_name="search", storage=storage)
    states = {t.params["optimizer.lr"]: t.state for t in study.trials}
    assert states == {
        "0.003": optuna.trial.TrialState.COMPLETE,
        "0.01": optuna.trial.TrialState.COMPLETE,
        "0.03": optuna.trial.TrialState.COMPLETE,
        "1000000000000.0": optuna.trial.TrialState.FAIL,
    }
    results = OmegaConf.load(tmp_path / "search" / "optimization_results.yaml")
    (diverged,) = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert results.failed_trials == [diverged] and results.trials == 4
    assert results.best_value == study.best_value
    assert f"optimizer.lr={study.best_params['optimizer.lr']}" in results.best_overrides
    assert " ".join(results.best_overrides) in first.stdout + first.stderr  # printed at the end
    for trial in study.trials:
        # Each trial is a run, in a folder named by its number, with its own event file.
        assert list((tmp_path / "search" / f"trial_{trial.number}").glob("events.*"))
    best_run = load_checkpoint(tmp_path / "search" / f"trial_{study.best_trial.number}" / "best.pt")
    assert best_run["metrics"]["val/acc1"] == pytest.approx(study.best_value)

    again = _optuna(tmp_path, lrs, "hydra.sweeper.n_trials=2")  # TPE, the default sampler
    assert again.returncode == 0, again.stderr
    assert "4 earlier trial(s)" in again.stdout + again.stderr
    study = optuna.load_study(study_name="search", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "search" / "trial_5" / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.slow
def test_the_digits_search_preset_runs_its_search(tmp_path):
    # A key given on the command line is fixed, so leave the searched ones out.
    tiny = [arg for arg in TINY if not arg.startswith(("optimizer.lr", "scheduler.warmup"))]
    result = run(
        [*_vit_train_command(), "-m", "hparams_search=digits_optuna", *tiny,
         "trainer.epochs=1", "hydra.sweeper.n_trials=2"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    study_dir = tmp_path / "outputs" / "optuna" / "digits"
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    assert set(study.best_params) == {
        "optimizer.lr", "optimizer.weight_decay", "model.drop_path_rate",
        "scheduler.warmup_epochs",
    }  # fmt: skip
    assert (study_dir / "trial_1" / "best.pt").is_file()


def test_search_space_reads_hydra_sweeps_as_optuna_distributions():
    space, fixed = search_space(
        ["optimizer.lr=tag(log, interval(1e-4, 1e-2))", "model.depth=range(2, 8, 2)",
         "trainer.epochs=5", "data.batch_size=choice(16, 32)"],
        ["data.batch_size=choice(32,64)", "model.drop_path_rate=interval(0, 1)",
         "trainer.ema.decay=tag(int, interval(1, 3))"],
    )  # fmt: skip
    assert space == {
        "optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "model.depth": optuna.distributions.IntDistribution(2, 6, step=2),
        "data.batch_size": optuna.distributions.CategoricalDistribution(["32", "64"]),
        # interval() is over floats unless tagged int, even with whole-number bounds
        "model.drop_path_rate": optuna.distributions.FloatDistribution(0.0, 1.0),
        "trainer.ema.decay": optuna.distributions.IntDistribution(1, 3),
    }
    assert fixed == ["trainer.epochs=5"]
    assert trial_overrides({"optimizer.lr": 1 / 3, "model.depth": 4, "x": "32"}) == [
        f"optimizer.lr={1 / 3!r}", "model.depth=4", "x=32",
    ]  # fmt: skip
    with pytest.raises(UserError, match="cannot search"):
        search_space(["optimizer.lr=glob(*)"], [])


@pytest.mark.parametrize(
    ("preset", "nodes", "tasks"),
    [("slurm_1gpu", 1, 1), ("slurm_8gpu", 1, 8), ("slurm_multinode", 2, 8)],
)
def test_slurm_presets_ask_for_one_process_per_gpu_and_requeue(preset, nodes, tasks):
    register_configs()
    with initialize_config_module("vit_cli.configs", version_base="1.3"):
        cfg = compose("train", [f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (
        nodes, tasks, tasks,
    )  # fmt: skip
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    for key in ("partition", "account", "timeout_min", "mem_gb", "cpus_per_task"):
        assert key in launcher


def test_a_stop_signal_is_recorded_then_handed_to_the_handler_it_replaced(monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "URG")  # submitit's setting for its signal
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGURG)
    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        with stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.signum == signal.SIGUSR2 and received == []  # only recorded
        hand_on(signal.SIGUSR2)  # after the checkpoint: submitit's requeue, here a stand-in
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    hand_on(signal.SIGTERM)  # the default handler is not called: the CLI exits itself
